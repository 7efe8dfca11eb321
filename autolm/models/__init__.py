"""Model families by model_type: one file each, listed in .families and imported when first used. `register()` adds a
family (its config class and its model class) without touching the loader."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .._util import read_json
from ..config import PretrainedConfig
from ..errors import ConfigError
from ..hub import HUB_KWARGS, resolve_model_dir
from ..nn import KVCache
from .base import CausalLM, DecoderModel
from .families import FAMILIES

_MODULES = {name: f[0] for f in FAMILIES.values() for name in f[1:3]}  # class name -> its module

_MODELS: dict[str, type] = {}  # model_type -> model class: the families imported so far, and registered ones
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {}


def register(model_type: str, config_cls: type[PretrainedConfig], model_cls: Any) -> None:
    """Add a model family: its config class and its model class."""
    CONFIG_CLASSES[model_type] = config_cls
    _MODELS[model_type] = model_cls


def __getattr__(name: str) -> Any:  # autolm.models.LlamaConfig and the like: the family's file imported now
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def model_types() -> list[str]:
    """Every supported model_type: the families autolm ships and the registered ones."""
    return sorted({*FAMILIES, *CONFIG_CLASSES})


def _family(model_type: Any) -> bool:
    """Import a shipped family's file and register it, once; False where model_type names none."""
    if model_type in CONFIG_CLASSES:
        return True
    if model_type not in FAMILIES:
        return False
    module, config, model, _ = FAMILIES[model_type]
    module = importlib.import_module(f"{__name__}.{module}")
    register(model_type, getattr(module, config), getattr(module, model))
    return True


def _gguf_claim(layout: Any) -> str | tuple[str, Any] | None:
    """The metadata key whose presence claims a file for the family among those sharing its architecture: the
    layout's `claim`, else `expert_count` for a layout that reads it (Mixtral's experts under "llama")."""
    if layout.claim is not None:
        return layout.claim
    return "expert_count" if any(key == "expert_count" for key, _ in layout.config) else None


def _holds(metadata: dict, arch: str, claim: str | tuple[str, Any]) -> bool:
    """Whether a file's metadata holds a family's claim: the key (non-empty), or the key with the given value."""
    if isinstance(claim, tuple):
        return metadata.get(f"{arch}.{claim[0]}") == claim[1]
    return bool(metadata.get(f"{arch}.{claim}"))


def gguf_family(metadata: dict) -> type | None:
    """The model class for a GGUF file's metadata: the family whose GGUF layout names its architecture (None:
    none does). Where families share one (llama.cpp writes Mixtral as "llama", OLMo 3 as "olmo2"), a family whose
    claim key (_gguf_claim) the file holds is taken, else the one that claims nothing (the architecture's
    namesake first: llama.cpp writes Mistral as "llama" too)."""
    arch = metadata.get("general.architecture")
    for model_type, family in FAMILIES.items():
        if arch in _archs(family[3]):
            _family(model_type)
    # in FAMILIES' order, however the process imported them (registered families after): where nothing else
    # decides, Gemma 4's text model reads a "gemma4" file, not Gemma 4 unified's (whose files are the same)
    order = {t: i for i, t in enumerate(FAMILIES)}
    models = [cls for _, cls in sorted(_MODELS.items(), key=lambda item: order.get(item[0], len(order)))]
    found = [(cls, _gguf_claim(g)) for cls in models for g in gguf_layouts(cls) if g.arch == arch]
    claimed = [cls for cls, key in found if key is not None and _holds(metadata, arch, key)]
    # a layout's own claim before expert_count's (Granite MoE Shared's shared-expert key in "granitemoe" files,
    # which Granite MoE's expert count claims too)
    claimed.sort(key=lambda cls: all(g.claim is None for g in gguf_layouts(cls) if g.arch == arch))
    # of the families claiming nothing, the one the architecture is named for (Llama for "llama", not Mistral)
    plain = sorted(
        (cls for cls, key in found if key is None), key=lambda cls: cls.config_class.model_type != arch
    )
    return next(iter(claimed or plain or [cls for cls, _ in found]), None)


def gguf_layouts(cls: type) -> tuple[Any, ...]:
    """A model class's GGUF layouts: its `gguf` and `gguf_more` (none for a family llama.cpp does not write). A
    class's `gguf_more` is its own, not inherited: Mistral, a Llama subclass, does not read Llama's "exaone" files."""
    first = getattr(cls, "gguf", None)
    return () if first is None else (first, *vars(cls).get("gguf_more", ()))


def _archs(arch: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A FAMILIES entry's llama.cpp architectures: none, one, or several (the first its `gguf` layout's)."""
    return () if arch is None else (arch,) if isinstance(arch, str) else arch


def gguf_architectures() -> list[str]:
    """llama.cpp's architecture names autolm reads."""
    registered = {g.arch for cls in _MODELS.values() for g in gguf_layouts(cls)}
    return sorted({a for f in FAMILIES.values() for a in _archs(f[3])} | registered)


def config_class(model_type: Any, source: str = "config.json") -> type[PretrainedConfig]:
    if not _family(model_type):
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(model_types())}"
        )
    return CONFIG_CLASSES[model_type]


def model_class(model_type: str) -> type:
    config_class(model_type)
    return _MODELS[model_type]


def by_architecture(d: dict[str, Any]) -> str | None:
    """For a config.json whose model_type autolm does not know (a remote-code model's, such as Kimi K2's
    "kimi_k2"): the model_type of the family whose model class its `architectures` names (DeepseekV3ForCausalLM),
    as vLLM picks a model by its architecture; None where it names none of them."""
    names = d.get("architectures")
    for name in names if isinstance(names, list) else ():
        found = next((t for t, f in FAMILIES.items() if f[2] == name), None)
        if found is not None:
            return found
    return None


def config_from_file(path: str, **overrides: Any) -> PretrainedConfig:
    """Read config.json and build the config class its model_type names (or, for a model_type no family has, the
    class of the family its architectures name: by_architecture)."""
    d = read_json(path)
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: no 'model_type' key (expected one of {', '.join(model_types())})")
    family = None if _family(model_type) else by_architecture(d)
    if family is not None:  # read as that family's; its remote code (auto_map) neither run nor written back
        d = {k: v for k, v in d.items() if k != "auto_map"}
        model_type = family
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
    "KVCache",
    "config_class",
    "config_from_file",
    "gguf_architectures",
    "gguf_family",
    "gguf_layouts",
    "load_config",
    "model_class",
    "model_types",
    "register",
]
__all__.extend(sorted(_MODULES))  # the shipped families' config and model classes, imported on first use
