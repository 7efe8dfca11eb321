"""`model.generate` with transformers' arguments and return values, on the token iterator and beam search."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError
from .beam import beam_search
from .config import GenerationConfig
from .decode import generate_tokens, prepare_inputs


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None

    def __getitem__(self, key):
        return getattr(self, key)


class GenerationMixin:
    """`generate()` with transformers' arguments and return value."""

    def _generation_config(self, generation_config, kwargs: dict) -> GenerationConfig:
        base = (
            GenerationConfig.coerce(generation_config)
            or getattr(self, "generation_config", None)
            or GenerationConfig.from_model_config(self.config)
        )
        return base.updated(**kwargs)

    def can_generate(self) -> bool:
        return True

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values=None, attention_mask=None, **kwargs: Any
    ) -> dict[str, Any]:
        """The forward arguments for the next step (peft and other wrappers call this)."""
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            input_ids = input_ids[:, past_key_values.get_seq_length() :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            **kwargs,
        }

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config=None,
        streamer=None,
        tokenizer=None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        logits_processor: Sequence[Callable] | None = None,
        stopping_criteria: Sequence[Callable] | None = None,
        inputs: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """Prompt + new tokens (B * num_return_sequences, P + n), as transformers returns them; a GenerateOutput
        with return_dict_in_generate (scores with output_scores, raw logits with output_logits)."""
        input_ids = inputs if input_ids is None else input_ids
        if input_ids is None:
            raise GenerationError("generate() needs input_ids")
        cfg = self._generation_config(generation_config, kwargs)
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        input_ids, attention_mask = prepare_inputs(self, input_ids, attention_mask)
        if cfg.num_beams > 1:
            sequences = beam_search(self, input_ids, attention_mask, cfg, list(logits_processor or ()))
            return GenerateOutput(sequences) if cfg.return_dict_in_generate else sequences
        if cfg.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(cfg.num_return_sequences, 0)
            attention_mask = attention_mask.repeat_interleave(cfg.num_return_sequences, 0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new, scores, logits = [], [], []
        for step in generate_tokens(
            self,
            input_ids,
            attention_mask,
            cfg,
            generator,
            tokenizer,
            list(logits_processor or ()),
            list(stopping_criteria or ()),
        ):
            new.append(step.token)
            if cfg.output_scores:
                scores.append(step.scores)
            if cfg.output_logits:
                logits.append(step.logits)
            if streamer is not None:
                streamer.put(step.token.cpu())
        if streamer is not None:
            streamer.end()
        sequences = torch.cat([input_ids] + [t[:, None] for t in new], dim=1)
        if not cfg.return_dict_in_generate:
            return sequences
        return GenerateOutput(
            sequences,
            tuple(scores) if cfg.output_scores else None,
            tuple(logits) if cfg.output_logits else None,
        )
