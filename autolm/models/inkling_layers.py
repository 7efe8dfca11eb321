"""Inkling's embeddings and stacked shared experts (models.inkling), with their tensor-parallel cuts."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ACTIVATIONS, RMSNorm, SelfSharded


class InklingSharedExperts(SelfSharded, nn.Module):
    """The shared experts stacked: gate_proj, up_proj (S, I, h), down_proj (S, h, I); each weighted by its share
    (gammas (N, S)) before down_proj, summed in fp32. Tensor parallelism cuts their intermediate rows (the partial
    sums added across ranks in fp32)."""

    tp_dims: ClassVar[dict[str, int]] = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}

    def __init__(self, n: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(n, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, intermediate))
        self.act = act

    def forward(self, x: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        xs = x[None].expand(self.gate_proj.shape[0], -1, -1)
        gate, up = (torch.bmm(xs, w.transpose(1, 2)) for w in (self.gate_proj, self.up_proj))
        h = ACTIVATIONS[self.act](gate) * up * gammas.t()[:, :, None]
        y = torch.bmm(h, self.down_proj.transpose(1, 2)).float().sum(0)
        if self.tp is not None:
            torch.distributed.all_reduce(y)
        return y.to(x.dtype)


class InklingNormedEmbedding(SelfSharded, nn.Embedding):
    """The token embeddings, RMS-normed (`embed_norm`). Vocabulary-parallel under tensor parallelism (each rank
    a slice of the rows, its lookups summed across ranks before the norm) where the vocabulary divides evenly."""

    tp_dims: ClassVar[dict[str, int]] = {"weight": 0}

    def __init__(self, num: int, dim: int, eps: float):
        meta = torch.get_default_device().type == "meta"
        super().__init__(num, dim, _weight=torch.empty(num, dim) if meta else None)
        self.embed_norm = RMSNorm(dim, eps)

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        return super().shard(rank, world) if self.num_embeddings % world == 0 else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_norm(super().forward(input_ids))
        rows = self.weight.shape[0]
        local = input_ids - self.tp[0] * rows
        inside = (local >= 0) & (local < rows)
        x = F.embedding(local.clamp(0, rows - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        torch.distributed.all_reduce(x)
        return self.embed_norm(x)
