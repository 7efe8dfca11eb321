"""GenerationConfig: decoding settings with transformers' names and defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .._util import read_json
from ..errors import ConfigError, GenerationError


@dataclass
class GenerationConfig:
    """Decoding settings with transformers' names; unset values take transformers' defaults."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    use_cache: bool = True
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "generation config") -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        try:
            cfg.validate()
        except GenerationError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_model_dir(cls, directory: str, config=None) -> GenerationConfig:
        """generation_config.json when present, else the model config's special tokens."""
        path = os.path.join(directory, "generation_config.json")
        if os.path.isfile(path):
            return cls.from_dict(read_json(path), source=path)
        return cls.from_model_config(config)

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        if config is None:
            return cls()
        return cls(
            eos_token_id=config.eos_token_id,
            bos_token_id=config.bos_token_id,
            pad_token_id=config.pad_token_id,
        )

    @classmethod
    def coerce(cls, value: Any) -> GenerationConfig:
        """autolm's GenerationConfig, or any object with to_dict() (transformers' GenerationConfig)."""
        if value is None or isinstance(value, cls):
            return value
        if hasattr(value, "to_dict"):
            d = {
                k: v
                for k, v in value.to_dict().items()
                if not k.startswith("_") and k != "transformers_version"
            }
            names = {f.name for f in dataclasses.fields(cls)}
            return cls.from_dict({k: v for k, v in d.items() if k in names})
        raise GenerationError(f"generation_config must be a GenerationConfig, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra" and getattr(self, f.name) != f.default:
                d[f.name] = getattr(self, f.name)
        return d

    def updated(self, **kwargs: Any) -> GenerationConfig:
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise GenerationError(f"generate() got unknown arguments: {', '.join(unknown)}")
        new = dataclasses.replace(self, **dict(kwargs.items()))
        new.validate()
        return new

    def validate(self) -> None:
        """GenerationError naming the setting when a value has the wrong type or is out of range."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise GenerationError(msg)

        def is_int(v, lo=0):
            return isinstance(v, int) and not isinstance(v, bool) and v >= lo

        def is_num(v):
            return (
                isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
            )

        check(
            self.max_new_tokens is None or is_int(self.max_new_tokens, 0),
            f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}",
        )
        check(
            self.max_length is None or is_int(self.max_length, 1),
            f"max_length must be a positive integer, got {self.max_length!r}",
        )
        check(
            self.min_new_tokens is None or is_int(self.min_new_tokens),
            f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}",
        )
        check(isinstance(self.do_sample, bool), f"do_sample must be true or false, got {self.do_sample!r}")
        check(
            is_num(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature!r} (use do_sample=False for greedy)",
        )
        check(self.top_k is None or is_int(self.top_k), f"top_k must be an integer >= 0, got {self.top_k!r}")
        check(is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        check(
            self.min_p is None or (is_num(self.min_p) and 0 <= self.min_p <= 1),
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        check(
            is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
        )
        check(
            is_int(self.no_repeat_ngram_size),
            f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}",
        )
        check(is_int(self.num_beams, 1), f"num_beams must be >= 1, got {self.num_beams!r}")
        check(is_num(self.length_penalty), f"length_penalty must be a number, got {self.length_penalty!r}")
        check(
            is_int(self.num_return_sequences, 1),
            f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}",
        )
        check(
            self.num_beams == 1 or self.num_return_sequences <= self.num_beams,
            f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})",
        )
        check(
            self.early_stopping in (True, False, "never"),
            f"early_stopping must be a bool or 'never', got {self.early_stopping!r}",
        )
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            check(v is None or is_int(v), f"{name} must be a non-negative integer or None, got {v!r}")
        e = self.eos_token_id
        check(
            e is None or is_int(e) or (isinstance(e, (list, tuple)) and all(is_int(x) for x in e)),
            f"eos_token_id must be a non-negative integer or a list of them, got {e!r}",
        )
        s = self.stop_strings
        check(
            s is None
            or isinstance(s, str)
            or (isinstance(s, (list, tuple)) and all(isinstance(x, str) for x in s)),
            f"stop_strings must be a string or a list of strings, got {s!r}",
        )

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)
