"""peft's `get_layer_status` / `get_model_status`: what each adapter layer holds, runs and trains, and the model's
summary of it (a field that differs between layers reads "irregular"), with peft's field names and values."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import AdapterError
from .adapters import adapter_params
from .inject import ModulesToSave
from .layers import AdapterLayer, LoraEmbedding
from .tokens import TrainableTokensWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _one(values) -> bool | Irregular:
    values = list(values)
    return (
        True if all(v is True for v in values) else False if all(v is False for v in values) else "irregular"
    )


def _layer(name: str, module: nn.Module) -> TunerLayerStatus:
    params = adapter_params(module)
    if isinstance(
        module, TrainableTokensWrapper
    ):  # peft reports its token_adapter (a tied one: the rows it follows)
        name, kind = f"{name}.token_adapter", "TrainableTokensLayer"
        params = {k: [p] for k, p in module.token_adapter.source.trainable_tokens_delta.items()}
        active, merged = list(module.active_adapters), list(module.merged_adapters)
    elif isinstance(module, ModulesToSave):
        kind, active, merged = (
            "ModulesToSaveWrapper",
            [module.active_adapter] if module.active_adapter else [],
            [],
        )
    else:
        kind = "lora.Embedding" if isinstance(module, LoraEmbedding) else "lora.Linear"
        active, merged = list(module.active_adapters), list(module.merged_adapters)
    return TunerLayerStatus(
        name=name,
        module_type=kind,
        enabled=not module.disable_adapters,
        active_adapters=active,
        merged_adapters=merged,
        requires_grad={k: _one(p.requires_grad for p in ps) for k, ps in params.items()},
        available_adapters=sorted(params),
        devices={k: sorted({p.device.type for p in ps}) for k, ps in params.items()},
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """Each LoRA layer's and modules_to_save wrapper's status, in module order (a PeftModel's names start with
    base_model.model, as peft's)."""
    root = model.base_model if hasattr(model, "get_base_model") else model  # a PeftModel: its LoraModel
    kinds = (AdapterLayer, ModulesToSave, TrainableTokensWrapper)
    out = [_layer(n, m) for n, m in root.named_modules() if isinstance(m, kinds)]
    if not out:
        raise AdapterError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have PEFT "
            "adapters injected in the model."
        )
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' statuses summed up, with the parameter counts and the adapters' peft types."""
    layers = get_layer_status(model)
    peft = hasattr(model, "get_base_model")  # a PeftModel (else a model with transformers' adapter methods)
    params = {id(p): p for p in model.parameters()}.values()
    trainable, total = (
        model.get_nb_trainable_parameters()
        if peft
        else (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    )
    base = model.get_base_model() if peft else model
    merged_all = sorted({a for s in layers for a in s.merged_adapters})
    irregular_merge = any(
        set(s.available_adapters) - set(s.merged_adapters) & set(merged_all) for s in layers
    )
    actives = {tuple(s.active_adapters) for s in layers}
    grads, devices = defaultdict(list), defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].update(v)
    enabled = {s.enabled for s in layers}
    return TunerModelStatus(
        base_model_type=type(base).__name__,
        adapter_model_type="LoraModel" if peft else "None",
        peft_types=dict.fromkeys(model.peft_config, "LORA") if peft else {},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else "irregular",
        merged_adapters="irregular" if irregular_merge else merged_all,
        requires_grad={k: _one(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
    )
