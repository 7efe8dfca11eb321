"""Putting LoRA on a model: every targeted Linear wrapped in a LoraLinear and every targeted Embedding in a
LoraEmbedding (inject_adapter), and peft's ModulesToSaveWrapper (ModulesToSave) for modules_to_save."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AdapterError
from .config import HEAD_NAMES, LINEAR, LoraConfig, default_targets
from .layers import AdapterLayer, LoraEmbedding, LoraLinear, rows_of
from .tokens import TrainableTokensWrapper, targets


class ModulesToSave(nn.Module):
    """peft's ModulesToSaveWrapper: the original module plus a trainable copy per adapter."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.row_adapters: list[str] | None = None  # a mixed batch: each row's adapter (lora.mixed)

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        for p in self.modules_to_save[name].parameters():
            p.requires_grad_(True)
        self.active_adapter = name

    @property
    def weight(self) -> torch.Tensor:
        return self._current().weight

    def _current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is None or self.disable_adapters:
            return self._current()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)  # rows of adapters without a copy here: the original
        for name, rows in rows_of(self.row_adapters, x.device):
            if name in self.modules_to_save:
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every targeted Linear in a LoraLinear, every targeted Embedding in a LoraEmbedding (or add an adapter to
    an existing one); return their names."""
    check_tokens(model, config)
    if config.target_modules is None:  # peft fills in the model type's default (and saves it)
        config.target_modules = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    targeted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            base_name, base = name, module.base_layer
        elif (
            ".base_layer" in name
            or ".lora_" in name
            or isinstance(module, ModulesToSave)
            or ".modules_to_save." in name
            or ".original_module" in name
            or ".token_adapter" in name
        ):
            continue
        else:
            base_name, base = name, module
        if not config.matches(base_name, base):
            continue
        # as peft: True for a Conv1D target (weight stored (in, out)), False for nn.Linear
        config.fan_in_fan_out = bool(getattr(base, "fan_in_fan_out", False))
        if isinstance(module, AdapterLayer):
            layer = module
        else:
            layer = LoraEmbedding(base) if isinstance(base, nn.Embedding) else LoraLinear(base)
        if layer is not module:
            _set_module(model, name, layer)
        r, alpha = config.rank_and_alpha(base_name)
        layer.add_adapter(
            adapter_name,
            r,
            alpha,
            config.lora_dropout,
            config.use_rslora,
            config.init_lora_weights,
            config.use_dora,
            config.lora_bias,
        )
        targeted.append(name)
    if not targeted:
        raise AdapterError(
            f"target modules {config.target_modules!r} match no Linear layer of the model "
            f"(its Linear layers end in: {sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, LINEAR)})})"
        )
    for name in config.modules_to_save or []:
        found = False
        for mod_name, module in list(model.named_modules()):
            if mod_name and (mod_name == name or mod_name.endswith(f".{name}")):
                if isinstance(module, AdapterLayer) or ".base_layer" in mod_name or ".lora_" in mod_name:
                    raise AdapterError(f"modules_to_save entry {name!r} is also a LoRA target ({mod_name})")
                if (
                    ".modules_to_save." in mod_name
                    or ".original_module" in mod_name
                    or ".token_adapter" in mod_name
                ):
                    continue
                wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
                if wrapper is not module:
                    _set_module(model, mod_name, wrapper)
                wrapper.add_adapter(adapter_name)
                found = True
        if not found and name not in HEAD_NAMES.get(config.task_type, ()):
            raise AdapterError(f"modules_to_save entry {name!r} matches no module of the model")
    if config.extra.get("trainable_token_indices"):
        wrap_tokens(model, config, adapter_name)
    return targeted


def _named(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The module named `name` (or ending in it), as peft's strict module check finds it."""
    for full, module in model.named_modules():
        if full == name or full.endswith(f".{name}"):
            return full, module
    raise AdapterError(f"trainable_token_indices names {name!r}, which matches no module of the model")


def check_tokens(model: nn.Module, config: LoraConfig) -> None:
    """Before anything is wrapped: trainable_token_indices names modules that exist and that modules_to_save
    does not train whole."""
    for name in targets(model, config.extra.get("trainable_token_indices") or {}):
        full, _ = _named(model, name)
        whole = [m for m in config.modules_to_save or [] if full == m or full.endswith(f".{m}")]
        if whole:
            raise AdapterError(f"the layer {full!r} is both in modules_to_save ({whole[0]!r}: trained whole) and "
                               "in trainable_token_indices: name it in one of them")  # fmt: skip


def wrap_tokens(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """peft's trainable_token_indices: the named layers (the input embeddings for a list) train those rows; an
    output layer tied to the input embeddings follows them (peft's tied adapter) unless it is named with other
    indices."""
    chosen = targets(model, config.extra["trainable_token_indices"])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and _base(head).weight is _base(emb).weight
    found = {name: _named(model, name) for name in chosen}
    rows = next((chosen[n] for n, (_, m) in found.items() if m is emb), None)
    for name, (full, module) in found.items():
        if tied and module is head and chosen[name] == rows:
            continue  # the tied output layer follows the embeddings' rows (below)
        wrapper = module if isinstance(module, TrainableTokensWrapper) else TrainableTokensWrapper(module)
        if wrapper is not module:
            _set_module(model, full, wrapper)
        wrapper.token_adapter.add_adapter(adapter_name, indices=chosen[name])
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied and isinstance(emb, TrainableTokensWrapper) and not isinstance(head, TrainableTokensWrapper):
        full = next(n for n, m in model.named_modules() if m is head)
        _set_module(model, full, TrainableTokensWrapper(head, tied=emb))


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, TrainableTokensWrapper) else module
