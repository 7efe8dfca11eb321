"""What a causal LM's forward returns, and its loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


class ModelOutput:
    """transformers' ModelOutput: attributes, keys (the fields that are set), indices into the tuple of those.
    A Mapping to code that walks outputs (accelerate's mixed precision casts their tensors to fp32 and rebuilds
    them as `type(out)({key: value})`, which the first field taking a dict supports, as ModelOutput's does)."""

    def __post_init__(self) -> None:
        first = fields(self)[0].name
        given = getattr(self, first)
        if isinstance(given, dict):
            setattr(self, first, None)
            for key, value in given.items():
                setattr(self, key, value)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def items(self) -> list[tuple[str, object]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list[object]:
        return [getattr(self, k) for k in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class CausalLMOutput(ModelOutput):
    """transformers' CausalLMOutputWithPast (loss, logits, past_key_values, hidden_states, attentions)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


Mapping.register(ModelOutput)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (logits at t predict labels at t+1): the mean, or the sum / num_items_in_batch."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].to(logits.device).reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / num_items_in_batch
