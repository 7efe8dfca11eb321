"""peft's functions around a PeftModel: its state dicts by peft's on-disk names, LoRA put into a plain model
(inject_adapter_in_model), and preparing a quantized model for training."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError
from . import adapters
from .config import LoraConfig, as_lora_config
from .files import PREFIX
from .inject import inject_adapter


def inject_adapter_in_model(
    peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default", **_
) -> nn.Module:
    """peft's low-level API: the model's targeted layers carry a fresh adapter (no PeftModel around it); only
    the adapter's weights train. Returns the model."""
    config = as_lora_config(peft_config, f"adapter {adapter_name!r}")
    inject_adapter(model, config, adapter_name)
    adapters.activate(model, [adapter_name])
    adapters.mark_trainable(model, config, adapter_name)
    return model


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict | None = None, adapter_name: str = "default"
) -> dict:
    """peft's get_peft_model_state_dict: an adapter's tensors under their on-disk names (from `state_dict`, a
    state dict of the PeftModel, when given)."""
    if adapter_name not in model.peft_config:
        raise AdapterError(f"no adapter named {adapter_name!r} (loaded: {sorted(model.peft_config)})")
    if state_dict is None:
        return model.adapter_state_dict(adapter_name)
    config, inner = model.peft_config[adapter_name], getattr(model, "_model", None)
    if inner is None:  # a model that holds its adapters itself (load_adapter, add_adapter)
        names = adapters.disk_names(model, config, adapter_name)
    else:  # a PeftModel: its parameters are the wrapped model's under PREFIX, named on disk as that model's
        names = {PREFIX + k: v for k, v in adapters.disk_names(inner, config, adapter_name, PREFIX).items()}
    return adapters.from_state_dict(model, names, state_dict)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default"):
    """peft's set_peft_model_state_dict: load on-disk names into an adapter; returns load_state_dict's
    (missing_keys, unexpected_keys) as peft does."""
    if adapter_name not in model.peft_config:
        raise AdapterError(f"no adapter named {adapter_name!r} (loaded: {sorted(model.peft_config)})")
    to_param = {
        v: k for k, v in adapters.disk_names(model, model.peft_config[adapter_name], adapter_name).items()
    }
    return model.load_state_dict(
        {to_param.get(k, k): v for k, v in peft_model_state_dict.items()}, strict=False
    )


def prepare_model_for_kbit_training(
    model, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
):  # fmt: skip
    """peft's preparation of a quantized model for LoRA: every parameter frozen, the fp16 / bf16 ones (norms,
    embeddings, the head: whatever is not quantized) cast to fp32, and for a model with quantized layers (int8,
    int4, GGUF blocks) gradient checkpointing on, with the embeddings' output requiring grad unless
    use_reentrant=False. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    quantized = any(not b.is_floating_point() for b in model.buffers())
    if quantized and use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
