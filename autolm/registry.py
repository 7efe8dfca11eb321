"""model_type -> (config class, model class). Register a new family without touching the loader."""

from __future__ import annotations

import importlib
from typing import Any

from .config import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from .errors import ConfigError

# Model classes are named as "module:Class" and imported on first use, so `import autolm` stays light.
_REGISTRY: dict[str, tuple[type[LlamaConfig], Any]] = {
    "llama": (LlamaConfig, "autolm.models.llama:LlamaForCausalLM"),
    "mistral": (MistralConfig, "autolm.models.llama:LlamaForCausalLM"),
    "qwen2": (Qwen2Config, "autolm.models.llama:LlamaForCausalLM"),
    "qwen3": (Qwen3Config, "autolm.models.llama:LlamaForCausalLM"),
}


def register(model_type: str, config_cls: type[LlamaConfig], model_cls: Any) -> None:
    """Add a model family: its config class and its model class (a class or a "module:Class" string)."""
    _REGISTRY[model_type] = (config_cls, model_cls)


def supported() -> list[str]:
    return sorted(_REGISTRY)


def config_class(model_type: str, source: str = "config.json") -> type[LlamaConfig]:
    if model_type not in _REGISTRY:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: {', '.join(supported())}"
        )
    return _REGISTRY[model_type][0]


def model_class(model_type: str) -> type:
    config_class(model_type)
    cls = _REGISTRY[model_type][1]
    if isinstance(cls, str):
        module, _, name = cls.partition(":")
        cls = getattr(importlib.import_module(module), name)
        _REGISTRY[model_type] = (_REGISTRY[model_type][0], cls)
    return cls
