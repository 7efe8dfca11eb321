"""The one sampler: `logits_processors` builds, once per generation (or per server request), the list of
logits processors a GenerationConfig asks for, in transformers' order; `choose` draws or takes the argmax.
generate, beam search, the CLI and the server all run it. Plain greedy decoding is an empty list."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import GenerationError
from .config import GenerationConfig
from .processors import (
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitBiasLogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    PresenceFrequencyPenaltyLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from .stopping import merge
from .warpers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitNormalization,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)


def _penalties(cfg: GenerationConfig, P: int, attention_mask: torch.Tensor | None) -> list:
    """Biases and penalties: sequence_bias, logit_bias, repetition, presence/frequency, n-grams, bad words."""
    out = []
    if cfg.sequence_bias is not None:
        out.append(SequenceBiasLogitsProcessor(cfg.sequence_bias))
    if cfg.logit_bias:
        out.append(LogitBiasLogitsProcessor(cfg.logit_bias))
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        # Left padding is not part of a row's history (transformers passes each row's padding length).
        pad = (
            None
            if attention_mask is None or bool(attention_mask.all())
            else (attention_mask != 0).int().argmax(1)
        )
        out.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty, prompt_ignore_length=pad))
    if cfg.presence_penalty or cfg.frequency_penalty:
        out.append(PresenceFrequencyPenaltyLogitsProcessor(cfg.presence_penalty, cfg.frequency_penalty, P))
    if cfg.no_repeat_ngram_size:
        out.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        out.append(NoBadWordsLogitsProcessor(cfg.bad_words_ids, cfg.eos_ids or None))
    return out


def _constraints(cfg: GenerationConfig, P: int, max_length: int | None, prefix_fn, device) -> list:
    """Length rules, forced and suppressed tokens."""
    out, eos = [], cfg.eos_ids
    if cfg.min_length and eos:
        out.append(MinLengthLogitsProcessor(cfg.min_length, eos, device=device))
    if cfg.min_new_tokens and eos:
        out.append(MinNewTokensLengthLogitsProcessor(P, cfg.min_new_tokens, eos, device=device))
    if prefix_fn is not None:
        out.append(PrefixConstrainedLogitsProcessor(prefix_fn, cfg.num_beams or 1))
    if cfg.forced_bos_token_id is not None:
        out.append(ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None and max_length is not None:
        out.append(ForcedEOSTokenLogitsProcessor(max_length, cfg.forced_eos_token_id, device=device))
    if cfg.remove_invalid_values:
        out.append(InfNanRemoveLogitsProcessor())
    if cfg.exponential_decay_length_penalty is not None:
        if not eos:
            raise GenerationError("exponential_decay_length_penalty needs an eos_token_id to raise")
        out.append(ExponentialDecayLengthPenalty(tuple(cfg.exponential_decay_length_penalty), eos, P))
    if cfg.suppress_tokens is not None:
        out.append(SuppressTokensLogitsProcessor(cfg.suppress_tokens, device=device))
    if cfg.begin_suppress_tokens is not None:
        begin = P if (P > 1 or cfg.forced_bos_token_id is None) else P + 1
        out.append(SuppressTokensAtBeginLogitsProcessor(cfg.begin_suppress_tokens, begin, device=device))
    return out


def _warpers(cfg: GenerationConfig, device) -> list:
    """Sampling only: temperature, then the filters. Beam search keeps one more than the EOS tokens."""
    if not cfg.do_sample:
        return []
    keep = (
        len(cfg.eos_ids) + 1
        if (cfg.num_beams or 1) > 1 and cfg.eos_ids
        else 2
        if (cfg.num_beams or 1) > 1
        else 1
    )
    out = []
    if cfg.temperature is not None and cfg.temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_h is not None:
        out.append(TopHLogitsWarper(cfg.top_h))
    if cfg.top_k:
        out.append(TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=keep))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        out.append(TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=keep))
    if cfg.min_p is not None:
        out.append(MinPLogitsWarper(cfg.min_p, min_tokens_to_keep=keep))
    if cfg.typical_p is not None and cfg.typical_p < 1.0:
        out.append(TypicalLogitsWarper(cfg.typical_p, min_tokens_to_keep=keep))
    if cfg.epsilon_cutoff is not None and 0.0 < cfg.epsilon_cutoff < 1.0:
        out.append(EpsilonLogitsWarper(cfg.epsilon_cutoff, min_tokens_to_keep=keep))
    if cfg.eta_cutoff is not None and 0.0 < cfg.eta_cutoff < 1.0:
        out.append(EtaLogitsWarper(cfg.eta_cutoff, min_tokens_to_keep=keep, device=device))
    return out


def logits_processors(
    cfg: GenerationConfig,
    prompt_length: int,
    custom: Sequence[Callable] = (),
    prefix_allowed_tokens_fn: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    first: Callable | None = None,
    vocab_size: int | None = None,
) -> LogitsProcessorList:
    """The processors cfg asks for, in transformers' order (_get_logits_processor): `first` (generate's
    classifier-free guidance, which runs the model), biases and penalties, length and token rules, the caller's
    `custom` ones (each replacing a built-in one of its type), then when sampling the warpers, the watermark
    (on `vocab_size` tokens, the model config's; None: the scores' width), and log-softmax last with
    renormalize_logits. Unset (None) fields are off."""
    built = LogitsProcessorList(
        ([] if first is None else [first])
        + _penalties(cfg, prompt_length, attention_mask)
        + _constraints(cfg, prompt_length, max_length, prefix_allowed_tokens_fn, device)
    )
    out = merge(built, custom)
    out.extend(_warpers(cfg, device))
    if cfg.watermarking_config is not None:
        out.append(cfg.watermarking_config.construct_processor(vocab_size, device))
    if cfg.renormalize_logits:
        out.append(LogitNormalization())
    return out


def choose(
    scores: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token per row from processed scores (B, V): a draw when sampling, else the argmax."""
    if cfg.do_sample:
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)
