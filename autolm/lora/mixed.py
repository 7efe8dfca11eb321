"""peft's mixed adapter batches: `model(**batch, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`
run each row with the adapter it names ("__base__": none), as peft's LoRA layers, modules_to_save copies and
trainable tokens do. Inference only, with no adapter merged and no DoRA adapter named, as in peft. The rows run
through the eager step (compiled graphs hold the adapters as they were traced)."""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import AdapterError
from .inject import ModulesToSave
from .layers import AdapterLayer
from .tokens import TrainableTokensWrapper

BASE = "__base__"  # peft's name for a row without adapter


def _layers(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if isinstance(m, (AdapterLayer, ModulesToSave, TrainableTokensWrapper))
    ]


def check(model: nn.Module, names, strict: bool = True, layers: list[nn.Module] | None = None) -> list[str]:
    """The names, checked as peft checks them: a list of str, known adapters, in eval mode, none merged, no DoRA
    (peft's rule; strict=False lets DoRA adapters' rows run, as autolm's layers compute them per row too)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise AdapterError(f"adapter_names must be a list of adapter names (one per row), got {names!r}")
    if model.training:
        raise AdapterError("Cannot pass `adapter_names` when the model is in training mode.")
    layers = _layers(model) if layers is None else layers
    known = {n for m in layers if isinstance(m, AdapterLayer) for n in m.lora_A}
    unknown = sorted({n for n in names if n != BASE} - known)
    if unknown:
        raise AdapterError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    for m in layers:
        if getattr(m, "merged_adapters", None):
            raise AdapterError("Cannot pass `adapter_names` when there are merged adapters, please call "
                               "`unmerge_adapter` first.")  # fmt: skip
        if strict and isinstance(m, AdapterLayer) and any(n in m.lora_magnitude_vector for n in names):
            raise AdapterError("Cannot pass `adapter_names` when DoRA is enabled.")
    return list(names)


def rows_per_input(kwargs: dict) -> int:
    """The rows generate() runs per input: num_beams under beam search, else num_return_sequences."""
    cfg = kwargs.get("generation_config")

    def get(key: str) -> int:
        value = kwargs.get(key, getattr(cfg, key, None))
        return int(value) if value else 1

    return get("num_beams") if get("num_beams") > 1 else get("num_return_sequences")


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names, repeat: int = 1, strict: bool = True):
    """Within the block each row runs with its adapter: `names` one per input, each repeated `repeat` times
    (generate's rows: num_beams or num_return_sequences per input); names None: the block runs as it is."""
    if names is None:
        yield
        return
    layers = _layers(model)  # one walk over the modules per forward
    rows = [n for n in check(model, names, strict, layers) for _ in range(repeat)]
    for m in layers:
        m.row_adapters = rows
    try:
        yield
    finally:
        for m in layers:
            m.row_adapters = None
