"""Model families by model_type: one file each, registered here. `register()` adds a family (its config class
and its model class) without touching the loader."""

from __future__ import annotations

import os
from typing import Any

from .._util import read_json
from ..config import PretrainedConfig
from ..errors import ConfigError
from ..hub import HUB_KWARGS, resolve_model_dir
from ..nn import KVCache
from .base import CausalLM, DecoderModel
from .gemma2 import Gemma2Config, Gemma2ForCausalLM
from .gemma3 import Gemma3Config, Gemma3ForCausalLM, Gemma3TextConfig
from .gpt2 import GPT2Config, GPT2LMHeadModel
from .gpt_oss import GptOssConfig, GptOssForCausalLM
from .granite import GraniteConfig, GraniteForCausalLM
from .llama import LlamaConfig, LlamaForCausalLM
from .mistral import MistralConfig, MistralForCausalLM
from .mixtral import MixtralConfig, MixtralForCausalLM
from .olmo2 import Olmo2Config, Olmo2ForCausalLM
from .phi3 import Phi3Config, Phi3ForCausalLM
from .qwen2 import Qwen2Config, Qwen2ForCausalLM
from .qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from .qwen3 import Qwen3Config, Qwen3ForCausalLM
from .qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from .smollm3 import SmolLM3Config, SmolLM3ForCausalLM

_MODELS: dict[str, type] = {}
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {}


def register(model_type: str, config_cls: type[PretrainedConfig], model_cls: Any) -> None:
    """Add a model family: its config class and its model class."""
    CONFIG_CLASSES[model_type] = config_cls
    _MODELS[model_type] = model_cls


for _cls in (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Phi3ForCausalLM,
    Olmo2ForCausalLM,
    GraniteForCausalLM,
    SmolLM3ForCausalLM,
    MixtralForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
    GptOssForCausalLM,
    GPT2LMHeadModel,
):
    register(_cls.config_class.model_type, _cls.config_class, _cls)
# Gemma 3's image-text checkpoints: their language model
register(Gemma3Config.model_type, Gemma3Config, Gemma3ForCausalLM)


def gguf_families(metadata: dict | None = None) -> dict[str, type]:
    """llama.cpp's architecture name -> the model class of each family that declares its GGUF layout. Where two
    families share an architecture (llama.cpp writes Mixtral as "llama"), the one whose layout reads
    `expert_count` is taken for a file (`metadata`) that has experts, the other one otherwise."""
    out: dict[str, type] = {}
    for cls in _MODELS.values():
        layout = getattr(cls, "gguf", None)
        if layout is None:
            continue
        moe = any(key == "expert_count" for key, _ in layout.config)
        if moe == bool((metadata or {}).get(f"{layout.arch}.expert_count")):
            out[layout.arch] = cls
        else:
            out.setdefault(layout.arch, cls)
    return out


def config_class(model_type: Any, source: str = "config.json") -> type[PretrainedConfig]:
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(CONFIG_CLASSES))}"
        )
    return CONFIG_CLASSES[model_type]


def model_class(model_type: str) -> type:
    config_class(model_type)
    return _MODELS[model_type]


def config_from_file(path: str, **overrides: Any) -> PretrainedConfig:
    """Read config.json and build the config class its model_type names."""
    d = read_json(path)
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(
            f"{path}: no 'model_type' key (expected one of {', '.join(sorted(CONFIG_CLASSES))})"
        )
    config = config_class(model_type, source=path).from_dict(d, source=path, **overrides)
    config.name_or_path = os.path.dirname(path)
    return config


def load_config(path_or_repo_id: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
    """The config of a model directory, a repo id or a config.json path, with field overrides."""
    name = os.fspath(path_or_repo_id)
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
    kwargs.pop("trust_remote_code", None)  # accepted: autolm never runs code from a checkpoint
    path = name if os.path.isfile(name) else os.path.join(resolve_model_dir(name, **hub), "config.json")
    config = config_from_file(path, **kwargs)
    config.name_or_path = name
    return config


__all__ = [
    "CONFIG_CLASSES",
    "CausalLM",
    "DecoderModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "Gemma2Config",
    "Gemma2ForCausalLM",
    "Gemma3Config",
    "Gemma3ForCausalLM",
    "Gemma3TextConfig",
    "GptOssConfig",
    "GptOssForCausalLM",
    "GraniteConfig",
    "GraniteForCausalLM",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MistralConfig",
    "MistralForCausalLM",
    "MixtralConfig",
    "MixtralForCausalLM",
    "Olmo2Config",
    "Olmo2ForCausalLM",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    "SmolLM3Config",
    "SmolLM3ForCausalLM",
    "config_class",
    "config_from_file",
    "gguf_families",
    "load_config",
    "model_class",
    "register",
]
