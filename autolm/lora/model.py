"""PeftModel (load / save / merge / several adapters), get_peft_model and peft's state-dict functions, with peft's
file format.

The nesting is peft's, PeftModel -> LoraModel (`.base_model`) -> the model (`.base_model.model`), so
parameter names and attribute paths equal peft's (`base_model.model.model.layers.0.self_attn.q_proj
.lora_A.default.weight`) and adapters move freely between peft and autolm: on disk
`base_model.model.<module>.lora_A.weight`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import AdapterError
from . import adapters, combine, status
from .config import HEAD_NAMES, LoraConfig, as_lora_config
from .files import PREFIX, adapter_dir, read_adapter_weights, write_adapters
from .inject import ModulesToSave, _set_module, inject_adapter
from .layers import AdapterLayer
from .mixed import mixed_batch, rows_per_input
from .tokens import TrainableTokensWrapper

logger = logging.getLogger("autolm")


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

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """adapter_names: each row's adapter (peft's mixed batch, lora.mixed)."""
        with mixed_batch(self.model, adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with mixed_batch(self.model, adapter_names, rows_per_input(kwargs)):
            return self.model.generate(*args, **kwargs)

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules carrying LoRA adapters (peft's record of what the targets matched)."""
        return [n for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)]

    def disable_adapter_layers(self) -> None:
        """Every adapter off (the base model computes) until enable_adapter_layers(), as peft's LoraModel."""
        adapters.set_disabled(self.model, True)

    def enable_adapter_layers(self) -> None:
        adapters.set_disabled(self.model, False)


class PeftModel(_Forwarding):
    """A base model with LoRA adapters; the API of peft's PeftModel."""

    _inner_name = "base_model"

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.peft_config: dict[str, LoraConfig] = {}
        self.base_model = LoraModel(model, self.peft_config)
        self.active_adapter = adapter_name
        config = as_lora_config(config, f"adapter {adapter_name!r}")
        if config.base_model_name_or_path is None:  # peft records the name the base model was loaded by
            config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        self._add(config, adapter_name)

    @property
    def _model(self) -> nn.Module:
        return self.base_model.model

    # ---- adapters -----------------------------------------------------------------------------

    def _add(self, config: LoraConfig, adapter_name: str) -> None:
        config = as_lora_config(config, f"adapter {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} is already loaded")
        if (
            config.task_type in HEAD_NAMES
        ):  # peft trains (and saves) a classifier's or QA head with the adapter
            extra = [n for n in HEAD_NAMES[config.task_type] if n not in (config.modules_to_save or [])]
            config.modules_to_save = [*(config.modules_to_save or []), *extra]
        inject_adapter(self._model, config, adapter_name)
        self.peft_config[adapter_name] = config
        active = self.active_adapter if self.active_adapter in self.peft_config else adapter_name
        self.set_adapter(active, inference_mode=self.peft_config[active].inference_mode)

    def add_adapter(
        self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """A new adapter (fresh weights) beside the others; the active adapter stays active, as in peft."""
        self._add(peft_config, adapter_name)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Run this adapter, and train it (only it) unless inference_mode, as peft."""
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r} (loaded: {sorted(self.peft_config)})")
        self.active_adapter = adapter_name
        adapters.activate(self._model, [adapter_name])
        adapters.mark_trainable(self._model, self.peft_config[adapter_name], adapter_name)
        if inference_mode:
            for p in self._model.parameters():
                p.requires_grad_(False)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **hub
    ) -> None:
        """Read adapter_config.json + adapter weights and add them as a named adapter (the active one stays)."""
        directory = adapter_dir(model_id, "load_adapter", hub)
        config = LoraConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        config.init_lora_weights = False  # the weights come from the file
        weights = read_adapter_weights(directory)
        self._add(config, adapter_name)
        try:
            adapters.load_state(self._model, config, adapter_name, weights, directory, PREFIX)
        except AdapterError:
            self.delete_adapter(adapter_name)
            raise

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
        svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
    ) -> None:  # fmt: skip
        """peft's: a new adapter combining `adapters` by `weights` (combine.COMBINATIONS: svd, linear, cat, and
        TIES / DARE / magnitude pruning at `density`), frozen and not made active; nothing where one is so named."""
        options = dict(svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                       density=density, majority_sign_method=majority_sign_method)  # fmt: skip
        combine.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, options
        )

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r} (loaded: {sorted(self.peft_config)})")
        adapters.remove(self._model, adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    @contextmanager
    def disable_adapter(self):
        """Within the block the model computes as the base model, whichever adapters are loaded."""
        adapters.set_disabled(self._model, True)
        try:
            yield
        finally:
            adapters.set_disabled(self._model, False)

    # ---- merging ------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' deltas (the active one by default) to the base weights; with safe_merge the merged
        weights are checked for NaN/inf first and a broken adapter is refused, leaving the weights as they were."""
        names = adapter_names or self.active_adapters
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r} (loaded: {sorted(self.peft_config)})")
        # a model whose modules share weights yet take adapters of their own (Zamba2's shared blocks) unties them
        # first, so that each adapter merges into its own module's weight
        getattr(self._model, "before_merge", lambda: None)()
        for layer in adapters.lora_layers(self._model):  # every layer's refusal before any layer merges
            for name in (n for n in names if n in layer.lora_A):
                layer.check_mergeable(name)
        for layer in adapters.lora_layers(self._model):
            if safe_merge:
                for name in names:
                    if (
                        name in layer.lora_A
                        and not torch.isfinite(layer.float_weight(name) + layer.delta_weight(name)).all()
                    ):
                        raise AdapterError(
                            f"NaNs (or infinities) detected in the merged weights: the adapter {name!r} seems broken"
                        )
            layer.merge(adapter_names=names)
        for wrapper in adapters.token_wrappers(self._model):
            wrapper.merge(safe_merge, names)
        if any(
            not layer.base_layer.weight.is_floating_point() for layer in adapters.lora_layers(self._model)
        ):
            logger.warning("merged into quantized layers: their weights were rounded to the layers' grid again, so "
                           "generations may differ slightly from the unmerged adapter's (merge into the model loaded "
                           "in floating point for the exact sum)")  # fmt: skip

    def unmerge_adapter(self) -> None:
        for layer in adapters.lora_layers(self._model) + adapters.token_wrappers(self._model):
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapter (or these) into the weights and return the plain base model."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload(keep_merged=True)

    def unload(self, keep_merged: bool = False) -> nn.Module:
        """Remove every LoRA layer (without merging, unless already merged) and return the base model."""
        model = self._model
        for name, module in list(model.named_modules()):
            if isinstance(module, (AdapterLayer, TrainableTokensWrapper)):
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

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        task_ids=None,
        **kwargs,
    ):
        """peft's PeftModelForCausalLM.forward: explicit arguments, so transformers' Trainer keeps these dataset
        columns (it drops the ones the forward signature does not name)."""
        return self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            labels=labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    @property
    def config(self):
        return self._model.config

    peft_type = "LORA"  # peft's PeftType.LORA (a str enum: equal to "LORA")

    @property
    def modules_to_save(self) -> set[str] | None:
        """The modules the adapters train whole (peft's union over them), None where none do."""
        names = {n for c in self.peft_config.values() for n in c.modules_to_save or []}
        return names or None

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """peft's: these adapters' weights train (or not); the others' are left as they are."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"no adapter named {unknown[0]!r} (loaded: {sorted(self.peft_config)})")
        for name in names:
            for pname in adapters.disk_names(self._model, self.peft_config[name], name):
                self._model.get_parameter(pname).requires_grad_(requires_grad)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---- files --------------------------------------------------------------------------------

    def get_layer_status(self) -> list:
        return status.get_layer_status(self)

    def get_model_status(self):
        return status.get_model_status(self)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's on-disk names (no adapter name)."""
        name = adapter_name or self.active_adapter
        if name not in self.peft_config:
            raise AdapterError(f"no adapter named {name!r} (loaded: {sorted(self.peft_config)})")
        return adapters.adapter_state(self._model, self.peft_config[name], name, PREFIX)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **_,
    ) -> None:
        """Write adapter_config.json + adapter_model.safetensors (.bin without safe_serialization) per adapter
        ("default" at the top, others in subfolders), all in one transaction. Sharded (FSDP) weights are
        gathered on every rank; rank 0 writes."""
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(
                f"selected_adapters: no adapter named {unknown[0]!r} (loaded: {sorted(self.peft_config)})"
            )
        states = {
            n: (adapters.config_dict(self._model, self.peft_config[n], n), self.adapter_state_dict(n))
            for n in names
        }
        if is_main_process:  # with peft's README.md, as peft writes it
            card = (getattr(self.get_base_model(), "name_or_path", None) or None,
                    self.peft_config[names[0]].task_type == "CAUSAL_LM")  # fmt: skip
            write_adapters(save_directory, states, safe_serialization, card)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        **hub,
    ) -> PeftModel:
        """Load a peft adapter folder (or repo id) onto a base model: in eval mode and frozen unless is_trainable."""
        directory = adapter_dir(model_id, "PeftModel.from_pretrained", hub)
        config = config or LoraConfig.from_pretrained(directory)
        weights = read_adapter_weights(directory)
        config.init_lora_weights = False  # the weights come from the file
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        try:
            adapters.load_state(peft_model._model, config, adapter_name, weights, directory, PREFIX)
        except BaseException:
            peft_model.unload()  # all or nothing: the caller's model gets its own layers back
            raise
        if not is_trainable:
            peft_model.eval()
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return peft_model


PeftModelForCausalLM = PeftModel  # peft's task-specific class: autolm's models are all causal LMs


def get_peft_model(
    model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", **_
) -> PeftModel:
    """Wrap targeted Linear layers with fresh LoRA adapters; the base model is frozen."""
    return PeftModel(model, peft_config, adapter_name)
