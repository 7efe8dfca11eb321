"""PeftModel (load / save / merge / several adapters) and get_peft_model, with peft's file format.

The nesting is peft's, PeftModel -> LoraModel (`.base_model`) -> the model (`.base_model.model`), so
parameter names and attribute paths equal peft's (`base_model.model.model.layers.0.self_attn.q_proj
.lora_A.default.weight`) and adapters move freely between peft and autolm: on disk
`base_model.model.<module>.lora_A.weight`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from torch import nn

from .._util import atomic_directory, full_tensor, world
from ..errors import AdapterError, AutolmError
from ..hub import resolve_model_dir
from ..sources import load_bin
from ..sources.safetensors import SafetensorsFile
from .config import CONFIG_NAME, LoraConfig
from .layers import LoraLinear, ModulesToSave, _set_module, inject_adapter

WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."


class _Forwarding(nn.Module):
    """Attributes a wrapper lacks are looked up on what it wraps, as peft's wrappers do."""

    _inner_name = ""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self._inner_name or name.startswith("__"):
                raise
            return getattr(super().__getattr__(self._inner_name), name)


class LoraModel(_Forwarding):
    """peft's middle layer: `.model` is the model whose Linear layers carry the adapters."""

    _inner_name = "model"

    def __init__(self, model: nn.Module, peft_config: dict[str, LoraConfig]):
        super().__init__()
        self.model = model
        self.peft_config = peft_config

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


class PeftModel(_Forwarding):
    """A base model with LoRA adapters; the API of peft's PeftModel."""

    _inner_name = "base_model"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.peft_config: dict[str, LoraConfig] = {}
        self.base_model = LoraModel(model, self.peft_config)
        self.active_adapter = adapter_name
        self._add(config, adapter_name)

    @property
    def _model(self) -> nn.Module:
        return self.base_model.model

    # ---- adapters -----------------------------------------------------------------------------

    def _add(self, config: LoraConfig, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} is already loaded")
        inject_adapter(self._model, config, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        self._mark_trainable()

    def _lora_layers(self):
        return [m for m in self._model.modules() if isinstance(m, LoraLinear)]

    def _save_wrappers(self):
        return [m for m in self._model.modules() if isinstance(m, ModulesToSave)]

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r} (loaded: {sorted(self.peft_config)})")
        self.active_adapter = adapter_name
        for layer in self._lora_layers():
            layer.active_adapters = [adapter_name]
        for w in self._save_wrappers():
            w.active_adapter = adapter_name
        self._mark_trainable()

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _mark_trainable(self) -> None:
        """Only the active adapter's LoRA weights (and its modules_to_save copies, biases per config) train."""
        name = self.active_adapter
        cfg = self.peft_config[name]
        for pname, p in self._model.named_parameters():
            lora = f".lora_A.{name}." in pname or f".lora_B.{name}." in pname
            saved = f".modules_to_save.{name}." in pname
            bias = pname.endswith(".bias") and (
                cfg.bias == "all" or (cfg.bias == "lora_only" and ".base_layer." in pname)
            )
            p.requires_grad_(lora or saved or bias)

    def load_adapter(
        self, adapter_dir_or_repo_id: str, adapter_name: str, is_trainable: bool = False, **kw
    ) -> None:
        """Read adapter_config.json + adapter weights and add them as a named adapter."""
        directory = resolve_model_dir(adapter_dir_or_repo_id, **kw)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        weights = _read_adapter_weights(directory)
        self._add(config, adapter_name)
        try:
            self._load_weights(weights, adapter_name, directory)
        except AdapterError:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            for pname, p in self._model.named_parameters():
                if f".{adapter_name}." in pname:
                    p.requires_grad_(False)

    def _load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
        params = dict(self._model.named_parameters())
        expected = {}
        for pname in params:
            for kind in ("lora_A", "lora_B", "modules_to_save"):
                tag = f".{kind}.{adapter_name}."
                if tag in pname:
                    disk = pname.replace(tag, f".{kind}." if kind != "modules_to_save" else ".")
                    expected[_PREFIX + disk] = pname
        cfg = self.peft_config[adapter_name]
        if cfg.bias != "none":
            for pname in params:
                if pname.endswith(".bias") and (cfg.bias == "all" or ".base_layer." in pname):
                    expected.setdefault(_PREFIX + pname, pname)
        unknown = sorted(k for k in weights if k not in expected)
        if unknown:
            raise AdapterError(
                f"{source}: adapter tensors do not match the model's modules: {', '.join(unknown[:10])}"
            )
        missing = sorted(k for k, p in expected.items() if k not in weights and ".lora_" in p)
        if missing:
            raise AdapterError(f"{source}: adapter is missing tensors: {', '.join(missing[:10])}")
        with torch.no_grad():
            for key, t in weights.items():
                p = params[expected[key]]
                if tuple(t.shape) != tuple(p.shape):
                    raise AdapterError(
                        f"{source}: tensor {key!r} has shape {tuple(t.shape)} but the model "
                        f"expects {tuple(p.shape)} (different base model or rank?)"
                    )
                p.copy_(t.to(p.dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}")
        for layer in self._lora_layers():
            if adapter_name in layer.merged_adapters:
                raise AdapterError(
                    f"adapter {adapter_name!r} is merged: unmerge_adapter() before deleting it"
                )
            for d in (layer.lora_A, layer.lora_B, layer.lora_dropout):
                if adapter_name in d:
                    del d[adapter_name]
            layer.scaling.pop(adapter_name, None)
        for w in self._save_wrappers():
            if adapter_name in w.modules_to_save:
                del w.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextmanager
    def disable_adapter(self):
        """Within the block the model behaves as the base model."""
        layers = self._lora_layers() + self._save_wrappers()
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False

    # ---- merging ------------------------------------------------------------------------------

    def merge_adapter(self) -> None:
        for layer in self._lora_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self._lora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter into the weights and return the plain base model."""
        self.merge_adapter()
        return self.unload(keep_merged=True)

    def unload(self, keep_merged: bool = False) -> nn.Module:
        """Remove every LoRA layer (without merging, unless already merged) and return the base model."""
        model = self._model
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                if module.merged_adapters and not keep_merged:
                    module.unmerge()
                _set_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                _set_module(model, name, module._current() if keep_merged else module.original_module)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def get_base_model(self) -> nn.Module:
        return self._model

    # ---- running ------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._model.generate(*args, **kwargs)

    @property
    def config(self):
        return self._model.config

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- files --------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's on-disk names (no adapter name)."""
        name = adapter_name or self.active_adapter
        cfg = self.peft_config[name]
        out = {}
        for pname, p in self._model.named_parameters():
            key = None
            for kind in ("lora_A", "lora_B"):
                if f".{kind}.{name}." in pname:
                    key = pname.replace(f".{kind}.{name}.", f".{kind}.")
            if f".modules_to_save.{name}." in pname:
                key = pname.replace(f".modules_to_save.{name}.", ".")
            if (
                key is None
                and pname.endswith(".bias")
                and cfg.bias != "none"
                and ".lora_" not in pname
                and (cfg.bias == "all" or ".base_layer." in pname)
            ):
                key = pname
            if key is not None:
                out[_PREFIX + key] = full_tensor(p.detach()).to("cpu").contiguous()
        return out

    def save_pretrained(
        self, directory: str | os.PathLike, selected_adapters: list[str] | None = None
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter (others in subfolders), all of
        them in one transaction.

        Sharded (FSDP) weights are gathered on every rank; rank 0 writes.
        """
        from ..saving import write_tensors

        states = {}
        for name in selected_adapters or list(self.peft_config):
            cfg = self.peft_config[name]
            if cfg.base_model_name_or_path is None:
                report = getattr(self._model, "load_report", None)
                cfg.base_model_name_or_path = report.directory if report is not None else None
            states[name] = self.adapter_state_dict(name)
        if world()[0] != 0:
            return
        with atomic_directory(directory) as tmp:
            for name, state in states.items():
                target = tmp if name == "default" else os.path.join(tmp, name)
                os.makedirs(target, exist_ok=True)
                write_tensors(state, os.path.join(target, WEIGHTS_NAME))
                d = self.peft_config[name].to_dict()
                d["inference_mode"] = True
                with open(os.path.join(target, CONFIG_NAME), "w", encoding="utf-8") as f:
                    json.dump(d, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir_or_repo_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kw,
    ) -> PeftModel:
        """Load a peft adapter directory (or repo id) onto a base model."""
        directory = resolve_model_dir(adapter_dir_or_repo_id, **kw)
        config = LoraConfig.from_pretrained(directory)
        weights = _read_adapter_weights(directory)
        config.init_lora_weights = False  # the weights come from the file
        peft_model = cls(model, config, adapter_name)
        try:
            peft_model._load_weights(weights, adapter_name, directory)
        except BaseException:
            peft_model.unload()  # all or nothing: the caller's model gets its own layers back
            raise
        if not is_trainable:
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return peft_model


def _read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    st_path, bin_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_BIN)
    if os.path.isfile(st_path):
        try:
            f = SafetensorsFile(st_path)
            return {k: f.get(k).clone() for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except AutolmError as e:
            raise AdapterError(str(e)) from None
    if os.path.isfile(bin_path):
        try:
            return load_bin(bin_path)
        except AutolmError as e:
            raise AdapterError(str(e)) from None
    raise AdapterError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_BIN}")


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap targeted Linear layers with fresh LoRA adapters; the base model is frozen."""
    return PeftModel(model, config, adapter_name)
