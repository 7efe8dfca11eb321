"""The token iterator every generation path is built on, and the opt-in compiled decode step."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import GenerationError
from ..step import decoder
from .config import GenerationConfig
from .restart import is_stale, recompute
from .sampling import choose, logits_processors
from .speculative import check_speculation, speculate
from .stopping import build_criteria
from .target_draft import reads_target


@dataclass
class Step:
    """One generation step: the chosen tokens (B,), which rows are finished (B,), the raw logits and the
    processed scores (B, V) the tokens were chosen from, and the KV cache generation runs on."""

    token: torch.Tensor
    finished: torch.Tensor
    logits: torch.Tensor
    scores: torch.Tensor
    past_key_values: Any = None
    # the forward's per-layer outputs behind these logits, with output_hidden_states / output_attentions
    hidden_states: tuple | None = None
    attentions: tuple | None = None


class Run:
    """What one generation carries from token to token: the rows so far (ids (B, T), the mask over the cache
    and the newest token, the newest token's positions (B, 1)), the cache, the one list of logits processors,
    the stopping criteria and which rows are unfinished. Speculative decoding (speculative.py) drives the
    same object, several tokens per forward."""

    def __init__(self, model, cfg, ids, mask, cache, processors, criteria, generator):
        self.model, self.cfg, self.ids, self.mask, self.cache = model, cfg, ids, mask, cache
        self.processors, self.criteria, self.generator = processors, criteria, generator
        self.pad = _pad_token(cfg, criteria)
        self.history = [] if cfg.return_dict_in_generate and cfg.output_scores else None
        self.unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.eos = torch.tensor(cfg.eos_ids, dtype=torch.long) if cfg.eos_ids else None
        self.pos = None  # (B, 1): the position of the token fed next
        self.states = (None, None)  # the last forward's hidden states and attentions, where the config asks
        self.emitted = 0
        self._decode = None  # the decode step, chosen once a second token is needed (autolm.step.decoder)

    def checked(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits in fp32; GenerationError on NaN or inf unless remove_invalid_values asks to fix them."""
        raw = logits.float()
        if not self.cfg.remove_invalid_values and not _finite(raw):
            raise GenerationError(
                f"the model produced NaN or infinite logits at step {self.emitted} (broken weights, or an "
                "overflow in this dtype: try float32 or bfloat16)"
            )
        return raw

    def emit(self, token: torch.Tensor, raw: torch.Tensor, scores: torch.Tensor) -> Step:
        """Append the chosen tokens (B,) (the pad token in finished rows) and check the stopping criteria."""
        if self.pad is not None:
            token = torch.where(self.unfinished, token, torch.full_like(token, self.pad))
        self.ids = torch.cat([self.ids, token[:, None]], dim=1)
        if self.history is not None:
            self.history.append(scores)
        if self.criteria:
            history = tuple(self.history) if self.history is not None else None
            self.unfinished &= ~self.criteria(self.ids, history)
        self.emitted += 1
        return Step(token, ~self.unfinished, raw, scores, self.cache, *self.states)

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())

    def live(self) -> torch.Tensor:
        """(B,) the rows whose next tokens are real: the unfinished ones, or all when finished rows go on
        with real tokens (no EOS criterion to pad them)."""
        return self.unfinished if self.pad is not None else torch.ones_like(self.unfinished)

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Feed the newest tokens (B,) through the decode step: the next logits (B, V)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        if self.cfg.output_hidden_states or self.cfg.output_attentions:  # the forward that returns them
            out = self.model(token[:, None], attention_mask=self.mask, position_ids=self.pos, past_key_values=self.cache,
                             **layer_outputs(self.cfg))  # fmt: skip
            self.states, logits = (out.hidden_states, out.attentions), out.logits[:, -1]
        elif self.ids.shape[1] == self.mask.shape[1] and is_stale(self.model, self.cache, self.mask.shape[1]):
            logits = recompute(self.model, self.ids, self.mask, self.cache)  # LongRoPE's switch: all again
        else:
            self._decode = self._decode or decoder(self.model, self.cache, self.mask)
            logits = self._decode(token[:, None], self.mask, self.pos, self.cache)
        self.pos = self.pos + 1
        return logits


def layer_outputs(cfg: GenerationConfig, assistant_model=None) -> dict[str, bool]:
    """The forward's output_hidden_states / output_attentions, as generate() was asked for them (hidden states
    also for an assistant_model that drafts from them: speculative.TargetDraft)."""
    return {
        "output_hidden_states": bool(cfg.output_hidden_states)
        or (assistant_model is not None and reads_target(assistant_model)),
        "output_attentions": bool(cfg.output_attentions),
    }


def _finite(x: torch.Tensor) -> bool:
    """Whether every value is finite, read from the smallest and largest (NaN propagates into both, an
    infinity is one of them): one vectorized pass, where isfinite(x).all() took ~90 us per token on a 49k
    vocabulary."""
    lo, hi = torch.aminmax(x)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def prepare_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """input_ids as (B, T) on the model's device, and an all-ones attention mask when none is given."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    input_ids = input_ids.to(model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


def embeds_prompt(model, input_ids, inputs_embeds: torch.Tensor, attention_mask, cfg: GenerationConfig):
    """generate(inputs_embeds=...) as transformers runs it for a decoder: the embeddings (B, P, hidden) feed the
    first forward, while the sequences returned (and what the logits processors see) start from input_ids, or
    from nothing where none are given; then an explicit max_length / min_length counts the P positions too.
    Returns (input_ids, attention_mask over the P positions, cfg)."""
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != model.config.embedding_width:
        raise GenerationError(f"inputs_embeds must be (batch, length, {model.config.embedding_width}), got "
                              f"{tuple(inputs_embeds.shape)}")  # fmt: skip
    B, P = inputs_embeds.shape[:2]
    if input_ids is None:
        input_ids = torch.empty(B, 0, dtype=torch.long, device=model.device)
    input_ids, _ = prepare_inputs(model, input_ids, None)
    mask = torch.ones(B, P, dtype=torch.long) if attention_mask is None else attention_mask
    if tuple(mask.shape) != (B, P) or input_ids.shape[0] != B:
        raise GenerationError(f"inputs_embeds {tuple(inputs_embeds.shape)} needs an attention_mask of ({B}, {P}) "
                              f"and input_ids of {B} rows (got {tuple(mask.shape)}, {tuple(input_ids.shape)})")  # fmt: skip
    if input_ids.shape[1] != P:
        cfg = copy.deepcopy(cfg)
        if cfg.max_new_tokens is None and cfg.max_length is not None:
            cfg.max_length -= P
        if cfg.min_new_tokens is None and cfg.min_length:
            cfg.min_length = max(cfg.min_length - P, 0)
    return input_ids, mask.to(input_ids.device), cfg


def new_token_budget(cfg: GenerationConfig, prompt_len: int, context: int | None = None) -> int:
    """How many tokens to generate, as transformers decides: max_new_tokens; else max_length (prompt
    included) minus the prompt; neither set, 20 new tokens within the model's context window."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    max_length = cfg.max_length
    if max_length is None:
        max_length = min(20 + prompt_len, context) if context else 20 + prompt_len
    if prompt_len >= max_length:
        raise GenerationError(
            f"the input has {prompt_len} tokens, but max_length is {max_length} (the prompt included): "
            "raise max_length or, better, set max_new_tokens"
        )
    return max_length - prompt_len


def check_context(model, prompt_len: int, new_tokens: int) -> None:
    """GenerationError when prompt + new tokens do not fit the model's context window."""
    limit = model.config.max_position_embeddings
    if prompt_len >= limit or (
        prompt_len + new_tokens > limit and model.config.rope_parameters.get("rope_type") != "dynamic"
    ):
        raise GenerationError(
            f"the prompt has {prompt_len} tokens and {new_tokens} more were asked for, but the "
            f"model's context window is {limit} tokens: shorten the prompt or ask for fewer tokens"
        )


def start_cache(model, past_key_values, input_ids: torch.Tensor, mask: torch.Tensor, capacity: int):
    """The cache to generate on (the caller's, continued, or a new one) and how many leading tokens of
    input_ids it already holds. As in transformers, input_ids may be the whole sequence (mask as long as
    it), or only the tokens after the cache (the mask covers the cached ones too)."""
    if past_key_values is None:
        return model.make_cache(input_ids.shape[0], capacity), 0
    cache = past_key_values.ensure_for(model, input_ids.shape[0], capacity)
    if cache.batch_size != input_ids.shape[0]:
        raise GenerationError(
            f"past_key_values holds {cache.batch_size} rows, but input_ids has {input_ids.shape[0]}"
        )
    past = cache.get_seq_length()
    if mask.shape[1] != input_ids.shape[1]:
        return cache, 0
    if past >= input_ids.shape[1]:
        raise GenerationError(
            f"past_key_values already holds {past} tokens and input_ids has {input_ids.shape[1]}: "
            "input_ids must go on past the cached tokens"
        )
    return cache, past


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    tokenizer=None,
    logits_processor: Sequence[Callable] = (),
    stopping_criteria: Sequence[Callable] = (),
    past_key_values=None,
    prefix_allowed_tokens_fn: Callable | None = None,
    assistant_model=None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    guidance: Callable | None = None,
    prompt_inputs: dict | None = None,
) -> Iterator[Step]:
    """Yield one Step per new token. Rows that reach EOS get the pad token afterwards (as in transformers,
    only when EOS is one of the stopping criteria). With an assistant_model or prompt_lookup_num_tokens,
    the tokens come from speculative decoding (speculative.py): the same tokens greedily, the same
    distribution when sampling. inputs_embeds (see embeds_prompt) replace input_ids in the first forward.
    `guidance` (generate's classifier-free guidance processor) runs before the other processors. prompt_inputs:
    further arguments of the prompt's forward only (token_type_ids, for a model whose prompt they mark)."""
    cfg = (config or GenerationConfig()).with_defaults()
    ids, mask = prepare_inputs(model, input_ids, attention_mask)
    P = ids.shape[1]
    steps = new_token_budget(cfg, P, model.config.max_position_embeddings)
    if steps == 0:
        return
    speculative = assistant_model is not None or cfg.prompt_lookup_num_tokens is not None
    if speculative:
        check_speculation(model, cfg, assistant_model)
    processors = logits_processors(cfg, P, logits_processor, prefix_allowed_tokens_fn, mask[:, mask.shape[1] - P :],
                                   P + steps, device=ids.device, first=guidance,
                                   vocab_size=model.config.get_text_config().vocab_size)  # fmt: skip
    criteria = build_criteria(cfg, tokenizer, stopping_criteria)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if inputs_embeds is not None:  # a new cache: the embeddings are the whole prompt
        cache = model.make_cache(ids.shape[0], mask.shape[1] + steps)
        out = model(inputs_embeds=inputs_embeds.to(model.device), attention_mask=mask, position_ids=positions,
                    past_key_values=cache, logits_to_keep=1, **layer_outputs(cfg, assistant_model), **(prompt_inputs or {}))  # fmt: skip
        pos = positions
    else:
        cache, fed = start_cache(model, past_key_values, ids, mask, P + steps)
        new, pos = (ids[:, fed:], positions[:, fed:]) if fed else (ids, positions[:, -ids.shape[1] :])
        out = model(new, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1,
                    **layer_outputs(cfg, assistant_model), **(prompt_inputs or {}))  # fmt: skip
    run = Run(model, cfg, ids, mask, cache, processors, criteria, generator)
    run.states = (out.hidden_states, out.attentions)
    run.pos = pos[:, -1:] + 1
    if speculative:
        yield from speculate(run, out.logits[:, -1], steps, assistant_model)
        return
    logits = out.logits[:, -1]
    for step in range(steps):
        raw = run.checked(logits)
        scores = processors(run.ids, raw)
        token = choose(scores, cfg, generator)
        yield run.emit(token, raw, scores)
        if step == steps - 1 or run.done:
            return
        logits = run.advance(run.ids[:, -1])


def _pad_token(cfg: GenerationConfig, criteria) -> int | None:
    """What finished rows are filled with: pad_token_id, else the first EOS; None when no EOS criterion
    can finish a row (transformers then keeps generating real tokens for rows stopped otherwise)."""
    if not any(hasattr(c, "eos_token_id") for c in criteria):
        return None
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    return cfg.eos_ids[0] if cfg.eos_ids else 0
