"""Logits processors with transformers' names, constructor signatures and arithmetic: each maps
(input_ids (B, T), fp32 scores (B, V)) to new scores. Sampling warpers live in warpers.py; sampling.py
builds the one list that generate, beam search, the CLI and the server run."""

from __future__ import annotations

import inspect
import math
import types
from collections.abc import Callable

import torch

from ..errors import GenerationError


def _eos_tensor(eos_token_id, device=None) -> torch.Tensor:
    if isinstance(eos_token_id, torch.Tensor):
        return eos_token_id
    return torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device
    )


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


class LogitsProcessor:
    """Base class of every logits processor: __call__(input_ids, scores) -> scores."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


_PARAMETERS: dict[type, list[str]] = {}


def _parameters(processor) -> list[str]:
    """processor.__call__'s parameter names, read once per class defining __call__ (not once per token)."""
    cls = type(processor)
    if cls not in _PARAMETERS:
        params = list(inspect.signature(processor.__call__).parameters)
        if not isinstance(inspect.getattr_static(cls, "__call__", None), types.FunctionType):
            return params  # a function or a builtin: read each time
        _PARAMETERS[cls] = params
    return _PARAMETERS[cls]


def _forbid(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A copy of scores with the columns `ids` at -inf (ids outside the vocabulary ignored): one copy and a few
    writes, not an isin over the whole vocabulary."""
    ids = ids.to(scores.device, torch.long)
    return scores.clone().index_fill_(-1, ids[(ids >= 0) & (ids < scores.shape[-1])], -math.inf)


class LogitsProcessorList(list):
    """Processors applied in order; extra keyword arguments reach the processors that declare them."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for processor in self:
            params = _parameters(processor)
            if len(params) > 2:
                missing = [p for p in params[2:] if p not in kwargs]
                if missing:
                    raise GenerationError(
                        f"{type(processor).__name__} needs the arguments {params}; missing {missing}"
                    )
                scores = processor(input_ids, scores, **kwargs)
            else:
                scores = processor(input_ids, scores)
        return scores


class SequenceBiasLogitsProcessor(LogitsProcessor):
    """Adds a bias to a token when it would complete one of the given token sequences
    (`{(id, ...): bias}` or `[[[id, ...], bias], ...]`)."""

    def __init__(self, sequence_bias):
        if isinstance(sequence_bias, list) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 for s in sequence_bias
        ):
            sequence_bias = {tuple(ids): bias for ids, bias in sequence_bias}
        if not isinstance(sequence_bias, dict) or not sequence_bias:
            raise GenerationError(
                f"sequence_bias must be a non-empty dict {{(token id, ...): bias}} or a list "
                f"[[[token id, ...], bias], ...], got {sequence_bias!r}"
            )
        for ids, bias in sequence_bias.items():
            if not isinstance(ids, tuple) or not ids or not all(_is_token(t) for t in ids):
                raise GenerationError(
                    f"sequence_bias keys must be non-empty tuples of token ids >= 0, got {ids!r}"
                )
            if not isinstance(bias, (int, float)) or isinstance(bias, bool):
                raise GenerationError(f"sequence_bias values must be floats, got {bias!r} for {ids}")
        self.sequence_bias = sequence_bias
        self.length_1_bias = None
        self.multi_token_biases = None

    def _prepare(self, scores: torch.Tensor) -> None:
        V = scores.shape[-1]
        bad = sorted({t for ids in self.sequence_bias for t in ids if t >= V})
        if bad:
            raise GenerationError(f"sequence_bias names token ids {bad}, but the vocabulary has {V} tokens")
        self.length_1_bias = torch.zeros(V, dtype=torch.float, device=scores.device)
        single = {ids[0]: bias for ids, bias in self.sequence_bias.items() if len(ids) == 1}
        if single:
            self.length_1_bias[list(single)] = torch.tensor(list(single.values()), device=scores.device)
        # Longer sequences grouped by prefix length: one comparison per group against the rows' tails.
        groups: dict[int, list] = {}
        for ids, bias in self.sequence_bias.items():
            if len(ids) > 1:
                groups.setdefault(len(ids) - 1, []).append((ids, bias))
        self.multi_token_biases = [
            (
                torch.tensor([ids[:-1] for ids, _ in group], device=scores.device),
                torch.tensor([ids[-1] for ids, _ in group], device=scores.device),
                torch.tensor([bias for _, bias in group], dtype=torch.float, device=scores.device),
            )
            for group in groups.values()
        ]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.length_1_bias is None:
            self._prepare(scores)
        bias = torch.zeros_like(scores)
        bias += self.length_1_bias
        for prefixes, last_tokens, biases in self.multi_token_biases:
            n = prefixes.shape[1]
            if n > input_ids.shape[1]:
                continue
            matching = (input_ids[:, None, -n:] == prefixes).all(dim=-1)  # (B, sequences)
            bias.index_add_(1, last_tokens, torch.where(matching, biases, 0.0).to(bias.dtype))
        return scores + bias


class NoBadWordsLogitsProcessor(SequenceBiasLogitsProcessor):
    """Forbids the last token of each listed token sequence after its prefix (EOS alone is never banned)."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id=None):
        if (
            not isinstance(bad_words_ids, list)
            or not bad_words_ids
            or not all(isinstance(w, list) and all(_is_token(t) for t in w) for w in bad_words_ids)
        ):
            raise GenerationError(
                f"bad_words_ids must be a non-empty list of lists of token ids >= 0, got {bad_words_ids!r}"
            )
        self.bad_word_ids = bad_words_ids
        if eos_token_id is not None:
            eos = _eos_tensor(eos_token_id).tolist()
            bad_words_ids = [w for w in bad_words_ids if all(w != [e] for e in eos)]
        super().__init__({tuple(w): float("-inf") for w in bad_words_ids})


class LogitBiasLogitsProcessor(LogitsProcessor):
    """autolm extension, OpenAI's `logit_bias`: {token id: bias} added to those tokens' logits."""

    def __init__(self, logit_bias: dict):
        try:
            items = {int(k): float(v) for k, v in dict(logit_bias).items()}
        except (TypeError, ValueError):
            raise GenerationError(f"logit_bias must map token ids to numbers, got {logit_bias!r}") from None
        if not items or any(k < 0 for k in items):
            raise GenerationError(f"logit_bias must map token ids >= 0 to numbers, got {logit_bias!r}")
        self.logit_bias = items

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        if max(self.logit_bias) >= V:
            raise GenerationError(
                f"logit_bias names token id {max(self.logit_bias)}, but the vocabulary has {V} tokens"
            )
        ids = torch.tensor(list(self.logit_bias), device=scores.device)
        values = torch.tensor([list(self.logit_bias.values())], dtype=scores.dtype, device=scores.device)
        return scores.index_add(1, ids, values.expand(scores.shape[0], -1))


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Divides positive (multiplies negative) scores of tokens already in the row; `prompt_ignore_length`
    (an int, or one per row) skips that many leading tokens (transformers passes each row's padding)."""

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None):
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not penalty > 0:
            raise GenerationError(f"repetition_penalty must be a number > 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        skip = self.prompt_ignore_length
        if isinstance(skip, int):
            input_ids = input_ids[:, skip:]
        elif isinstance(skip, torch.Tensor):
            # Ignored positions point at a spare column past the vocabulary, dropped below.
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(pos[None] < skip.to(input_ids.device)[:, None], V)
        input_ids = input_ids.clamp(max=V)
        padded = torch.nn.functional.pad(scores, (0, 1))
        seen = torch.gather(padded, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(1, input_ids, seen)[..., :V]


class PresenceFrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """autolm extension with vLLM/OpenAI semantics: subtracts `frequency_penalty` times the count of each
    token generated so far and `presence_penalty` once for any generated token (the prompt, the first
    `prompt_length_to_skip` tokens, does not count)."""

    def __init__(
        self, presence_penalty: float = 0.0, frequency_penalty: float = 0.0, prompt_length_to_skip=0
    ):
        self.presence_penalty = float(presence_penalty or 0.0)
        self.frequency_penalty = float(frequency_penalty or 0.0)
        self.prompt_length_to_skip = prompt_length_to_skip

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        new = input_ids[:, self.prompt_length_to_skip :].clamp(max=V)
        counts = torch.zeros(scores.shape[0], V + 1, dtype=scores.dtype, device=scores.device)
        counts = counts.scatter_add(1, new, torch.ones_like(new, dtype=scores.dtype))[:, :V]
        return (
            scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)
        )


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbids any token that would complete an n-gram already present in the row."""

    def __init__(self, ngram_size: int):
        if not _is_token(ngram_size) or ngram_size == 0:
            raise GenerationError(f"no_repeat_ngram_size must be an integer > 0, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n, T = self.ngram_size, input_ids.shape[-1]
        if n > T:  # no complete n-gram yet
            return scores
        prefix = input_ids[:, T + 1 - n :]
        windows = input_ids.unfold(dimension=1, size=n, step=1)  # (B, T - n + 1, n)
        matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
        V = scores.shape[-1]
        banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
        return scores.masked_fill(banned[:, :V], -float("inf"))


class _EosMask(LogitsProcessor):
    def __init__(self, eos_token_id, device="cpu"):
        self.eos_token_id = _eos_tensor(eos_token_id, device)


class MinLengthLogitsProcessor(_EosMask):
    """Forbids EOS while the row (prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id, device: str = "cpu"):
        if not _is_token(min_length):
            raise GenerationError(f"min_length must be an integer >= 0, got {min_length!r}")
        super().__init__(eos_token_id, device)
        self.min_length = min_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return _forbid(scores, self.eos_token_id) if input_ids.shape[-1] < self.min_length else scores.clone()


class MinNewTokensLengthLogitsProcessor(_EosMask):
    """Forbids EOS until `min_new_tokens` tokens follow the prompt (`prompt_length_to_skip` tokens)."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id, device: str = "cpu"):
        for name, value in (
            ("prompt_length_to_skip", prompt_length_to_skip),
            ("min_new_tokens", min_new_tokens),
        ):
            if not _is_token(value):
                raise GenerationError(f"{name} must be an integer >= 0, got {value!r}")
        super().__init__(eos_token_id, device)
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            return _forbid(scores, self.eos_token_id)
        return scores.clone()


class PrefixConstrainedLogitsProcessor(LogitsProcessor):
    """Allows only the tokens `prefix_allowed_tokens_fn(batch_id, row_ids)` returns."""

    def __init__(self, prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]], num_beams: int):
        self._prefix_allowed_tokens_fn = prefix_allowed_tokens_fn
        self._num_beams = num_beams

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        mask = torch.full_like(scores, -math.inf)
        nb = self._num_beams
        for row in range(input_ids.shape[0]):
            allowed = self._prefix_allowed_tokens_fn(row // nb, input_ids[row])
            if len(allowed) == 0:
                raise GenerationError(
                    f"prefix_allowed_tokens_fn returned no tokens for batch row {row // nb}: "
                    "the constraint cannot be satisfied"
                )
            mask[row, allowed] = 0
        out = scores + mask
        # Where every allowed token of every beam is already -inf, force them with a score of 0.
        stuck = out.amax(dim=-1).isneginf().view(-1, nb).all(dim=-1, keepdim=True)
        return torch.where(stuck.repeat_interleave(nb, dim=0), mask, out)


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    """Forces `bos_token_id` as the first token (when the row holds one token)."""

    def __init__(self, bos_token_id: int):
        self.bos_token_id = bos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.bos_token_id] = 0
        return out


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    """Forces EOS as the last token when `max_length` is reached."""

    def __init__(self, max_length: int, eos_token_id, device: str = "cpu"):
        self.max_length = max_length
        self.eos_token_id = _eos_tensor(eos_token_id, device)
        if torch.is_floating_point(self.eos_token_id) or (self.eos_token_id < 0).any():
            raise GenerationError(f"forced_eos_token_id must be token ids >= 0, got {eos_token_id!r}")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.max_length - 1:
            return scores
        out = torch.full_like(scores, -math.inf)
        out[:, self.eos_token_id] = 0
        return out


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    """NaN -> 0, +-inf -> the dtype's largest / smallest finite value."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.where(scores != scores, 0.0, scores)
        out = torch.where(scores == float("inf"), torch.finfo(scores.dtype).max, out)
        return torch.where(scores == -float("inf"), torch.finfo(scores.dtype).min, out)


class ExponentialDecayLengthPenalty(LogitsProcessor):
    """Raises EOS's score exponentially once `start` tokens are generated: (start, decay factor)."""

    def __init__(
        self, exponential_decay_length_penalty: tuple[int, float], eos_token_id, input_ids_seq_length: int
    ):
        self.regulation_start = exponential_decay_length_penalty[0] + input_ids_seq_length
        self.regulation_factor = exponential_decay_length_penalty[1]
        self.eos_token_id = _eos_tensor(eos_token_id)
        if torch.is_floating_point(self.eos_token_id) or (self.eos_token_id < 0).any():
            raise GenerationError(f"eos_token_id must be token ids >= 0, got {eos_token_id!r}")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cur_len = input_ids.shape[-1]
        if cur_len <= self.regulation_start:
            return scores
        eos = self.eos_token_id.to(scores.device)
        # The penalty is taken on |score| so that negative EOS scores rise too.
        penalty = torch.abs(scores[:, eos]) * (
            pow(self.regulation_factor, cur_len - self.regulation_start) - 1
        )
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = penalty.masked_fill(~torch.isfinite(scores[:, eos]), 0.0)
        return scores + penalties


class SuppressTokensLogitsProcessor(LogitsProcessor):
    """Forbids the listed tokens at every step."""

    def __init__(self, suppress_tokens, device: str = "cpu"):
        self.suppress_tokens = torch.tensor(list(suppress_tokens), device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return _forbid(scores, self.suppress_tokens)


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    """Forbids the listed tokens at the first generated position (`begin_index`)."""

    def __init__(self, begin_suppress_tokens, begin_index: int, device: str = "cpu"):
        self.begin_suppress_tokens = torch.tensor(list(begin_suppress_tokens), device=device)
        self.begin_index = begin_index

    def set_begin_index(self, begin_index: int) -> None:
        """Move the position the tokens are suppressed at."""
        self.begin_index = begin_index

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.begin_index:
            return scores
        return _forbid(scores, self.begin_suppress_tokens)
