"""Where speculative decoding's candidate tokens come from, with transformers' rules
(generation/candidate_generator.py): n-grams of the sequence itself (`PromptLookup`) or a draft model with the
same tokenizer (`Draft`). Each proposes up to `limit` tokens per row for the model to verify in one forward,
then hears how many were accepted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..step import decoder
from .config import GenerationConfig
from .processors import LogitsProcessorList
from .sampling import choose
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

# Warpers reshape a distribution: on the uniform logits of the forbidden-token check they would forbid
# arbitrary tokens (top_p drops the lowest ids), so only the other processors are asked.
_WARPERS = (EpsilonLogitsWarper, EtaLogitsWarper, LogitNormalization, MinPLogitsWarper, TemperatureLogitsWarper,
            TopHLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)  # fmt: skip


@dataclass
class Candidates:
    """tokens (B, k) proposed after each row, how many of them are real in each row (B,) (the rest is
    filler), and the draft's processed scores (B, k, V) they were drawn from (None for prompt lookup)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor | None = None


def _none(rows: int, device) -> Candidates:
    empty = torch.zeros(rows, 0, dtype=torch.long, device=device)
    return Candidates(empty, torch.zeros(rows, dtype=torch.long, device=device))


class PromptLookup:
    """Candidates copied from the sequence itself: the tokens that followed the first earlier occurrence of
    its last n tokens (n from max_matching_ngram_size down to 1), cut before an EOS token and before a token
    the logits processors forbid (transformers' PromptLookupCandidateGenerator)."""

    def __init__(self, num_tokens: int, ngram: int, eos: list[int], processors):
        self.num_tokens, self.ngram = num_tokens, ngram
        self.eos = torch.tensor(eos, dtype=torch.long) if eos else None
        self.forbidding = LogitsProcessorList(p for p in processors if not isinstance(p, _WARPERS))

    def _row(self, row: torch.Tensor, limit: int) -> torch.Tensor:
        L = row.shape[0]
        for n in range(min(self.ngram, L - 1), 0, -1):
            windows = row.unfold(0, n, 1)  # (L - n + 1, n)
            starts = (windows == row[-n:]).all(1).nonzero().flatten() + n
            starts = starts[starts < L]  # the match at the very end has no continuation
            if starts.numel():
                start = int(starts[0])
                found = row[start : min(start + self.num_tokens, start + limit, L)]
                if self.eos is not None:
                    at = torch.isin(found, self.eos.to(found.device)).nonzero()
                    found = found[: int(at[0])] if at.numel() else found
                return found
        return row[:0]

    def propose(self, run, limit: int) -> Candidates:
        rows = [self._row(r, limit) for r in run.ids]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=run.ids.device)
        k = int(lengths.max()) if limit > 0 else 0
        if k == 0:
            return _none(len(rows), run.ids.device)
        tokens = torch.stack([torch.cat([r, r.new_zeros(k - len(r))]) for r in rows])
        return Candidates(tokens, self._allowed(run, tokens, lengths))

    def _allowed(self, run, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """lengths cut before the first candidate the processors set to -inf on uniform logits."""
        if not self.forbidding:
            return lengths
        B, V = tokens.shape[0], run.model.config.vocab_size
        for j in range(tokens.shape[1]):
            ids = torch.cat([run.ids, tokens[:, :j]], 1)
            scores = self.forbidding(ids, torch.ones(B, V, device=tokens.device))
            picked = scores.gather(1, tokens[:, j : j + 1]).squeeze(1)
            forbidden = (picked == -float("inf")) | (picked == torch.finfo(picked.dtype).min)
            lengths = torch.where(forbidden & (lengths > j), torch.full_like(lengths, j), lengths)
        return lengths

    def accepted(self, n: int, k: int) -> None:
        """Prompt lookup keeps no state between rounds."""


class Draft:
    """Candidates drafted by a smaller model with the same tokenizer, through its own KV cache and decode step
    (the fast CPU one-token step for one row), with the run's logits processors and sampling settings, as
    transformers' AssistedCandidateGenerator. Up to num_assistant_tokens per round, stopping early after an
    EOS or a token drawn with less than assistant_confidence_threshold probability; the settings come from
    generate()'s arguments, else the draft's generation config, else transformers' defaults (20, "constant",
    0.4). Schedules: "heuristic" (2 more after a round that accepted everything, else 1 fewer; kept in the draft's
    generation config for the next call), "heuristic_transient" (the same, not kept), "constant". For one row
    the threshold moves, after each round, to the one that minimises false positives + 3 x false negatives
    of the draft's confidence as a predictor of acceptance (what transformers does with scikit-learn)."""

    def __init__(self, draft, run, capacity: int):
        self.model = draft
        base = draft.get_base_model() if hasattr(draft, "get_base_model") else draft
        self.base = base
        own = getattr(base, "generation_config", None) or GenerationConfig()
        pick = lambda name, default: next(  # noqa: E731
            v for v in (getattr(run.cfg, name), getattr(own, name), default) if v is not None
        )
        self.num = pick("num_assistant_tokens", 20)
        self.schedule = pick("num_assistant_tokens_schedule", "constant")
        self.threshold = pick("assistant_confidence_threshold", 0.4)
        self.cache = base.make_cache(run.ids.shape[0], capacity)
        self.device = base.device
        self.fed = 0  # leading columns of run.ids the draft's cache holds
        self.drafted = 0  # candidates proposed in the current round
        self.step = None
        self.mark = None  # a recurrent draft's cache before its candidates (nn.cache.KVCache.mark)
        self.probs: list[float] = []
        self.matches: list[int] = []

    def _feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the draft over the columns of ids (B, L) its cache lacks; the next token's logits (B, V)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        L = ids.shape[1]
        if L - self.fed > 2:  # the prompt: one forward
            out = self.model(ids[:, self.fed :], attention_mask=mask, position_ids=positions[:, self.fed :],
                             past_key_values=self.cache, logits_to_keep=1)  # fmt: skip
            self.fed = L
            return out.logits[:, -1]
        self.step = self.step or decoder(self.model, self.cache, mask)
        for j in range(self.fed, L):
            logits = self.step(ids[:, j : j + 1], mask[:, : j + 1], positions[:, j : j + 1], self.cache)
        self.fed = L
        return logits

    def propose(self, run, limit: int) -> Candidates:
        ids = run.ids.to(self.device)
        B, L = ids.shape
        limit = min(limit, self.num, self.base.config.max_position_embeddings - L)
        if limit <= 0:
            return _none(B, run.ids.device)
        # The run's mask covers its cache (perhaps a prefix the caller cached); the draft sees the ids.
        mask = torch.cat([run.mask[:, run.mask.shape[1] - L + 1 :], run.mask.new_ones(B, 1)], 1).to(
            self.device
        )
        if self.mark is not None and self.fed < self.cache.length:  # recurrent layers: back before the round
            self.cache.restore(self.mark)
            self.fed = min(self.fed, self.cache.length)
        self.cache.length = self.fed
        logits = self._feed(ids, mask)
        self.mark = self.cache.mark() if self.cache.states else None
        live = run.live().to(self.device)
        tokens, scores, ended = [], [], torch.zeros(B, dtype=torch.bool, device=self.device)
        for i in range(limit):
            s = run.processors(torch.cat([ids, *[t[:, None] for t in tokens]], 1), logits.float())
            token = choose(s, run.cfg, run.generator)
            tokens.append(token)
            scores.append(s)
            confidence = s.softmax(-1).gather(1, token[:, None]).squeeze(1)
            if B == 1:
                self.probs.append(float(confidence[0]))
            if run.eos is not None:
                ended |= torch.isin(token, run.eos.to(token.device))
            unsure = bool(((confidence < self.threshold) & live).any()) if self.threshold > 0 else False
            if i == limit - 1 or unsure or bool((ended | ~live).all()):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits = self._feed(torch.cat([ids, torch.stack(tokens, 1)], 1), mask)
        self.drafted = len(tokens)
        dev = run.ids.device
        stacked = torch.stack(tokens, 1).to(dev)
        lengths = torch.full((B,), len(tokens), dtype=torch.long, device=dev)
        return Candidates(stacked, lengths, torch.stack(scores, 1).to(dev) if run.cfg.do_sample else None)

    def accepted(self, n: int, k: int) -> None:
        """n of the k candidates were accepted: keep the draft's cache up to them; adapt the schedule."""
        L = self.fed - (k - 1)  # the columns before this round's candidates
        self.fed = L + min(n, k - 1)
        if self.schedule in ("heuristic", "heuristic_transient"):
            self.num = self.num + 2 if n == k else max(1, self.num - 1)
            if self.schedule == "heuristic":
                if getattr(self.base, "generation_config", None) is None:
                    self.base.generation_config = GenerationConfig.from_model_config(self.base.config)
                self.base.generation_config.num_assistant_tokens = self.num
        if self.probs and self.threshold > 0:
            self._adapt(n)

    def _adapt(self, n: int) -> None:
        self.matches.extend([1] * n)
        if len(self.probs) > len(self.matches):
            self.matches.append(0)
        del self.probs[len(self.matches) :]
        if len(self.probs) > 5 and {0, 1} <= set(self.matches):
            self.threshold = roc_threshold(self.probs, self.matches)


def roc_threshold(probs: list[float], matches: list[int]) -> float:
    """The confidence threshold with the least false-positive rate + 3 x false-negative rate, over the ROC
    curve's thresholds (+inf first, then each distinct probability, highest first), as transformers computes
    it with sklearn.metrics.roc_curve."""
    p = torch.tensor(probs, dtype=torch.float64)
    m = torch.tensor(matches, dtype=torch.bool)
    thresholds = [float("inf"), *torch.unique(p).flip(0).tolist()]
    positives, negatives = int(m.sum()), int((~m).sum())
    best, best_cost = thresholds[0], float("inf")
    for t in thresholds:
        above = p >= t
        tpr = int((above & m).sum()) / positives
        fpr = int((above & ~m).sum()) / negatives
        cost = fpr + 3 * (1 - tpr)
        if cost < best_cost:
            best, best_cost = t, cost
    return best
