"""`model.generate` with transformers' arguments and return values, on the token iterator and beam search."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import GenerationError
from ..nn.quantized_cache import QuantizedCache
from .beam import beam_search
from .config import GenerationConfig
from .decode import embeds_prompt, generate_tokens, prepare_inputs
from .guidance import UnbatchedClassifierFreeGuidanceLogitsProcessor
from .speculative import check_speculation
from .watermark import SynthIDTextWatermarkingConfig

# transformers settings autolm does not run: set to anything but their "off" value, generate() refuses.
_UNSUPPORTED = {
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "constraints": (None,),
    "force_words_ids": (None,),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0, 0.0),
    "token_healing": (None, False),
    "encoder_repetition_penalty": (None, 1, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "assistant_early_exit": (None,),
    "use_mtp": (None, False),
}
# transformers settings that change how it computes or caches, not what it generates: taken and left alone
_INERT = ("low_memory", "cache_config", "compile_config", "disable_compile", "max_cache_len", "prefill_chunk_size",
          "continuous_batching_config", "is_assistant", "decoder_start_token_id", "transformers_version")  # fmt: skip


@dataclass
class GenerateOutput:
    """transformers' GenerateDecoderOnlyOutput / GenerateBeamDecoderOnlyOutput."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None

    def to_tuple(self) -> tuple:
        """The fields that are set, in transformers' order."""
        order = ["sequences", "scores", "logits", "attentions", "hidden_states", "past_key_values"]
        if self.beam_indices is not None:
            order = ["sequences", "sequences_scores", "scores", "logits", "beam_indices"] + order[3:]
        return tuple(getattr(self, k) for k in order if getattr(self, k) is not None)

    def keys(self) -> list[str]:
        """The names of the fields that are set."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else getattr(self, key)


def _refuse_with_embeds(cfg, speculative: bool, past_key_values) -> None:
    """What generate(inputs_embeds=...) does not combine with here (transformers does): speculation, a cache
    given."""
    what = ("speculative decoding" if speculative else "past_key_values" if past_key_values is not None
            else None)  # fmt: skip
    if what is not None:
        raise GenerationError(f"inputs_embeds cannot be used with {what} in autolm: pass input_ids")


def _refuse_unsupported(cfg: GenerationConfig, speculative: bool) -> None:
    for key, off in _UNSUPPORTED.items():
        if key in cfg.extra and cfg.extra[key] not in off:
            raise GenerationError(f"{key}={cfg.extra[key]!r} is not supported by autolm's generate()")
    if speculative and isinstance(cfg.watermarking_config, SynthIDTextWatermarkingConfig):
        raise GenerationError("a SynthIDTextWatermarkingConfig cannot be used with speculative decoding in autolm "
                              "(its processor keeps state for one call per new token)")  # fmt: skip


def _quantized_cache(cfg: GenerationConfig, speculative: bool, cache, embeds) -> QuantizedCache | None:
    """The cache cache_implementation="quantized" asks for (from cache_config), None for any other; GenerationError
    where autolm does not combine it (a cache given, as transformers, speculation, inputs_embeds)."""
    if cfg.cache_implementation != "quantized" or cfg.use_cache is False:
        return None
    what = ("past_key_values" if cache is not None else "speculative decoding" if speculative
            else "inputs_embeds" if embeds is not None else None)  # fmt: skip
    if what is not None:
        raise GenerationError(f"cache_implementation='quantized' cannot be used with {what} in autolm")
    return QuantizedCache.from_cache_config(cfg.extra.get("cache_config"))


def _prompt_inputs(model, kwargs: dict) -> dict:
    """generate()'s token_type_ids, for a model whose prompt they mark (a prefix attended both ways: PaliGemma,
    HRM-Text; models.image_text): the prompt's forward's, as transformers reads them there only. Other models take
    none (an unknown argument)."""
    if getattr(model.config, "prefix_token_type", None) is None or "token_type_ids" not in kwargs:
        return {}
    types = kwargs.pop("token_type_ids")
    if types is not None and not isinstance(types, torch.Tensor):
        raise GenerationError(f"token_type_ids: a (batch, prompt length) tensor expected, got {type(types)}")
    return {} if types is None else {"token_type_ids": types}


def _kept(cfg: GenerationConfig, cache):
    """The cache generate() returns: none with use_cache=False (autolm still decodes with one), as transformers."""
    return None if cfg.use_cache is False else cache


class GenerationMixin:
    """`generate()` with transformers' arguments and return value."""

    def _generation_config(self, generation_config, kwargs: dict) -> GenerationConfig:
        """As transformers: the caller's config, its unset fields from the model's generation config, the
        rest from transformers' defaults, then generate()'s keyword arguments on top."""
        own = getattr(self, "generation_config", None) or GenerationConfig.from_model_config(self.config)
        user = GenerationConfig.coerce(generation_config)
        cfg = copy.deepcopy(user if user is not None else own)
        if user is not None:
            cfg.update(
                defaults_only=True, **{k: v for k, v in own.to_diff_dict().items() if k in cfg.names()}
            )
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in _UNSUPPORTED or k in _INERT}
        cfg = cfg.with_defaults().updated(**kwargs)
        cfg.extra.update(extra)
        return cfg

    def can_generate(self) -> bool:
        """True: every autolm model generates."""
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
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: Sequence[Callable] | None = None,
        stopping_criteria: Sequence[Callable] | None = None,
        prefix_allowed_tokens_fn: Callable | None = None,
        synced_gpus: bool | None = None,
        assistant_model=None,
        streamer=None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        tokenizer=None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        """Prompt + new tokens (B * num_return_sequences, P + n), as transformers returns them; a GenerateOutput
        with return_dict_in_generate (scores with output_scores, raw logits with output_logits, the cache)."""
        input_ids = inputs if input_ids is None else input_ids
        embeds = kwargs.pop("inputs_embeds", None)
        if input_ids is None and embeds is None:
            raise GenerationError("generate() needs input_ids (or inputs_embeds)")
        negative = (
            kwargs.pop("negative_prompt_ids", None),
            kwargs.pop("negative_prompt_attention_mask", None),
        )
        prompt = _prompt_inputs(self, kwargs)
        cfg = self._generation_config(generation_config, kwargs)
        speculative = assistant_model is not None or cfg.prompt_lookup_num_tokens is not None
        _refuse_unsupported(cfg, speculative)
        guidance = self._guidance(cfg, speculative, *negative)
        quantized = _quantized_cache(cfg, speculative, past_key_values, embeds)
        if embeds is not None:
            _refuse_with_embeds(cfg, speculative, past_key_values)
            input_ids, attention_mask, cfg = embeds_prompt(self, input_ids, embeds, attention_mask, cfg)
        elif speculative:
            check_speculation(self, cfg, assistant_model)
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if embeds is None:
            input_ids, attention_mask = prepare_inputs(self, input_ids, attention_mask)
        custom = (list(logits_processor or ()), list(stopping_criteria or ()))
        if cfg.num_beams > 1:
            if streamer is not None or past_key_values is not None:
                what = "streamer" if streamer is not None else "past_key_values"
                raise GenerationError(f"{what} cannot be used with beam search (num_beams > 1)")
            out = beam_search(self, input_ids, attention_mask, cfg, *custom, tokenizer, generator,
                              prefix_allowed_tokens_fn, embeds, guidance=guidance, prompt_inputs=prompt,
                              cache=quantized)  # fmt: skip
            if not cfg.return_dict_in_generate:
                return out.sequences
            return GenerateOutput(
                out.sequences,
                out.scores,
                out.logits,
                out.sequences_scores if cfg.output_scores else None,
                out.beam_indices,
                out.attentions,
                out.hidden_states,
                _kept(cfg, out.past_key_values),
            )
        return self._sample(
            cfg,
            input_ids,
            attention_mask,
            custom,
            past_key_values,
            prefix_allowed_tokens_fn,
            streamer,
            tokenizer,
            generator,
            assistant_model,
            embeds,
            guidance,
            quantized,
            prompt=prompt,
        )

    def _guidance(self, cfg, speculative: bool, negative_ids, negative_mask):
        """transformers' classifier-free guidance processor where guidance_scale asks for it (else None)."""
        if cfg.guidance_scale is None or cfg.guidance_scale == 1:
            return None
        if speculative:
            raise GenerationError("guidance_scale cannot be used with speculative decoding in autolm")
        return UnbatchedClassifierFreeGuidanceLogitsProcessor(
            cfg.guidance_scale, self, negative_ids, negative_mask, use_cache=cfg.use_cache is not False
        )

    def _sample(
        self, cfg, input_ids, attention_mask, custom, cache, prefix_fn, streamer, tokenizer, generator, draft, embeds,
        guidance=None, new_cache=None, prompt=None,
    ):  # fmt: skip
        """Greedy or sampled decoding through the token iterator (speculative with a draft model or prompt
        lookup), collected as generate() returns it; on `new_cache` where given (a quantized one)."""
        n = cfg.num_return_sequences
        if n > 1:
            if cache is not None:
                raise GenerationError("past_key_values cannot be used with num_return_sequences > 1")
            input_ids = input_ids.repeat_interleave(n, 0)
            attention_mask = attention_mask.repeat_interleave(n, 0)
            embeds = None if embeds is None else embeds.repeat_interleave(n, 0)
            prompt = {k: v.repeat_interleave(n, 0) for k, v in (prompt or {}).items()}
        cache = new_cache if new_cache is not None else cache
        if streamer is not None:
            streamer.put(input_ids.cpu())
        new, scores, logits, states, attentions = [], [], [], [], []
        steps = generate_tokens(
            self,
            input_ids,
            attention_mask,
            cfg,
            generator,
            tokenizer,
            *custom,
            cache,
            prefix_fn,
            draft,
            embeds,
            guidance=guidance,
            prompt_inputs=prompt,
        )
        for step in steps:
            new.append(step.token)
            cache = step.past_key_values
            if cfg.output_scores:
                scores.append(step.scores)
            if cfg.output_logits:
                logits.append(step.logits)
            states.append(step.hidden_states)
            attentions.append(step.attentions)
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
            attentions=tuple(attentions) if cfg.output_attentions else None,
            hidden_states=tuple(states) if cfg.output_hidden_states else None,
            past_key_values=_kept(cfg, cache),
        )

    def compute_transition_scores(
        self,
        sequences: torch.Tensor,
        scores: tuple[torch.Tensor, ...],
        beam_indices: torch.Tensor | None = None,
        normalize_logits: bool = False,
    ) -> torch.Tensor:
        """The score of each generated token (B * n, steps) from generate()'s scores, as transformers."""
        if beam_indices is None:  # greedy or sampling: as if beam 0 of each row was always kept
            beam_indices = torch.arange(scores[0].shape[0], device=sequences.device).view(-1, 1)
            beam_indices = beam_indices.expand(-1, len(scores))
        V = scores[0].shape[-1]
        stacked = torch.stack(scores).reshape(len(scores), -1).transpose(0, 1)  # (rows * V, steps)
        if normalize_logits:
            stacked = torch.log_softmax(stacked.reshape(-1, V, stacked.shape[-1]), dim=1)
            stacked = stacked.reshape(-1, stacked.shape[-1])
        unused = beam_indices < 0
        longest = int((~unused).long().sum(-1).max())
        beam_indices, unused = beam_indices.clone()[:, :longest], unused[:, :longest]
        beam_indices[unused] = 0
        indices = sequences[:, sequences.shape[-1] - longest :] + beam_indices.to(sequences.device) * V
        out = stacked.gather(0, indices)
        out[unused] = 0
        return out
