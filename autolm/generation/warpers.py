"""Sampling warpers with transformers' names, constructor signatures and arithmetic (applied only when
sampling), and the final log-softmax normalization."""

from __future__ import annotations

import torch

from ..errors import GenerationError
from .processors import LogitsProcessor

_INF = -float("inf")


def _keep_count(min_tokens_to_keep) -> int:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise GenerationError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
    return min_tokens_to_keep


def _open_unit(name: str, value) -> float:
    value = float(value)
    if not 0 < value < 1:
        raise GenerationError(f"{name} must be in (0, 1), got {value!r}")
    return value


class TemperatureLogitsWarper(LogitsProcessor):
    """Divides the scores by the temperature."""

    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise GenerationError(
                f"temperature must be > 0, got {temperature!r} (use do_sample=False for greedy decoding)"
            )
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keeps the k highest scores (ties with the k-th included)."""

    def __init__(self, top_k: int, filter_value: float = _INF, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
            raise GenerationError(f"top_k must be an integer > 0, got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.size(-1))
        return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Keeps the smallest set of top tokens whose probability mass reaches top_p."""

    def __init__(self, top_p: float, filter_value: float = _INF, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0 <= top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = _keep_count(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - self.top_p)
        remove[..., -self.min_tokens_to_keep :] = 0
        return scores.masked_fill(remove.scatter(1, sorted_idx, remove), self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """Drops tokens less likely than min_p times the most likely one."""

    def __init__(self, min_p: float, filter_value: float = _INF, min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {min_p!r}")
        self.min_p = min_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = _keep_count(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        remove.scatter_(-1, keep, False)
        return scores.masked_fill(remove, self.filter_value)


class TopHLogitsWarper(LogitsProcessor):
    """Entropy-bounded sampling: the top tokens (at most 100) whose cumulative entropy stays within
    top_h times the distribution's entropy."""

    def __init__(self, top_h: float, filter_value: float = _INF):
        if not 0 < top_h <= 1:
            raise GenerationError(f"top_h must be in (0, 1], got {top_h!r}")
        self.top_n = 100
        self.top_h = top_h
        self.filter_value = filter_value

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top_logits, top_idx = torch.topk(scores, min(self.top_n, scores.shape[-1]), dim=-1)
        dist = torch.distributions.Categorical(logits=top_logits)
        probs = dist.probs
        tau = (dist.entropy() * self.top_h).unsqueeze(-1)
        selected = torch.cumsum(-probs * torch.log(probs), dim=-1) <= tau
        selected[:, 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_idx, selected)
        out = scores.clone()
        out[~keep] = self.filter_value
        return out


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling: the tokens whose surprise is closest to the entropy, up to `mass`."""

    def __init__(self, mass: float = 0.9, filter_value: float = _INF, min_tokens_to_keep: int = 1):
        self.mass = _open_unit("typical_p", mass)
        self.filter_value = filter_value
        self.min_tokens_to_keep = _keep_count(min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        normalized = torch.nn.functional.log_softmax(scores, dim=-1)
        ent = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
        shifted, sorted_idx = torch.sort(torch.abs(-normalized - ent), descending=False)
        cum = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < self.mass).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last.view(-1, 1))
        remove[..., : self.min_tokens_to_keep] = 0
        return scores.masked_fill(remove.scatter(1, sorted_idx, remove), self.filter_value)


class EpsilonLogitsWarper(LogitsProcessor):
    """Drops tokens with probability below epsilon."""

    def __init__(self, epsilon: float, filter_value: float = _INF, min_tokens_to_keep: int = 1):
        self.epsilon = _open_unit("epsilon_cutoff", epsilon)
        self.filter_value = filter_value
        self.min_tokens_to_keep = _keep_count(int(min_tokens_to_keep))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        remove = scores.softmax(dim=-1) < self.epsilon
        k = min(self.min_tokens_to_keep, scores.size(-1))
        remove = remove & (scores < torch.topk(scores, k)[0][..., -1, None])
        return scores.masked_fill(remove, self.filter_value)


class EtaLogitsWarper(LogitsProcessor):
    """Eta sampling: drops tokens below min(epsilon, sqrt(epsilon) * exp(-entropy))."""

    def __init__(self, epsilon: float, filter_value: float = _INF, min_tokens_to_keep: int = 1, device="cpu"):
        self.epsilon = torch.tensor(_open_unit("eta_cutoff", epsilon), device=device)
        self.filter_value = filter_value
        self.min_tokens_to_keep = _keep_count(int(min_tokens_to_keep))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        eps = self.epsilon.to(scores.device)
        eta = torch.min(eps, torch.sqrt(eps) * torch.exp(-entropy))[..., None]
        remove = scores.softmax(dim=-1) < eta
        k = min(self.min_tokens_to_keep, scores.size(-1))
        remove = remove & (scores < torch.topk(scores, k)[0][..., -1, None])
        return scores.masked_fill(remove, self.filter_value)


class LogitNormalization(LogitsProcessor):
    """log-softmax over the vocabulary (renormalize_logits): always the last processor."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.log_softmax(dim=-1)
