"""KV cache: preallocated buffers written in place, one pair per layer, growing only when full."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value buffers (B, n_kv, capacity, hd) written at the current length.

    Buffers are allocated once for `capacity` tokens (static shapes for a compiled decode step);
    a write past the end doubles the capacity, so the cache also works as a growing cache.
    Sliding-window layers keep every position and rely on the attention mask for the window.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | list = "cpu"):
        shape = (batch_size, num_kv_heads, max(capacity, 1), head_dim)
        devices = device if isinstance(device, list) else [device] * num_layers  # one per layer under a device_map
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.length = 0  # tokens stored (the same for every layer once a forward pass completes)
        self.slot: torch.Tensor | None = None  # during a static-shape decode step: where its token goes

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int) -> "KVCache":
        """A cache sized for `model` (its config, dtype, and each layer's device)."""
        cfg = model.config
        p = model.model.embed_tokens.weight
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        device_map = getattr(model, "hf_device_map", None)
        if device_map:
            from .placement import execution_device

            device = [execution_device(device_map[f"model.layers.{i}"]) for i in range(cfg.num_hidden_layers)]
        else:
            device = p.device
        kv_heads = model.model.layers[0].self_attn.num_kv_heads  # under tensor parallelism, this rank's heads
        return cls(cfg.num_hidden_layers, batch_size, kv_heads, cfg.head_dim, capacity, dtype, device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) after the cached tokens; return all keys/values so far.

        In a static-shape decode step (`slot` set) the token is written at that slot and the whole
        buffers are returned: the attention mask hides the slots not written yet.
        """
        if self.slot is not None:
            self.keys[layer].index_copy_(2, self.slot, k)
            self.values[layer].index_copy_(2, self.slot, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        self.reserve(end)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more tokens as stored (called once per forward pass, after every layer wrote)."""
        self.length += n

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
        """Select batch rows (beam search): row i becomes old row index[i]."""
        for buffers in (self.keys, self.values):
            for i, buf in enumerate(buffers):
                buffers[i] = buf.index_select(0, index.to(buf.device))

    @classmethod
    def gather(cls, rows: list[tuple["KVCache", int, int]], capacity: int) -> "KVCache":
        """A new cache of rows (cache, row, n): each row's last n tokens, right-aligned to the longest n.

        This is how a serving loop lets requests join and leave a running batch: the slots to the
        left of a shorter row are padding, hidden by its attention mask.
        """
        first = rows[0][0]
        L = max(n for _, _, n in rows)
        _, n_kv, _, hd = first.keys[0].shape
        new = cls(len(first.keys), len(rows), n_kv, hd, max(capacity, L), first.keys[0].dtype,
                  [k.device for k in first.keys])
        for layer in range(len(first.keys)):
            for i, (c, r, n) in enumerate(rows):
                if n:
                    new.keys[layer][i, :, L - n: L] = c.keys[layer][r, :, c.length - n: c.length]
                    new.values[layer][i, :, L - n: L] = c.values[layer][r, :, c.length - n: c.length]
        new.length = L
        return new
