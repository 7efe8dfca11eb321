"""Parameters tensor parallelism cuts without a Linear's plan (a per-head bias, stacked shared experts, an embedding
that normalises inside): the module keeps its rank's slices and saves them whole (see load/parallel.py, which calls
`shard` on every module that has one, as on the experts)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class SelfSharded:
    """A module mixin for plain parameters that tensor parallelism cuts without a Linear's plan: `tp_dims` gives,
    per parameter, the dimension cut into contiguous per-rank slices (as DTensor's Shard cuts it, e.g. a row per
    attention head, in step with the column-parallel projections); saved whole."""

    tp_dims: ClassVar[dict[str, int]] = {}
    tp: tuple[int, int] | None = None

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        """On the meta model: keep this rank's slices; returns {parameter: (dim, parts)} for the loader."""
        for name, dim in self.tp_dims.items():
            p = getattr(self, name)
            shape = list(p.shape)
            shape[dim] //= world
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device=p.device)))
        self.tp = (rank, world)
        return {name: (dim, 1) for name, dim in self.tp_dims.items()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tp is None:
            return
        for name, dim in self.tp_dims.items():  # whole, as one process holds them
            local = destination[prefix + name].detach()
            if local.device.type == "meta":
                continue
            shards = [torch.empty_like(local) for _ in range(self.tp[1])]
            torch.distributed.all_gather(shards, local)
            destination[prefix + name] = torch.cat(shards, dim)
