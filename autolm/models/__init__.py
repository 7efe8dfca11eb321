"""Model classes by model_type: `model_class(config)`; `register()` adds a family without touching the loader."""

from __future__ import annotations

from typing import Any

from ..config import CONFIG_CLASSES, LlamaConfig, config_class
from .layers import KVCache
from .llama import LlamaForCausalLM

_MODELS: dict[str, type] = dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), LlamaForCausalLM)


def register(model_type: str, config_cls: type[LlamaConfig], model_cls: Any) -> None:
    """Add a model family: its config class and its model class."""
    CONFIG_CLASSES[model_type] = config_cls
    _MODELS[model_type] = model_cls


def model_class(model_type: str) -> type:
    config_class(model_type)
    return _MODELS[model_type]


__all__ = ["KVCache", "LlamaForCausalLM", "model_class", "register"]
