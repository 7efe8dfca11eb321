"""The static KV cache: per-layer key/value buffers written at the positions a forward gives."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch


class KVCache:
    """Per-layer key/value buffers (B, n_kv, capacity, hd), written at the positions a forward pass gives.

    The buffers are allocated once; `static=True` marks their addresses fixed for torch.compile, so a
    compiled decode step can be captured in a CUDA graph. In eager mode a write past the end grows
    them (to at least twice the capacity), so the cache also works as a growing cache. `length` counts
    the tokens stored, kept by the model's forward outside any compiled region. Sliding-window layers
    keep every position and rely on the attention mask for the window.
    """

    def __init__(
        self,
        num_layers: int = 0,
        batch_size: int = 1,
        num_kv_heads: int = 1,
        head_dim: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | list = "cpu",
        static: bool = False,
        config: Any = None,
    ):
        """With no layers (transformers' `DynamicCache()`, or `DynamicCache(config=...)`) the cache is empty until
        the first forward it is given to: that model's own cache then (ensure_for)."""
        shape = (batch_size, num_kv_heads, max(capacity, 1), head_dim)
        devices = (
            device if isinstance(device, list) else [device] * num_layers
        )  # one per layer under a device_map
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.length = 0
        self._capacity = capacity  # an empty cache's capacity once it gets buffers (at least what is needed)
        self.static = static
        if static:
            for t in self.keys + self.values:
                torch._dynamo.mark_static_address(t)

    def ensure_for(self, model, batch_size: int, capacity: int) -> KVCache:
        """This cache, given `model`'s buffers (model.make_cache) first where it was made empty."""
        if not self.keys:
            made = model.make_cache(batch_size, max(capacity, self._capacity))
            self.keys, self.values, self.static = made.keys, made.values, made.static
        return self

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

    @classmethod
    def gather(cls, rows: list[tuple[KVCache, int, int]], capacity: int, static: bool = False) -> KVCache:
        """A new cache of rows (cache, row, n): each row's last n tokens, right-aligned to the longest n.

        This is how a serving loop lets requests join and leave a running batch: the slots to the
        left of a shorter row are padding, hidden by its attention mask.
        """
        first = rows[0][0]
        L = max(n for _, _, n in rows)
        _, n_kv, _, hd = first.keys[0].shape
        new = cls(
            len(first.keys),
            len(rows),
            n_kv,
            hd,
            max(capacity, L),
            first.keys[0].dtype,
            [k.device for k in first.keys],
            static,
        )
        for layer in range(len(first.keys)):
            for i, (c, r, n) in enumerate(rows):
                if n:
                    new.keys[layer][i, :, L - n : L] = c.keys[layer][r, :, c.length - n : c.length]
                    new.values[layer][i, :, L - n : L] = c.values[layer][r, :, c.length - n : c.length]
        new.length = L
        return new


class StaticCache(KVCache):
    """transformers' StaticCache(config=..., max_cache_len=...) (4's max_batch_size, device and dtype too): an
    empty KVCache that takes max_cache_len positions of the model's own cache at the first forward (autolm's
    cache is static already: its capacity grows only where a forward needs more)."""

    def __init__(self, config: Any = None, max_cache_len: int | None = None, max_batch_size: int | None = None,
                 device: Any = None, dtype: Any = None, offloading: bool = False,
                 offload_only_non_sliding: bool = True):  # fmt: skip
        super().__init__(capacity=max_cache_len or 256, config=config)
