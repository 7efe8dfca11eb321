"""The static KV cache: per-layer key/value buffers written at the positions a forward gives, and the recurrent
state of layers that keep one instead (linear attention, state-space and short-convolution layers)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from ..errors import GenerationError


class KVCache:
    """Per-layer key/value buffers (B, n_kv, capacity, hd), written at the positions a forward pass gives.

    The buffers are allocated once; `static=True` marks their addresses fixed for torch.compile, so a
    compiled decode step can be captured in a CUDA graph. In eager mode a write past the end grows
    them (to at least twice the capacity), so the cache also works as a growing cache. `length` counts
    the tokens stored, kept by the model's forward outside any compiled region. Sliding-window layers
    keep every position and rely on the attention mask for the window.

    A recurrent layer (no keys or values: its buffers are zero wide) keeps its state after the first `length`
    tokens in `states[layer]`, a tuple of tensors whose first dimension is the batch. A state cannot go back to
    an earlier token: `length` may be set back to 0 (every state dropped), never to another shorter length; a
    `mark` of the cache (its states copied) can be gone back to with `restore`.

    `prefill` is the number of tokens its first forward wrote (None before it; set back to None with `length`
    0): the prompt that reference sliding-window layers (nn.attention.ReferenceWindow) always attend.
    """

    def __init__(self, *, capacity: int = 256, static: bool = False, config: Any = None):
        """An empty cache (transformers' `DynamicCache()`, or `DynamicCache(config=...)`) until the first forward
        it is given to: that model's own buffers then (ensure_for); `of_shapes` makes one with buffers."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.states: dict[int, tuple[torch.Tensor, ...]] = {}
        self._length = 0
        self.prefill: int | None = None
        self._capacity = capacity  # an empty cache's capacity once it gets buffers (at least what is needed)
        self.static = static

    def ensure_for(self, model, batch_size: int, capacity: int) -> KVCache:
        """This cache, given `model`'s buffers (model.make_cache) first where it was made empty."""
        if not self.keys:
            made = model.make_cache(batch_size, max(capacity, self._capacity))
            self.keys, self.values, self.static = made.keys, made.values, made.static
        return self

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        if n < self._length and self.states:
            if n:
                raise GenerationError(
                    f"the cache holds recurrent layers' states after {self._length} tokens, which cannot be set back "
                    f"to {n} tokens (cropping and prefix reuse need that)"
                )
            self.states = {}
        if n == 0:
            self.prefill = None  # the next forward's tokens are a new prompt
        self._length = n

    def mark(self) -> tuple[int, dict[int, tuple[torch.Tensor, ...]]]:
        """Where the cache stands (its length and copies of its recurrent states), for `restore` to go back to:
        how speculative decoding drops a rejected candidate from a recurrent layer."""
        return self._length, {layer: tuple(t.clone() for t in state) for layer, state in self.states.items()}

    def restore(self, mark: tuple[int, dict[int, tuple[torch.Tensor, ...]]]) -> None:
        """Back to a `mark` of this cache (keys and values past its length are overwritten by the next forward)."""
        self._length, self.states = mark[0], dict(mark[1])

    def state(self, layer: int) -> tuple[torch.Tensor, ...] | None:
        """A recurrent layer's state after the `length` tokens cached, or None before its first token."""
        return self.states.get(layer)

    def set_state(self, layer: int, state: tuple[torch.Tensor, ...]) -> None:
        self.states[layer] = state

    @property
    def layers(self) -> list[SimpleNamespace]:
        """transformers 5's view of a cache: per layer `keys` and `values` (B, n_kv, tokens so far, hd)."""
        n = self.length
        return [SimpleNamespace(keys=k[:, :, :n], values=v[:, :, :n]) for k, v in zip(self.keys, self.values)]

    def crop(self, max_length: int) -> None:
        """Drop -max_length tokens from the end (transformers 5's crop), or keep the first max_length (4's)."""
        self.length = max(0, min(self.length, max_length if max_length >= 0 else self.length + max_length))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor, kv_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at cache_position (T,); return the first kv_length keys and values."""
        # under torch.autocast k and v come in the autocast dtype (v) or promoted by RoPE (k): kept in the cache's
        self.keys[layer].index_copy_(2, cache_position, k.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(2, cache_position, v.to(self.values[layer].dtype))
        return self.keys[layer][:, :, :kv_length], self.values[layer][:, :, :kv_length]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` tokens in all (growing to at least twice the capacity when short)."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                bigger = buf.new_zeros(buf.shape[0], buf.shape[1], new_cap, buf.shape[3])
                bigger[:, :, : buf.shape[2]] = buf
                buffers[i] = bigger

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i], written in place."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf.copy_(buf.index_select(0, index.to(buf.device)))
        for layer, state in self.states.items():
            self.states[layer] = tuple(t.index_select(0, index.to(t.device)) for t in state)

    @classmethod
    def of_shapes(cls, batch_size: int, shapes: list[tuple[int, int]], capacity: int, dtype: torch.dtype,
                  devices: list, static: bool = False) -> KVCache:  # fmt: skip
        """A cache with buffers (B, n_kv, capacity, hd) for each layer's (n_kv, hd), on that layer's device
        (hd 0: a recurrent layer's, which holds no keys)."""
        cache = cls(capacity=capacity, static=static)
        for (n_kv, hd), device in zip(shapes, devices):
            for buffers in (cache.keys, cache.values):
                buffers.append(
                    torch.zeros(batch_size, n_kv, max(capacity, 1), hd, dtype=dtype, device=device)
                )
                if static:
                    torch._dynamo.mark_static_address(buffers[-1])
        return cache

    @classmethod
    def gather(cls, rows: list[tuple[KVCache, int, int]], capacity: int, static: bool = False) -> KVCache:
        """A new cache of rows (cache, row, n): each row's last n tokens, right-aligned to the longest n.

        This is how a serving loop lets requests join and leave a running batch: the slots to the
        left of a shorter row are padding, hidden by its attention mask.
        """
        first = rows[0][0]
        L = max(n for _, _, n in rows)
        shapes = [(k.shape[1], k.shape[3]) for k in first.keys]
        devices = [k.device for k in first.keys]
        new = cls.of_shapes(len(rows), shapes, max(capacity, L), first.keys[0].dtype, devices, static)
        new.fill_rows(rows, L)
        return new

    def fill_rows(self, rows: list[tuple[KVCache, int, int]], L: int) -> None:
        """Copy in rows (cache, row, n): each row's last n tokens to the slots just before L, and its recurrent
        states (a row's state covers all its tokens: the slots to the left of a shorter row are padding)."""
        for layer in range(len(self.keys)):
            for i, (c, r, n) in enumerate(rows):
                if n:  # this row's last n tokens (n_kv, n, hd) into the slots just before L
                    src = slice(c.length - n, c.length)
                    self.keys[layer][i, :, L - n : L] = c.keys[layer][r, :, src]
                    self.values[layer][i, :, L - n : L] = c.values[layer][r, :, src]
        layers = {layer: state for c, _, _ in rows for layer, state in c.states.items()}
        for layer, like in layers.items():
            parts = []
            for c, r, _ in rows:
                state = c.states.get(layer)
                parts.append(
                    tuple(t[r] for t in state)
                    if state is not None
                    else tuple(torch.zeros_like(t[0]) for t in like)
                )
            self.states[layer] = tuple(torch.stack(ts) for ts in zip(*parts))
        self.length = L


class StaticCache(KVCache):
    """transformers' StaticCache(config=..., max_cache_len=...) (4's max_batch_size, device and dtype too): an
    empty KVCache that takes max_cache_len positions of the model's own cache at the first forward (autolm's
    cache is static already: its capacity grows only where a forward needs more)."""

    def __init__(self, config: Any = None, max_cache_len: int | None = None, max_batch_size: int | None = None,
                 device: Any = None, dtype: Any = None, offloading: bool = False,
                 offload_only_non_sliding: bool = True):  # fmt: skip
        super().__init__(capacity=max_cache_len or 256, config=config)
