"""Stopping criteria with transformers' names and constructor signatures: each maps (input_ids (B, T),
the scores so far or None) to a (B,) bool tensor, True where a row is done."""

from __future__ import annotations

import time

import torch

from ..errors import GenerationError
from .config import GenerationConfig


class StoppingCriteria:
    """Base class of every stopping criterion: __call__(input_ids, scores) -> (B,) bool."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


def _rows(done, input_ids: torch.Tensor) -> torch.Tensor:
    """A criterion's answer (a bool or a (B,) tensor) as a (B,) bool tensor."""
    return torch.as_tensor(done, device=input_ids.device).bool().expand(input_ids.shape[0])


class StoppingCriteriaList(list):
    """Criteria combined: a row is done when any criterion says so."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criteria in self:
            done = done | _rows(criteria(input_ids, scores, **kwargs), input_ids)
        return done

    @property
    def max_length(self) -> int | None:
        """The max_length of the first MaxLengthCriteria in the list, else None."""
        return next((c.max_length for c in self if isinstance(c, MaxLengthCriteria)), None)


class MaxLengthCriteria(StoppingCriteria):
    """Done once the rows (prompt included) hold max_length tokens."""

    def __init__(self, max_length: int, max_position_embeddings: int | None = None):
        self.max_length = max_length
        self.max_position_embeddings = max_position_embeddings

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return _rows(input_ids.shape[1] >= self.max_length, input_ids)


class MaxTimeCriteria(StoppingCriteria):
    """Done once max_time seconds have passed since `initial_timestamp` (by default, construction)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None):
        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return _rows(time.time() - self.initial_timestamp > self.max_time, input_ids)


class EosTokenCriteria(StoppingCriteria):
    """Done when the last token is one of the EOS tokens."""

    def __init__(self, eos_token_id):
        if not isinstance(eos_token_id, torch.Tensor):
            eos_token_id = torch.tensor(
                [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            )
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores, new_token_length: int = 1, **kwargs) -> torch.Tensor:
        self.eos_token_id = self.eos_token_id.to(input_ids.device)
        return torch.isin(input_ids[:, -new_token_length:], self.eos_token_id).any(dim=-1)


class StopStringCriteria(StoppingCriteria):
    """Done when the text of the row's last tokens contains a stop string that reaches into the newest token
    (a stop string that ended before it does not count). The tail is decoded with the tokenizer, one
    window of tokens per row, never the whole row."""

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        if tokenizer is None:
            raise GenerationError("stop_strings needs a tokenizer: pass generate(..., tokenizer=tok)")
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) for s in self.stop_strings):
            raise GenerationError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        # Every token decodes to at least one character, so this many tokens cover any stop string.
        self.maximum_token_len = max(len(s) for s in self.stop_strings) + 1

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, -self.maximum_token_len :].tolist():
            before = self.tokenizer.decode(row[:-1])
            text = self.tokenizer.decode(row)
            done.append(any(text.rfind(s) + len(s) > len(before) for s in self.stop_strings if s in text))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def merge(defaults: list, custom) -> list:
    """transformers' rule: a caller's object replaces the built-in one of the same type; the caller's
    others follow the built-in ones."""
    custom = list(custom or ())
    if not custom:
        return defaults
    out = type(defaults)()
    for d in defaults:
        out.append(next((c for c in custom if type(c) is type(d)), d))
    out.extend(c for c in custom if c not in out)
    return out


def build_criteria(cfg: GenerationConfig, tokenizer=None, custom=(), max_length: int | None = None):
    """The criteria generate() checks after each token, in transformers' order: max length, max time, stop
    strings, EOS, then the caller's own."""
    criteria = StoppingCriteriaList()
    if max_length is not None:
        criteria.append(MaxLengthCriteria(max_length))
    if cfg.max_time is not None:
        criteria.append(MaxTimeCriteria(cfg.max_time))
    if cfg.stop_strings is not None:
        criteria.append(StopStringCriteria(tokenizer, cfg.stop_strings))
    if cfg.eos_ids:
        criteria.append(EosTokenCriteria(cfg.eos_ids))
    return merge(criteria, custom)
