"""What a causal LM's forward returns, and its loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CausalLMOutput:
    """transformers' CausalLMOutputWithPast: attribute, key and tuple access."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            x
            for x in (self.loss, self.logits, self.past_key_values, self.hidden_states, self.attentions)
            if x is not None
        )

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def keys(self) -> list[str]:
        return [
            k
            for k in ("loss", "logits", "past_key_values", "hidden_states", "attentions")
            if getattr(self, k) is not None
        ]


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
