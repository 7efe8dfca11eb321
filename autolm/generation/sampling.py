"""The one sampler: logits processors in transformers' order, then a draw or the argmax. generate, beam
search and the server all use it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import GenerationError
from .config import GenerationConfig

# ---- logits processors (fp32 scores (B, V) -> scores) ------------------------------------------------


def apply_repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive (multiply negative) logits of every token already in the sequence by `penalty`."""
    seen = torch.gather(scores, 1, input_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, input_ids, seen)


def apply_top_k(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    k = min(max(k, keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -float("inf"))


def apply_top_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -keep:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


def apply_min_p(scores: torch.Tensor, min_p: float, keep: int = 1) -> torch.Tensor:
    probs = scores.softmax(-1)
    remove = probs < min_p * probs.amax(-1, keepdim=True)
    sorted_idx = torch.argsort(scores, descending=True)
    sorted_remove = torch.gather(remove, 1, sorted_idx)
    sorted_remove[..., :keep] = False
    return scores.masked_fill(sorted_remove.scatter(1, sorted_idx, sorted_remove), -float("inf"))


def apply_no_repeat_ngram(scores: torch.Tensor, input_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the row (transformers' rule)."""
    if input_ids.shape[1] + 1 < n:
        return scores
    banned = []
    for b, row in enumerate(input_ids.tolist()):
        prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
        banned += [
            (b, row[i + n - 1]) for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix
        ]
    if not banned:
        return scores
    rows, cols = zip(*banned)
    scores = scores.clone()
    scores[list(rows), list(cols)] = -float("inf")
    return scores


def process_logits(
    scores: torch.Tensor,
    input_ids: torch.Tensor,
    cfg: GenerationConfig,
    new_tokens: int,
    keep: int = 1,
    processors: Sequence[Callable] = (),
) -> torch.Tensor:
    """transformers' order: repetition penalty, no-repeat n-grams, min_new_tokens, then (sampling)
    temperature, top-k, top-p, min-p, then the caller's own processors (callables (ids, scores) -> scores)."""
    if cfg.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, input_ids, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        scores = apply_no_repeat_ngram(scores, input_ids, cfg.no_repeat_ngram_size)
    if cfg.min_new_tokens and new_tokens < cfg.min_new_tokens and cfg.eos_ids:
        scores = scores.clone()
        scores[:, cfg.eos_ids] = -float("inf")
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k:
            scores = apply_top_k(scores, cfg.top_k, keep)
        if cfg.top_p < 1.0:
            scores = apply_top_p(scores, cfg.top_p, keep)
        if cfg.min_p is not None:
            scores = apply_min_p(scores, cfg.min_p, keep)
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def choose(
    scores: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token per row from processed scores (B, V): a draw when sampling, else the argmax."""
    if cfg.do_sample:
        return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
    return scores.argmax(-1)


# ---- stop strings --------------------------------------------------------------------------------------


class StopStrings:
    """Stops a row once its newly generated text contains any stop string."""

    def __init__(self, stops: str | list[str], tokenizer):
        if tokenizer is None:
            raise GenerationError("stop_strings needs a tokenizer: pass generate(..., tokenizer=tok)")
        self.stops = [stops] if isinstance(stops, str) else list(stops)
        self.tokenizer = tokenizer
        self.window = max(len(s) for s in self.stops) + 8  # tokens to decode: each is at least one char

    def hit(self, new_ids: torch.Tensor) -> torch.Tensor:
        """new_ids (B, n) -> (B,) bool."""
        tail = new_ids[:, -self.window :].tolist()
        texts = [self.tokenizer.decode(row) for row in tail]
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool)
