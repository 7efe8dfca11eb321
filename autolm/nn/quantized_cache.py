"""transformers' QuantizedCache (generate(cache_implementation="quantized", cache_config={...})): keys and values
kept quantized (kv_quant.py: the "quanto", "hqq" and "fp8" backends' arithmetic), the newest tokens in full precision
with the integer backends.

As transformers' QuantizedLayer, per layer: the first forward (the prompt) quantizes all its keys and values and
attends over them unquantized; every later forward attends over the dequantized tokens, the full-precision
residual and its new tokens, and then, where the residual and the new tokens reach `residual_length`, quantizes
all of those again (the dequantized ones once more, with groups over the whole sequence) and empties the residual;
else the new tokens join the residual. As Fp8QuantizedLayer, "fp8" keeps no residual: the first forward quantizes
each layer's keys and values per tensor (its scale kept), every later one appends its new tokens quantized at that
scale and attends over all the tokens dequantized (its new ones too). Beam search reorders as transformers: the
residual at once, the integer backends' quantized tokens only when next dequantized (the beams' choices kept,
composed, in `pending` until then; requantizing bakes them in), the fp8 codes at once (one scale for the whole
tensor). Only models whose every layer attends over all earlier tokens with its own keys take one (transformers'
condition), and decoding runs the general forward (no one-token or compiled step).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import GenerationError
from .cache import KVCache
from .kv_quant import Fp8, Packed, dequantize, fp8, fp8_append, quantize

# per backend: the nbits and axes it takes (transformers' checks)
_BACKENDS = {"quanto": ((2, 4), (0, -1)), "hqq": ((1, 2, 3, 4, 8), (0, 1))}
DEFAULTS = {"nbits": 4, "axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 128}


def check_settings(backend: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with transformers' defaults for those unset (None); GenerationError naming a bad one."""
    if backend not in (*_BACKENDS, "fp8"):
        raise GenerationError(f"cache_config['backend'] must be 'quanto', 'hqq' or 'fp8', got {backend!r}")
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise GenerationError(
            f"cache_config has unknown keys {unknown} (expected backend, {', '.join(DEFAULTS)})"
        )
    if backend == "fp8":  # per tensor, no residual: none of the group-wise settings (as transformers)
        given = [k for k in DEFAULTS if settings.get(k) is not None]
        if given:
            raise GenerationError(f"cache_config {given} must be unset for the fp8 backend (it quantizes per tensor "
                                  f"with no residual); the quanto and hqq backends take them")  # fmt: skip
        return dict.fromkeys(DEFAULTS)
    out = {k: DEFAULTS[k] if settings.get(k) is None else settings[k] for k in DEFAULTS}
    bits, axes = _BACKENDS[backend]
    for name, allowed in (("nbits", bits), ("axis_key", axes), ("axis_value", axes)):
        if not _is_int(out[name]) or out[name] not in allowed:
            raise GenerationError(
                f"cache_config['{name}'] for the {backend} backend must be one of {list(allowed)}, got {out[name]!r}"
            )
    for name, lo in (("q_group_size", 1), ("residual_length", 0)):
        if not _is_int(out[name]) or out[name] < lo:
            raise GenerationError(f"cache_config['{name}'] must be an integer >= {lo}, got {out[name]!r}")
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model(model) -> None:
    """GenerationError unless every layer of `model` attends over all earlier tokens with its own keys and values
    (no recurrent, sliding-window, chunked or KV-sharing layer), as transformers' QuantizedCache requires."""
    config = model.config
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = ("sliding_attention" if getattr(config, "sliding_window", None) is not None else
                "chunked_attention" if getattr(config, "attention_chunk_size", None) is not None else None)  # fmt: skip
        types = [kind] if kind else []
    other = set(types) - {"full_attention"}
    if getattr(model, "recurrent", False) or any(hd == 0 for _, hd in model.attention_shapes()):
        other.add("recurrent")
    if getattr(config, "num_kv_shared_layers", 0):
        other.add("kv_shared")
    if other:
        raise GenerationError(
            f"cache_implementation='quantized' needs a model whose layers all use full attention (as transformers' "
            f"QuantizedCache); {type(model).__name__} has {sorted(other)} layers"
        )


class QuantizedCache(KVCache):
    """transformers' QuantizedCache(backend, config, nbits, axis_key, axis_value, q_group_size, residual_length)."""

    appends_only = True  # autolm.step: decode with the general forward, which calls update()

    def __init__(self, backend: str = "quanto", config: Any = None, nbits: int | None = None,
                 axis_key: int | None = None, axis_value: int | None = None, q_group_size: int | None = None,
                 residual_length: int | None = None):  # fmt: skip
        super().__init__(config=config)
        s = check_settings(backend, dict(nbits=nbits, axis_key=axis_key, axis_value=axis_value,
                                         q_group_size=q_group_size, residual_length=residual_length))  # fmt: skip
        self.backend, self.nbits, self.q_group_size = backend, s["nbits"], s["q_group_size"]
        self.axis_key, self.axis_value, self.residual_length = (
            s["axis_key"],
            s["axis_value"],
            s["residual_length"],
        )
        self.quantized: dict[int, tuple[Packed | Fp8, Packed | Fp8]] = {}  # layer -> quantized (keys, values)
        self.residual: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # layer -> full-precision (keys, values)
        self.pending: dict[int, torch.Tensor] = {}  # layer -> beam rows its quantized tokens still take
        self._rows: int | None = None
        self._checked = False

    @classmethod
    def from_cache_config(cls, cache_config: dict[str, Any] | None) -> QuantizedCache:
        """The cache generate(cache_implementation="quantized", cache_config=...) makes ("backend": "quanto" where
        unset)."""
        if cache_config is not None and not isinstance(cache_config, dict):
            raise GenerationError(f"cache_config must be a dict, got {type(cache_config).__name__}")
        settings = {k: v for k, v in (cache_config or {}).items() if k != "config"}
        backend = settings.pop("backend", "quanto")
        check_settings(backend, settings)
        return cls(backend, **settings)

    def ensure_for(self, model, batch_size: int, capacity: int) -> QuantizedCache:
        """This cache, checked against `model` (check_model) at its first forward."""
        if not self._checked:
            check_model(model)
            self._checked = True
        if self._rows is None:
            self._rows = batch_size
        return self

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        if n == 0:
            self.quantized, self.residual, self.pending = {}, {}, {}
        elif n < self._length:
            raise GenerationError(
                f"a quantized cache holds {self._length} tokens and cannot go back to {n} (its tokens are "
                "quantized together)"
            )
        self._length = n

    @property
    def batch_size(self) -> int:
        return self._rows

    @property
    def capacity(self) -> int:
        return self._length

    def reserve(self, needed: int) -> None:
        """Nothing to reserve: the quantized tensors are made anew."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kv_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv, T, hd); return every token's keys and values (the quantized ones dequantized)."""
        if layer not in self.quantized:
            self.quantized[layer] = self._quantize(k, v)
            return k, v
        if self.backend == "fp8":  # appended at the first forward's scale; every token back dequantized
            self.quantized[layer] = tuple(fp8_append(q, t) for q, t in zip(self.quantized[layer], (k, v)))
            return tuple(dequantize(q) for q in self.quantized[layer])
        old = self.residual.get(layer)
        held = self._held(layer)
        keys = torch.cat([held[0]] + ([old[0]] if old else []) + [k], dim=-2)
        values = torch.cat([held[1]] + ([old[1]] if old else []) + [v], dim=-2)
        if (old[0].shape[-2] if old else 0) + k.shape[-2] >= self.residual_length:
            self.quantized[layer] = self._quantize(keys, values)
            self.residual.pop(layer, None)
            self.pending.pop(layer, None)  # the beams' order is now in the quantized tokens
        else:
            self.residual[layer] = (
                (k, v) if not old else (torch.cat([old[0], k], -2), torch.cat([old[1], v], -2))
            )
        return keys, values

    def _held(self, layer: int) -> list[torch.Tensor]:
        """The layer's quantized keys and values dequantized, in the beams' order (`pending` applied)."""
        held = [dequantize(q) for q in self.quantized[layer]]
        rows = self.pending.get(layer)
        return held if rows is None else [t.index_select(0, rows.to(t.device)) for t in held]

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[Packed | Fp8, Packed | Fp8]:
        if self.backend == "fp8":
            return fp8(k), fp8(v)
        q = (self.backend, self.nbits)
        return (
            quantize(k.contiguous(), *q, self.axis_key, self.q_group_size, "keys"),
            quantize(v.contiguous(), *q, self.axis_value, self.q_group_size, "values"),
        )

    @property
    def layers(self) -> list[SimpleNamespace]:
        """Per layer, every cached token's keys and values (B, n_kv, tokens, hd), the quantized ones dequantized."""
        out = []
        for layer in sorted(self.quantized):
            kv = self._held(layer)
            if layer in self.residual:
                kv = [torch.cat([t, r], dim=-2) for t, r in zip(kv, self.residual[layer])]
            out.append(SimpleNamespace(keys=kv[0], values=kv[1]))
        return out

    @property
    def nbytes(self) -> int:
        """The bytes the cache holds: packed codes (float8 ones), scales and shifts, and the full-precision residual."""
        held = sum(q.nbytes for pair in self.quantized.values() for q in pair)
        return held + sum(t.numel() * t.element_size() for pair in self.residual.values() for t in pair)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]. As transformers: the residual and fp8's
        codes at once; the integer backends' quantized tokens when next dequantized (so they are not quantized
        twice), the index composed with any still pending."""
        for layer, pair in self.quantized.items():
            if self.backend == "fp8":
                self.quantized[layer] = tuple(replace(q, codes=q.codes.index_select(0, index.to(q.codes.device)))
                                              for q in pair)  # fmt: skip
                continue
            rows, old = index.to(pair[0].scale.device), self.pending.get(layer)
            self.pending[layer] = rows.clone() if old is None else old.index_select(0, rows)
            if layer in self.residual:
                self.residual[layer] = tuple(t.index_select(0, rows) for t in self.residual[layer])

    def mark(self):
        raise GenerationError("a quantized cache cannot be used with speculative decoding in autolm")
