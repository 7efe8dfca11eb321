"""Text watermarks for generate(), with transformers' names, defaults and arithmetic: the green-list watermark of
Kirchenbauer et al. (WatermarkingConfig, WatermarkLogitsProcessor) and SynthID Text's tournament watermark
(SynthIDTextWatermarkingConfig, SynthIDTextWatermarkLogitsProcessor). generate(watermarking_config=...) runs the
processor after every other one (before log-softmax with renormalize_logits), as transformers does. The green-list
detector is watermark_detector.py."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from ..errors import GenerationError
from .processors import LogitsProcessor


def _bad(key: str, expected: str, found: Any) -> GenerationError:
    return GenerationError(f"watermarking_config.{key} must be {expected}, got {found!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


class BaseWatermarkingConfig:
    """What both watermark configs share: dict and JSON forms, update(), validate(), construct_processor()."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A config from a dict of its fields; `kwargs` naming fields override them."""
        try:
            config = cls(**config_dict)
        except TypeError as e:
            raise GenerationError(f"watermarking_config: {e}") from None
        config.update(**kwargs)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict."""
        return copy.deepcopy(self.__dict__)

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def to_json_string(self) -> str:
        """The fields as indented JSON."""
        return json.dumps(self.__dict__, indent=2) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """The fields as JSON with sorted keys, written to a file."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def update(self, **kwargs: Any) -> None:
        """Set the named fields (names that are not fields are ignored, as transformers)."""
        for key, value in kwargs.items():
            if hasattr(self, key):
                setattr(self, key, value)

    def validate(self) -> None:
        raise NotImplementedError

    def construct_processor(self, vocab_size: int | None, device) -> LogitsProcessor:
        raise NotImplementedError


class WatermarkingConfig(BaseWatermarkingConfig):
    """Kirchenbauer et al.'s green-list watermark (arXiv 2306.04634): `bias` is added to the logits of a random
    `greenlist_ratio` share of the vocabulary, drawn from a seed that `hashing_key` and the previous tokens give
    ('lefthash': the last token; 'selfhash': the last `context_width` tokens and the candidate itself)."""

    def __init__(
        self,
        greenlist_ratio: float = 0.25,
        bias: float = 2.0,
        hashing_key: int = 15485863,
        seeding_scheme: str = "lefthash",
        context_width: int = 1,
    ):
        self.greenlist_ratio = greenlist_ratio
        self.bias = bias
        self.hashing_key = hashing_key
        self.seeding_scheme = seeding_scheme
        self.context_width = context_width

    def validate(self) -> None:
        """GenerationError naming the field that is wrong (transformers' checks, and the types)."""
        if self.seeding_scheme not in ("selfhash", "lefthash"):
            raise _bad("seeding_scheme", "'selfhash' or 'lefthash'", self.seeding_scheme)
        if not _is_num(self.greenlist_ratio) or not 0.0 <= self.greenlist_ratio <= 1.0:
            raise _bad("greenlist_ratio", "a number in [0, 1]", self.greenlist_ratio)
        if not _is_int(self.context_width) or self.context_width < 1:
            raise _bad("context_width", "a positive integer", self.context_width)
        if not _is_num(self.bias):
            raise _bad("bias", "a number", self.bias)
        if not _is_int(self.hashing_key):
            raise _bad("hashing_key", "an integer", self.hashing_key)

    def construct_processor(self, vocab_size: int | None, device) -> WatermarkLogitsProcessor:
        """The processor generate() runs (vocab_size None: the width of the scores it is given)."""
        return WatermarkLogitsProcessor(vocab_size, device, **self.to_dict())


class SynthIDTextWatermarkingConfig(BaseWatermarkingConfig):
    """SynthID Text (Dathathri et al., Nature 2024): a tournament over `len(keys)` layers of pseudo-random g-values,
    keyed by the last `ngram_len - 1` tokens and the candidate; a context already seen is not watermarked again."""

    def __init__(
        self,
        ngram_len: int,
        keys: list[int],
        context_history_size: int = 1024,
        sampling_table_seed: int = 0,
        sampling_table_size: int = 2**16,
        skip_first_ngram_calls: bool = False,
        debug_mode: bool = False,
    ):
        self.ngram_len = ngram_len
        self.keys = keys
        self.sampling_table_size = sampling_table_size
        self.sampling_table_seed = sampling_table_seed
        self.context_history_size = context_history_size
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode

    def validate(self) -> None:
        """GenerationError naming the field that is wrong (transformers' check of the table size, and the types)."""
        size = self.sampling_table_size
        if not _is_int(size) or not 0 < size <= 2**24:
            raise _bad("sampling_table_size", "an integer in [1, 2**24]", size)
        if not _is_int(self.ngram_len) or self.ngram_len < 1:
            raise _bad("ngram_len", "a positive integer", self.ngram_len)
        keys = self.keys
        if not isinstance(keys, (list, tuple)) or not keys or not all(_is_int(k) for k in keys):
            raise _bad("keys", "a non-empty list of integers", keys)
        for key in ("context_history_size", "sampling_table_seed"):
            if not _is_int(getattr(self, key)) or getattr(self, key) < (key == "context_history_size"):
                raise _bad(key, "a positive integer" if key == "context_history_size" else "an integer >= 0",
                           getattr(self, key))  # fmt: skip
        for key in ("skip_first_ngram_calls", "debug_mode"):
            if not isinstance(getattr(self, key), bool):
                raise _bad(key, "true or false", getattr(self, key))

    def construct_processor(self, vocab_size: int | None, device) -> SynthIDTextWatermarkLogitsProcessor:
        """The processor generate() runs (the vocabulary is the width of the scores it is given)."""
        return SynthIDTextWatermarkLogitsProcessor(
            self.ngram_len, self.keys, self.sampling_table_size, self.sampling_table_seed,
            self.context_history_size, device, self.skip_first_ngram_calls, self.debug_mode,
        )  # fmt: skip


def as_watermarking_config(value) -> BaseWatermarkingConfig | None:
    """generate()'s watermarking_config as one of autolm's configs: a config, a dict (a WatermarkingConfig as in
    transformers, or a SynthID one when it has `keys` and `ngram_len`), or a transformers config object."""
    if value is None or isinstance(value, BaseWatermarkingConfig):
        return value
    if not isinstance(value, dict) and hasattr(value, "to_dict"):  # transformers' own configs
        synthid = type(value).__name__ == "SynthIDTextWatermarkingConfig"
        cls = SynthIDTextWatermarkingConfig if synthid else WatermarkingConfig
        return cls.from_dict(value.to_dict())
    if isinstance(value, dict):
        synthid = "keys" in value and "ngram_len" in value
        return (SynthIDTextWatermarkingConfig if synthid else WatermarkingConfig).from_dict(value)
    raise GenerationError(
        f"watermarking_config must be a WatermarkingConfig, a SynthIDTextWatermarkingConfig or a dict, "
        f"got {type(value).__name__}"
    )


class WatermarkLogitsProcessor(LogitsProcessor):
    """Adds `bias` to each row's green list: `greenlist_ratio` of a permutation of the vocabulary drawn by a
    torch.Generator seeded from `hashing_key` and the row's last token ('lefthash'), or for each of the 40 best
    candidates from the last `context_width` tokens and that candidate, kept when it is green itself ('selfhash')."""

    table_size = 1_000_003

    def __init__(
        self,
        vocab_size: int | None,
        device,
        greenlist_ratio: float = 0.25,
        bias: float = 2.0,
        hashing_key: int = 15485863,
        seeding_scheme: str = "lefthash",
        context_width: int = 1,
    ):
        WatermarkingConfig(greenlist_ratio, bias, hashing_key, seeding_scheme, context_width).validate()
        if not 0.0 < greenlist_ratio < 1.0:
            raise _bad("greenlist_ratio", "in (0, 1) to watermark", greenlist_ratio)
        self.vocab_size = vocab_size
        self.greenlist_ratio = greenlist_ratio
        self.bias = bias
        self.seeding_scheme = seeding_scheme
        self.hash_key = hashing_key
        self.context_width = context_width
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(hashing_key)
        self.fixed_table = torch.randperm(self.table_size, generator=self.rng, device=device)

    def set_seed(self, input_seq: torch.Tensor) -> None:
        """Seed the generator from a row's last `context_width` tokens (int64 products wrap, as in torch)."""
        input_seq = input_seq[-self.context_width :]
        if self.seeding_scheme == "selfhash":
            a = self.fixed_table[input_seq % self.table_size] + 1
            b = self.fixed_table[input_seq[-1] % self.table_size] + 1
            seed = (self.hash_key * a * b).min().item()
        else:
            seed = self.hash_key * input_seq[-1].item()
        self.rng.manual_seed(seed % (2**64 - 1))

    def _get_greenlist_ids(self, input_seq: torch.Tensor) -> torch.Tensor:
        self.set_seed(input_seq)
        V = self.vocab_size
        permutation = torch.randperm(V, device=input_seq.device, generator=self.rng)
        return permutation[: int(V * self.greenlist_ratio)]

    def _score_rejection_sampling(self, input_seq: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The green list of 'selfhash': of the 40 best candidates, those green under their own seed."""
        _, best = scores.sort(dim=-1, descending=True)
        green = [
            best[i]
            for i in range(40)
            if best[i] in self._get_greenlist_ids(torch.cat([input_seq, best[i, None]]))
        ]
        return (
            torch.stack(green) if green else best[:0]
        )  # transformers fails on an empty list; nothing is green

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] < self.context_width:  # too little context to seed from: unchanged
            return scores
        if self.vocab_size is None:
            self.vocab_size = scores.shape[-1]
        out = scores.clone()
        for row, input_seq in enumerate(input_ids):
            if self.seeding_scheme == "selfhash":
                green = self._score_rejection_sampling(input_seq, scores[row])
            else:
                green = self._get_greenlist_ids(input_seq)
            out[row, green] = out[row, green] + self.bias
        return out


class SynthIDTextWatermarkState:
    """What SynthID keeps between steps: each row's last `ngram_len - 1` tokens and the hashes of the contexts
    already watermarked."""

    def __init__(self, batch_size: int, ngram_len: int, context_history_size: int, device):
        self.context = torch.zeros((batch_size, ngram_len - 1), dtype=torch.int64, device=device)
        self.context_history = torch.zeros(
            (batch_size, context_history_size), dtype=torch.int64, device=device
        )
        self.num_calls = 0


_MULTIPLIER = 6364136223846793005  # the linear congruential generator's (newlib/musl)


def accumulate_hash(current: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """SynthID's hash: for each value d along data's last axis, h = (h + d) * multiplier + 1 in wrapping int64
    (current broadcasts against data.shape[:-1])."""
    for i in range(data.shape[-1]):
        current = (current + data[..., i]) * _MULTIPLIER + 1
    return current


class SynthIDTextWatermarkLogitsProcessor(LogitsProcessor):
    """SynthID Text's tournament: each layer's g-values (0/1 from a seeded table, keyed by the context hash, the
    candidate and that layer's key) reweight the probabilities; scores come back as log-probabilities. Stateful:
    one instance per generation (generate builds it), called once per new token."""

    def __init__(
        self,
        ngram_len: int,
        keys: list[int],
        sampling_table_size: int,
        sampling_table_seed: int,
        context_history_size: int,
        device,
        skip_first_ngram_calls: bool = False,
        debug_mode: bool = False,
    ):
        self.ngram_len = ngram_len
        self.keys = torch.tensor(keys, device=device)
        generator = torch.Generator(device=device).manual_seed(sampling_table_seed)
        self.sampling_table = torch.randint(0, 2, (sampling_table_size,), generator=generator, device=device)
        self.context_history_size = context_history_size
        self.device = device
        self.state: SynthIDTextWatermarkState | None = None
        self.skip_first_ngram_calls = skip_first_ngram_calls
        self.debug_mode = debug_mode

    def _with_keys(self, hashes: torch.Tensor) -> torch.Tensor:
        """(...,) hashes -> (..., depth): each hash carried on with each layer's key."""
        return accumulate_hash(hashes[..., None], self.keys[:, None])

    def compute_ngram_keys(self, ngrams: torch.Tensor) -> torch.Tensor:
        """(B, n, ngram_len) n-grams -> (B, n, depth) keys."""
        if ngrams.dim() != 3 or ngrams.shape[2] != self.ngram_len:
            raise GenerationError(f"ngrams must be (batch, n, {self.ngram_len}), got {tuple(ngrams.shape)}")
        ones = torch.ones(ngrams.shape[:2], device=ngrams.device, dtype=torch.long)
        return self._with_keys(accumulate_hash(ones, ngrams))

    def sample_g_values(self, ngram_keys: torch.Tensor) -> torch.Tensor:
        """Keys -> g-values (0 or 1) from the sampling table, by the key modulo the table's size."""
        return self.sampling_table[ngram_keys % self.sampling_table.shape[0]]

    def compute_g_values(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T - ngram_len + 1, depth) g-values of each n-gram."""
        return self.sample_g_values(self.compute_ngram_keys(input_ids.unfold(1, self.ngram_len, 1)))

    def update_scores(self, scores: torch.Tensor, g_values: torch.Tensor) -> torch.Tensor:
        """The tournament on (B, V) scores with (B, V, depth) g-values: log-probabilities (B, V)."""
        probs = torch.softmax(scores, dim=1)
        for i in range(g_values.shape[2]):
            g = g_values[:, :, i]
            g_mass = (g * probs).sum(axis=1, keepdims=True)
            probs = probs * (1 + g - g_mass)
        log_probs = torch.log(probs)
        return torch.where(torch.isfinite(log_probs), log_probs, torch.finfo(log_probs.dtype).min)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise GenerationError(f"input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        B, V = scores.shape
        if self.debug_mode:
            scores = torch.ones_like(scores)
        if self.state is None:  # the first call's context is zeros, as in transformers
            self.state = SynthIDTextWatermarkState(B, self.ngram_len, self.context_history_size, self.device)
        else:
            self.state.context = torch.cat((self.state.context, input_ids[:, -1:]), dim=1)[:, 1:]
        state = self.state
        state.num_calls += 1
        if self.skip_first_ngram_calls and state.num_calls < self.ngram_len:
            return scores
        ones = torch.ones(B, device=self.device, dtype=torch.long)
        context_hash = accumulate_hash(ones, state.context)
        candidates = torch.arange(V, device=self.device)
        g_values = self.sample_g_values(
            self._with_keys((context_hash[:, None] + candidates) * _MULTIPLIER + 1)
        )
        updated = self.update_scores(scores, g_values)
        repeated = (state.context_history == context_hash[:, None]).any(dim=1, keepdim=True)
        state.context_history = torch.cat((context_hash[:, None], state.context_history), dim=1)[:, :-1]
        return torch.where(repeated, scores, updated)
