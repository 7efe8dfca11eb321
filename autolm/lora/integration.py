"""transformers' PEFT integration on the model itself (`model.load_adapter(path)`, `add_adapter`, `set_adapter`,
`disable_adapters`, `enable_adapters`, `active_adapters()`, `get_adapter_state_dict`, `delete_adapter`): the LoRA
layers go into the model's own Linear layers, without a PeftModel around it, and save_pretrained then writes the
active adapter in peft's format, as transformers does."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import AdapterError
from . import adapters
from .config import LoraConfig, as_lora_config
from .files import PREFIX, adapter_dir, read_adapter_weights, write_adapters
from .inject import inject_adapter


class PeftAdapterMixin:
    """The methods transformers' PreTrainedModel gets from its PeftAdapterMixin, for an nn.Module."""

    _hf_peft_config_loaded = False

    def _adapter_configs(self) -> dict[str, LoraConfig]:
        if not self._hf_peft_config_loaded:
            raise AdapterError("no adapter loaded: load_adapter(path) or add_adapter(LoraConfig(...)) first")
        return self.peft_config

    def _check_names(self, names: list[str]) -> None:
        configs = self._adapter_configs()
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r} (loaded: {sorted(configs)})")

    def _inject(self, config: LoraConfig, name: str) -> LoraConfig:
        config = as_lora_config(config, f"adapter {name!r}")
        if self._hf_peft_config_loaded and name in self.peft_config:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self, "name_or_path", None) or None
        inject_adapter(self, config, name)
        if not self._hf_peft_config_loaded:
            self.peft_config: dict[str, LoraConfig] = {}
            self._hf_peft_config_loaded = True
        self.peft_config[name] = config
        return config

    def add_adapter(self, adapter_config: LoraConfig, adapter_name: str | None = None) -> None:
        """A new adapter with fresh weights, made the active one; only its LoRA weights train."""
        name = adapter_name or "default"
        config = self._inject(adapter_config, name)
        self.set_adapter(name)
        adapters.mark_trainable(self, config, name)

    def load_adapter(
        self,
        peft_model_id: str | os.PathLike | None = None,
        adapter_name: str | None = None,
        peft_config: dict[str, Any] | None = None,
        adapter_state_dict: dict[str, torch.Tensor] | None = None,
        is_trainable: bool = False,
        **hub: Any,
    ) -> None:
        """An adapter from a peft folder (or repo id), or from a config dict and a state dict; made active."""
        name = adapter_name or "default"
        if peft_model_id is not None:
            source = adapter_dir(peft_model_id, "load_adapter", hub)
            config = LoraConfig.from_pretrained(source)
            weights = read_adapter_weights(source) if adapter_state_dict is None else adapter_state_dict
        elif peft_config is not None and adapter_state_dict is not None:
            source, config, weights = (
                "adapter_state_dict",
                LoraConfig.from_dict(peft_config),
                adapter_state_dict,
            )
        else:
            raise AdapterError("load_adapter needs peft_model_id, or peft_config and adapter_state_dict")
        weights = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in weights.items()}
        config.init_lora_weights = False  # the weights come from the file
        config.inference_mode = not is_trainable
        self._inject(config, name)
        try:
            adapters.load_state(self, config, name, weights, source, PREFIX)
        except AdapterError:
            self.delete_adapter(name)
            raise
        self.set_adapter(name)
        for pname, p in self.named_parameters():
            trained = ".lora_" in pname or ".modules_to_save." in pname or adapters.TOKEN_ROWS in pname
            if adapters.of_adapter(pname, name) and trained:
                p.requires_grad_(is_trainable)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Run these adapters; their LoRA weights train, other adapters' do not (as transformers)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_names(names)
        adapters.activate(self, names)
        for pname, p in self.named_parameters():
            if ".lora_" in pname or adapters.TOKEN_ROWS in pname:
                p.requires_grad_(any(adapters.of_adapter(pname, n) for n in names))

    def active_adapters(self) -> list[str]:
        self._adapter_configs()
        layers = adapters.lora_layers(self)
        return list(layers[0].active_adapters) if layers else []

    def active_adapter(self) -> str:
        return self.active_adapters()[0]

    def disable_adapters(self) -> None:
        """The model computes as its base model until enable_adapters()."""
        self._adapter_configs()
        adapters.set_disabled(self, True)

    def enable_adapters(self) -> None:
        self._adapter_configs()
        adapters.set_disabled(self, False)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for name in names:
            adapters.remove(self, name)
            del self.peft_config[name]
        if not self.peft_config:
            self._hf_peft_config_loaded = False

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The adapter's tensors (the active one's by default) named as in peft's files, without its prefix."""
        name = adapter_name or self.active_adapters()[0]
        self._check_names([name])
        names = adapters.disk_names(self, self.peft_config[name], name)
        if state_dict is not None:
            return adapters.from_state_dict(self, names, state_dict)
        return adapters.adapter_state(self, self.peft_config[name], name, "")

    def save_adapter(self, save_directory: str | os.PathLike, safe_serialization: bool = True) -> None:
        """What transformers' save_pretrained writes for a model with adapters: the active adapter, peft's format."""
        name = self.active_adapters()[0]
        config = adapters.config_dict(self, self.peft_config[name], name)
        state = adapters.adapter_state(self, self.peft_config[name], name, PREFIX)
        write_adapters(save_directory, {"default": (config, state)}, safe_serialization)
