"""LoRA in peft's own format: LoraConfig, get_peft_model, PeftModel (load / save / merge / adapters).

Module and key names follow peft, so adapters move freely between peft and autolm:
in memory `...q_proj.lora_A.<adapter>.weight`, on disk `base_model.model.<module>.lora_A.weight`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import full, world
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
DEFAULT_TARGETS = ["q_proj", "v_proj"]  # peft's default for llama, mistral, qwen2, qwen3
_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    """peft's LoraConfig fields and defaults (the ones LoRA on Linear layers uses)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = "CAUSAL_LM"
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise AdapterError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.use_dora:
            raise AdapterError("LoraConfig: use_dora=True (DoRA) is not supported by autolm yet")
        if self.peft_type != "LORA":
            raise AdapterError(f"adapter type {self.peft_type!r} is not supported (only LORA)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_pretrained(cls, directory: str) -> "LoraConfig":
        from .config import load_config_file

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise AdapterError(f"{directory}: no {CONFIG_NAME} (not a peft adapter directory)")
        d = load_config_file(path, AdapterError)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return d

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """r and alpha for a module, honouring rank_pattern / alpha_pattern (peft's matching)."""
        r = next((v for p, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.r)
        a = next((v for p, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.lora_alpha)
        return r, a

    def matches(self, key: str, module: nn.Module) -> bool:
        """peft's target rule: regex string (full match), exact name or suffix, or 'all-linear'."""
        if not isinstance(module, nn.Linear):
            return False
        if self.exclude_modules:
            ex = self.exclude_modules
            if (re.fullmatch(ex, key) if isinstance(ex, str)
                    else key in ex or any(key.endswith(f".{e}") for e in ex)):
                return False
        targets = self.target_modules if self.target_modules is not None else DEFAULT_TARGETS
        if isinstance(targets, str):
            if targets.lower() == "all-linear":
                found = key.split(".")[-1] != "lm_head"
            else:
                found = re.fullmatch(targets, key) is not None
        else:
            found = key in targets or any(key.endswith(f".{t}") for t in targets)
        if found and self.layers_to_transform is not None:
            m = re.search(r"\.layers\.(\d+)\.", f".{key}")
            wanted = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            found = m is not None and int(m.group(1)) in wanted
        return found


class LoraLinear(nn.Module):
    """A Linear layer with LoRA adapters: y = base(x) + sum_a B_a(A_a(dropout(x))) * scaling_a."""

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool, init: bool | str) -> None:
        w = self.base_layer.weight
        device = w.device if w.device.type != "meta" else None
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if rslora else alpha / r
        if init is True or init == "default":
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            nn.init.zeros_(self.lora_B[name].weight)
        if name not in self.active_adapters:
            self.active_adapters = [name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A (out, in), computed in fp32."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    def merge(self, names: list[str] | None = None) -> None:
        for name in names or self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                w = self.base_layer.weight
                w.data = (w.data.float() + self.delta_weight(name)).to(w.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            w = self.base_layer.weight
            w.data = (w.data.float() - self.delta_weight(name)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disable_adapters:
            if self.merged_adapters:
                raise AdapterError("cannot disable adapters while they are merged: unmerge_adapter() first")
            return y
        for name in self.active_adapters:
            if name in self.lora_A and name not in self.merged_adapters:
                a = self.lora_A[name]
                y = y + self.lora_B[name](a(self.lora_dropout[name](x.to(a.weight.dtype)))).to(y.dtype) * self.scaling[name]
        return y


class ModulesToSave(nn.Module):
    """peft's ModulesToSaveWrapper: the original module plus a trainable copy per adapter."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

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

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every targeted Linear in a LoraLinear (or add an adapter to an existing one); return their names."""
    if config.fan_in_fan_out:
        config.fan_in_fan_out = False  # peft does the same for nn.Linear: the weight is (out, in)
    targeted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            base_name, base = name, module.base_layer
        elif ".base_layer" in name or ".lora_" in name or isinstance(module, ModulesToSave) or ".modules_to_save." in name or ".original_module" in name:
            continue
        else:
            base_name, base = name, module
        if not config.matches(base_name, base):
            continue
        layer = module if isinstance(module, LoraLinear) else LoraLinear(base)
        if layer is not module:
            _set_module(model, name, layer)
        r, alpha = config.rank_and_alpha(base_name)
        layer.add_adapter(adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init_lora_weights)
        targeted.append(name)
    if not targeted:
        raise AdapterError(
            f"target modules {config.target_modules!r} match no Linear layer of the model "
            f"(its Linear layers end in: {sorted({n.split('.')[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})})"
        )
    for name in config.modules_to_save or []:
        found = False
        for mod_name, module in list(model.named_modules()):
            if mod_name == name or mod_name.endswith(f".{name}"):
                wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
                if wrapper is not module:
                    _set_module(model, mod_name, wrapper)
                wrapper.add_adapter(adapter_name)
                found = True
        if not found:
            raise AdapterError(f"modules_to_save entry {name!r} matches no module of the model")
    return targeted


class PeftModel(nn.Module):
    """A base model with LoRA adapters; the API of peft's PeftModel."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self._add(config, adapter_name)

    # ---- adapters -----------------------------------------------------------------------------

    def _add(self, config: LoraConfig, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} is already loaded")
        inject_adapter(self.base_model, config, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config else adapter_name)
        self._mark_trainable()

    def _lora_layers(self):
        return [m for m in self.base_model.modules() if isinstance(m, LoraLinear)]

    def _save_wrappers(self):
        return [m for m in self.base_model.modules() if isinstance(m, ModulesToSave)]

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
        for pname, p in self.base_model.named_parameters():
            lora = f".lora_A.{name}." in pname or f".lora_B.{name}." in pname
            saved = f".modules_to_save.{name}." in pname
            bias = pname.endswith(".bias") and (cfg.bias == "all" or (cfg.bias == "lora_only" and ".base_layer." in pname))
            p.requires_grad_(lora or saved or bias)

    def load_adapter(self, adapter_dir_or_repo_id: str, adapter_name: str, is_trainable: bool = False, **kw) -> None:
        """Read adapter_config.json + adapter weights and add them as a named adapter."""
        from .hub import resolve_model_dir

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
            for pname, p in self.base_model.named_parameters():
                if f".{adapter_name}." in pname:
                    p.requires_grad_(False)

    def _load_weights(self, weights: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
        params = dict(self.base_model.named_parameters())
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
            raise AdapterError(f"{source}: adapter tensors do not match the model's modules: {', '.join(unknown[:10])}")
        missing = sorted(k for k, p in expected.items() if k not in weights and ".lora_" in p)
        if missing:
            raise AdapterError(f"{source}: adapter is missing tensors: {', '.join(missing[:10])}")
        with torch.no_grad():
            for key, t in weights.items():
                p = params[expected[key]]
                if tuple(t.shape) != tuple(p.shape):
                    raise AdapterError(f"{source}: tensor {key!r} has shape {tuple(t.shape)} but the model "
                                       f"expects {tuple(p.shape)} (different base model or rank?)")
                p.copy_(t.to(p.dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}")
        for layer in self._lora_layers():
            if adapter_name in layer.merged_adapters:
                raise AdapterError(f"adapter {adapter_name!r} is merged: unmerge_adapter() before deleting it")
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
        model = self.base_model
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
        return self.base_model

    # ---- running ------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.base_model.config

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- files --------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's on-disk names (no adapter name)."""
        name = adapter_name or self.active_adapter
        cfg = self.peft_config[name]
        out = {}
        for pname, p in self.base_model.named_parameters():
            key = None
            for kind in ("lora_A", "lora_B"):
                if f".{kind}.{name}." in pname:
                    key = pname.replace(f".{kind}.{name}.", f".{kind}.")
            if f".modules_to_save.{name}." in pname:
                key = pname.replace(f".modules_to_save.{name}.", ".")
            if key is None and pname.endswith(".bias") and cfg.bias != "none" and ".lora_" not in pname:
                if cfg.bias == "all" or ".base_layer." in pname:
                    key = pname
            if key is not None:
                out[_PREFIX + key] = full(p.detach()).to("cpu").contiguous()
        return out

    def save_pretrained(self, directory: str, selected_adapters: list[str] | None = None) -> None:
        """Write adapter_config.json + adapter_model.safetensors per adapter (others in subfolders), atomically.

        Sharded (FSDP) weights are gathered on every rank; rank 0 writes.
        """
        from safetensors.torch import save_file

        from .saving import atomic_directory

        for name in selected_adapters or list(self.peft_config):
            target = directory if name == "default" else os.path.join(directory, name)
            cfg = self.peft_config[name]
            if cfg.base_model_name_or_path is None:
                report = getattr(self.base_model, "load_report", None)
                cfg.base_model_name_or_path = report.directory if report is not None else None
            state = self.adapter_state_dict(name)
            if world()[0] != 0:
                continue
            with atomic_directory(target) as tmp:
                save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
                d = cfg.to_dict()
                d["inference_mode"] = True
                with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
                    json.dump(d, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir_or_repo_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, **kw) -> "PeftModel":
        """Load a peft adapter directory (or repo id) onto a base model."""
        from .hub import resolve_model_dir

        directory = resolve_model_dir(adapter_dir_or_repo_id, **kw)
        config = LoraConfig.from_pretrained(directory)
        weights = _read_adapter_weights(directory)
        config.init_lora_weights = False  # the weights come from the file
        peft_model = cls(model, config, adapter_name)
        peft_model._load_weights(weights, adapter_name, directory)
        if not is_trainable:
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return peft_model


def _read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    from .checkpoint import SafetensorsFile, load_bin

    st_path, bin_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_BIN)
    if os.path.isfile(st_path):
        try:
            f = SafetensorsFile(st_path)
            return {k: f.get(k).clone() for k in f.keys()}
        except Exception as e:
            raise AdapterError(str(e)) from None
    if os.path.isfile(bin_path):
        try:
            return load_bin(bin_path)
        except Exception as e:
            raise AdapterError(str(e)) from None
    raise AdapterError(f"{directory}: no {WEIGHTS_NAME} or {WEIGHTS_BIN}")


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap targeted Linear layers with fresh LoRA adapters; the base model is frozen."""
    return PeftModel(model, config, adapter_name)
