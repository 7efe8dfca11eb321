"""Classifier-free guidance for a decoder, as transformers' generate(guidance_scale=...) runs it
(UnbatchedClassifierFreeGuidanceLogitsProcessor): each step's log-probabilities pushed away from those of an
unconditional run of the same model, scale * (conditional - unconditional) + unconditional. The unconditional
run starts from `negative_prompt_ids` (default: each row's last prompt token) and then reads each new token, in
a cache of its own."""

from __future__ import annotations

import torch

from .processors import LogitsProcessor


class UnbatchedClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """transformers' processor of the same name: `model` run on `unconditional_ids` (their attention mask, or all
    ones), then token by token (with `use_cache`, else the whole unconditional sequence again each step)."""

    def __init__(self, guidance_scale: float, model, unconditional_ids: torch.Tensor | None = None,
                 unconditional_attention_mask: torch.Tensor | None = None, use_cache: bool = True):  # fmt: skip
        self.guidance_scale, self.model, self.use_cache = guidance_scale, model, use_cache
        self.ids, self.mask, self.cache, self.first = (
            unconditional_ids,
            unconditional_attention_mask,
            None,
            True,
        )

    def unconditional_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The unconditional run's next-token logits (B, V) after the sequences' newest token."""
        if self.first:
            ids = input_ids[:, -1:] if self.ids is None else self.ids
            mask = torch.ones_like(ids, dtype=torch.long) if self.mask is None else self.mask
            self.first = False
        else:
            mask = torch.cat([self.mask, torch.ones_like(input_ids[:, -1:], dtype=torch.long)], dim=1)
            ids = input_ids[:, -1:] if self.use_cache else torch.cat([self.ids, input_ids[:, -1:]], dim=1)
        self.ids, self.mask = ids, mask
        past = 0 if self.cache is None else self.cache.get_seq_length()
        # transformers' model counts positions from the cache, not over the mask's real tokens
        positions = torch.arange(past, past + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        out = self.model(ids, attention_mask=mask, position_ids=positions, use_cache=self.use_cache,
                         past_key_values=self.cache, logits_to_keep=1)  # fmt: skip
        self.cache = out.past_key_values if self.use_cache else None
        return out.logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        if self.guidance_scale == 1:
            return scores
        unconditional = torch.nn.functional.log_softmax(self.unconditional_logits(input_ids), dim=-1)
        return self.guidance_scale * (scores - unconditional) + unconditional
