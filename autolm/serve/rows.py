"""How the engine's rows share a forward. Usually as one batch: new prompts left-padded together, the running
rows' caches right-aligned under a padding mask, which keeps each row's results its own.

A model whose padding reaches the real tokens' results says `rows_apart` (BLT: its patcher and global transformer
see no padding mask, so a padded row's bytes fall into other patches; the BART-style decoders and ProphetNet: their
learned positions are the cache's slots, so padding moves a row's positions; DeepSeek-V4: its compressors pool
windows of slots), or one of its layers does (a state-space mixer with an in_proj bias, which reaches its conv at
padding positions; Doge's mixture, whose routing reads other tokens of the batch); so does a model whose RoPE tables
switch with the length while its rows straddle the switch (LongRoPE: a batch's tables follow its longest row). Its rows
run apart: each prompt is
prefilled alone, and the batch cache is `Rows`, each row's own cache (unpadded), which a decode step runs one row at
a time under that row's adapter; a row running alone has its plain cache (speculation takes it as it is). Each
request's tokens are then those of generate() on its prompt alone, continuous batching, chunked prefill and prefix
caching unchanged around it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..errors import GenerationError
from ..generation.restart import switch_length
from ..step import decoder as step_decoder
from . import sequence
from .sequence import adapters_of


def servable(model):
    """The model, which the engine can serve: GenerationError for one whose reference sliding window
    (nn.attention.ReferenceWindow) needs each row's whole first prompt as its cache's prefill, or one that says
    why not (`unservable`: XLM's and XLNet's generation keeps no KV cache)."""
    if getattr(model, "unservable", None):
        raise GenerationError(f"{model.config.model_type} cannot be served: {model.unservable}")
    if getattr(model, "reference_prompt", False):
        raise GenerationError(f"{model.config.model_type} cannot be served: its reference sliding window always "
                              "attends each row's whole first prompt, which the engine's shared cache, chunked "
                              "prefill and prefix reuse do not keep")  # fmt: skip
    return model


def apart(model, lengths: list[int] | tuple[int, ...] = ()) -> bool:
    """Whether rows of these lengths (the tokens each row's next forward runs over) run apart: the model says so
    (`rows_apart`), one of its layers does (a state-space mixer whose in_proj bias reaches its conv at padding
    positions, Doge's mixture), or its RoPE tables switch with the length (LongRoPE) and the rows straddle the
    switch: a batch's tables follow its longest row, so a shorter row would take the long factors before its own
    switch (rows on one side of it share a batch as usual)."""
    if not isinstance(model, torch.nn.Module):
        return bool(getattr(model, "rows_apart", False))
    if model not in _APART:
        said = any(getattr(m, "rows_apart", False) for m in model.modules())  # the model itself among them
        _APART[model] = (said, switch_length(model))
    said, switch = _APART[model]
    return said or (switch is not None and bool(lengths) and min(lengths) < switch <= max(lengths))


_APART: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (it says so, its switch length)


class Rows:
    """The batch cache of a model whose rows run apart: each row's own cache of one row."""

    def __init__(self, caches: list):
        self.caches = caches


def prefill_groups(model, seqs: list, whole: bool) -> list[list]:
    """The new requests' prefill batches: one left-padded batch, or each request alone (`whole`: its prompt attends
    both ways unpadded; or the model's rows run apart)."""
    if not seqs:
        return []
    return [[s] for s in seqs] if whole or apart(model, [len(s.prompt) for s in seqs]) else [seqs]


def gather(model, rows: list[tuple], longest: int):
    """The batch cache of rows (cache, row, tokens): sequence.gather's right-aligned batch, or with rows apart each
    row's own cache (Rows; a lone row's plain cache)."""
    rows = [
        (c.caches[r], 0, n) if isinstance(c, Rows) else (c, r, n) for c, r, n in rows
    ]  # rows that ran apart
    if not apart(model, [n + 1 for _, _, n in rows]):  # their next step's lengths
        return sequence.gather(model, rows, longest)
    caches = [_own(model, c, r, n) for c, r, n in rows]
    return caches[0] if len(caches) == 1 else Rows(caches)


def _own(model, cache, row: int, n: int):
    """Row `row` of a cache as a cache of its own (the cache itself where it holds that row alone)."""
    if cache.batch_size == 1 and cache.length == n:
        return cache
    return sequence.gather(model, [(cache, row, n)], n)


def decoder(model, cache, mask: torch.Tensor | None, seqs: list) -> Callable:
    """The decode step for the batch (autolm.step's), or over Rows each row's own step, one row at a time
    (tokens and positions (B, 1) -> logits (B, V); the engine's padding mask is not needed there)."""
    if not isinstance(cache, Rows):
        return step_decoder(model, cache, mask)
    steps = []
    for c, s in zip(cache.caches, seqs):
        with adapters_of(model, [s]):
            steps.append(step_decoder(model, c, None))

    def run(tokens: torch.Tensor, _mask, positions: torch.Tensor, _cache) -> torch.Tensor:
        out = []
        for i, (c, s, step) in enumerate(zip(cache.caches, seqs, steps)):
            with adapters_of(model, [s]):
                out.append(step(tokens[i : i + 1], None, positions[i : i + 1], c))
        return torch.cat(out)

    return run
