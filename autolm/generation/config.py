"""GenerationConfig: decoding settings with transformers' names. As in transformers 5, an unset field reads
None; generate() fills what is still None from the model's generation config and then from DEFAULTS."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .._util import atomic_write_text, read_json
from ..errors import ConfigError, GenerationError
from .watermark import as_watermarking_config

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' global defaults (GenerationConfig._get_default_generation_params), for what generate() leaves
# unset. max_length is not here: unset, it means 20 new tokens (see decode.new_token_budget).
DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "do_sample": False,
    "use_cache": True,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


@dataclass
class GenerationConfig:
    """Decoding settings with transformers' names; None means unset. logit_bias, presence_penalty and
    frequency_penalty are autolm extensions with OpenAI/vLLM semantics."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    early_stopping: bool | str | None = None
    max_time: float | None = None
    stop_strings: str | list[str] | None = None
    do_sample: bool | None = None
    num_beams: int | None = None
    use_cache: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    top_h: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    repetition_penalty: float | None = None
    guidance_scale: float | None = None  # classifier-free guidance (guidance.py); 1 or None: off
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    bad_words_ids: list[list[int]] | None = None
    renormalize_logits: bool | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list[int] | None = None
    remove_invalid_values: bool | None = None
    exponential_decay_length_penalty: tuple[int, float] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    sequence_bias: Any = None
    num_return_sequences: int | None = None
    output_scores: bool | None = None
    output_logits: bool | None = None
    output_attentions: bool | None = None
    output_hidden_states: bool | None = None
    # transformers' cache kinds whose results equal its dynamic cache's; autolm's cache is one static kind that
    # grows where needed, so each changes nothing here; "quantized" (nn/quantized_cache.py, set by cache_config)
    # quantizes keys and values as transformers does (offloaded caches are refused)
    cache_implementation: str | None = None
    return_dict_in_generate: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # speculative decoding (speculative.py): a draft model's settings, or prompt lookup's
    num_assistant_tokens: int | None = None
    num_assistant_tokens_schedule: str | None = None
    assistant_confidence_threshold: float | None = None
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    # a WatermarkingConfig or SynthIDTextWatermarkingConfig (watermark.py); a dict is made one, as transformers
    watermarking_config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.watermarking_config = as_watermarking_config(self.watermarking_config)

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def names(cls) -> set[str]:
        """The settings' names (everything but `extra`)."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], source: str = "generation config", **kwargs: Any):
        """A config from a dict (unknown keys kept in `extra`), then `kwargs` on top; ConfigError naming
        `source` when a value is bad."""
        d = {**config_dict, **kwargs}
        names = cls.names()
        known = {k: v for k, v in d.items() if k in names and v is not None}
        cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        try:
            cfg.validate()
        except GenerationError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None, **kwargs: Any
    ):
        """Read generation_config.json (or `config_file_name`) from a directory or a cached repo id;
        other keyword arguments set fields (with return_unused_kwargs=True, those left over come back too)."""
        from ..hub import HUB_KWARGS, resolve_model_dir

        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        return_unused = kwargs.pop("return_unused_kwargs", False)
        directory = resolve_model_dir(pretrained_model_name, **hub)
        path = os.path.join(directory, config_file_name or GENERATION_CONFIG_NAME)
        cfg = cls.from_dict(read_json(path), source=path)
        unused = cfg.update(**kwargs)
        return (cfg, unused) if return_unused else cfg

    @classmethod
    def from_model_dir(cls, directory: str, config=None) -> GenerationConfig:
        """generation_config.json when present, else the model config's special tokens."""
        path = os.path.join(directory, GENERATION_CONFIG_NAME)
        if os.path.isfile(path):
            return cls.from_dict(read_json(path), source=path)
        return cls.from_model_config(config)

    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """The special tokens of a model config."""
        if config is None:
            return cls()
        return cls(
            eos_token_id=config.eos_token_id,
            bos_token_id=config.bos_token_id,
            pad_token_id=config.pad_token_id,
        )

    @classmethod
    def coerce(cls, value: Any) -> GenerationConfig | None:
        """autolm's GenerationConfig, or any object with to_dict() (transformers' GenerationConfig)."""
        if value is None or isinstance(value, cls):
            return value
        if hasattr(value, "to_dict"):
            d = {
                k: v
                for k, v in value.to_dict().items()
                if not k.startswith("_") and k != "transformers_version"
            }
            return cls.from_dict(d)
        raise GenerationError(f"generation_config must be a GenerationConfig, got {type(value).__name__}")

    # ---- changing --------------------------------------------------------------------------------------

    def returned_layers(self) -> dict[str, bool]:
        """The forwards' output_hidden_states / output_attentions where generate() returns them (beam search's and
        speculation's forwards ask only then), else none."""
        asked = {"output_hidden_states": bool(self.output_hidden_states),
                 "output_attentions": bool(self.output_attentions)}  # fmt: skip
        return asked if self.return_dict_in_generate and any(asked.values()) else {}

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs: Any) -> dict:
        """Set the fields named in kwargs (only unset ones with defaults_only; unknown names go to `extra`
        with allow_custom_entries), validate, and return the kwargs that were not used (as transformers)."""
        names, used = self.names(), []
        for key, value in kwargs.items():
            if key in names:
                if not defaults_only or getattr(self, key) is None:
                    setattr(self, key, value)
                    used.append(key)
            elif allow_custom_entries and key not in self.extra:
                self.extra[key] = value
                used.append(key)
        self.validate()
        return {k: v for k, v in kwargs.items() if k not in used}

    def updated(self, **kwargs: Any) -> GenerationConfig:
        """A validated copy with kwargs set; GenerationError on an unknown name."""
        unknown = sorted(k for k in kwargs if k not in self.names())
        if unknown:
            raise GenerationError(f"generate() got unknown arguments: {', '.join(unknown)}")
        new = copy.deepcopy(self)
        new.update(**kwargs)
        return new

    def with_defaults(self) -> GenerationConfig:
        """A copy with every unset field that has a transformers default set to it."""
        new = copy.deepcopy(self)
        for key, value in DEFAULTS.items():
            if getattr(new, key) is None:
                setattr(new, key, value)
        return new

    # ---- saving ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field (None where unset) and the unknown keys kept from the file."""
        d = {name: copy.deepcopy(getattr(self, name)) for name in sorted(self.names())}
        d.update(copy.deepcopy(self.extra))
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        """Only what differs from GenerationConfig(): the set fields and the unknown keys."""
        return {k: v for k, v in self.to_dict().items() if k not in self.names() or v is not None}

    def to_json_string(self, use_diff: bool = True, ignore_metadata: bool = False, keys_to_pop=None) -> str:
        """JSON with sorted keys, as transformers writes generation_config.json."""
        d = self.to_diff_dict() if use_diff else self.to_dict()
        for key in list(keys_to_pop or ()) + (["transformers_version"] if ignore_metadata else []):
            d.pop(key, None)
        if isinstance(d.get("sequence_bias"), dict):  # tuple keys have no JSON form: transformers' list form
            d["sequence_bias"] = [[list(ids), bias] for ids, bias in d["sequence_bias"].items()]
        if isinstance(d.get("logit_bias"), dict):
            d["logit_bias"] = {str(k): v for k, v in d["logit_bias"].items()}
        if d.get("watermarking_config") is not None:
            d["watermarking_config"] = d["watermarking_config"].to_dict()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write to_json_string() to a file, atomically."""
        atomic_write_text(json_file_path, self.to_json_string(use_diff=use_diff))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        config_file_name: str | None = None,
        push_to_hub: bool = False,
        **_,
    ) -> None:
        """Write generation_config.json (only the set fields) into save_directory, creating it."""
        if push_to_hub:
            raise GenerationError("GenerationConfig.save_pretrained: push_to_hub is not supported by autolm")
        self.validate()
        if os.path.isfile(save_directory):
            raise ConfigError(
                f"{save_directory}: expected a directory to save the generation config in, found a file"
            )
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, config_file_name or GENERATION_CONFIG_NAME))

    # ---- checking --------------------------------------------------------------------------------------

    def validate(self) -> None:
        """GenerationError naming the setting when a value has the wrong type or is out of range."""
        for name, (ok, expected) in _CHECKS.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise GenerationError(f"{name} must be {expected}, got {value!r}")
        n, beams = self.num_return_sequences or 1, self.num_beams or 1
        if beams == 1 and n > 1 and not self.do_sample:
            raise GenerationError(
                f"num_return_sequences={n} needs sampling (do_sample=True) or beam search (num_beams >= {n}): "
                "greedy decoding returns one sequence per prompt"
            )
        if beams > 1 and n > beams:
            raise GenerationError(f"num_return_sequences ({n}) must be <= num_beams ({beams})")
        self.watermarking_config = as_watermarking_config(self.watermarking_config)
        if self.watermarking_config is not None:
            self.watermarking_config.validate()

    @property
    def eos_ids(self) -> list[int]:
        """eos_token_id as a list (empty when unset)."""
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)


def _int(lo: int = 0):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(lo: float = -float("inf"), hi: float = float("inf"), lo_open=False, hi_open=False):
    def ok(v) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            return False
        return (
            (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi) and abs(v) != float("inf")
        )

    return ok


def _ids(v) -> bool:
    return isinstance(v, (list, tuple)) and all(_int()(x) for x in v)


def _bool(v) -> bool:
    return isinstance(v, bool)


_CHECKS: dict[str, tuple[Any, str]] = {
    "max_new_tokens": (_int(), "an integer >= 0"),
    "max_length": (_int(1), "a positive integer"),
    "min_length": (_int(), "an integer >= 0"),
    "min_new_tokens": (_int(), "an integer >= 0"),
    "early_stopping": (lambda v: v in (True, False, "never"), "a bool or 'never'"),
    "max_time": (_num(0, lo_open=True), "a number of seconds > 0"),
    "stop_strings": (lambda v: isinstance(v, str) or (_ids_of(v, str)), "a string or a list of strings"),
    "do_sample": (_bool, "true or false"),
    "num_beams": (_int(1), ">= 1"),
    "use_cache": (_bool, "true or false"),
    "cache_implementation": (
        lambda v: v in ("static", "dynamic", "sliding_window", "hybrid", "hybrid_chunked", "quantized"),
        "'static', 'dynamic', 'sliding_window', 'hybrid', 'hybrid_chunked' or 'quantized' (autolm keeps no "
        "offloaded cache)",
    ),
    "temperature": (_num(0, lo_open=True), "> 0 (use do_sample=False for greedy)"),
    "top_k": (_int(), "an integer >= 0"),
    "top_p": (_num(0, 1, lo_open=True), "in (0, 1]"),
    "min_p": (_num(0, 1), "in [0, 1]"),
    "top_h": (_num(0, 1, lo_open=True), "in (0, 1]"),
    "typical_p": (_num(0, 1, lo_open=True), "in (0, 1]"),
    "epsilon_cutoff": (_num(0, 1, hi_open=True), "in [0, 1)"),
    "eta_cutoff": (_num(0, 1, hi_open=True), "in [0, 1)"),
    "repetition_penalty": (_num(0, lo_open=True), "> 0"),
    "guidance_scale": (_num(), "a number"),
    "length_penalty": (_num(), "a number"),
    "no_repeat_ngram_size": (_int(), "an integer >= 0"),
    "bad_words_ids": (
        lambda v: isinstance(v, list) and all(_ids(w) for w in v),
        "a list of lists of token ids",
    ),
    "renormalize_logits": (_bool, "true or false"),
    "forced_bos_token_id": (_int(), "a token id"),
    "forced_eos_token_id": (lambda v: _int()(v) or _ids(v), "a token id or a list of them"),
    "remove_invalid_values": (_bool, "true or false"),
    "exponential_decay_length_penalty": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _int()(v[0]) and _num()(v[1]),
        "a pair (start index, decay factor)",
    ),
    "suppress_tokens": (_ids, "a list of token ids"),
    "begin_suppress_tokens": (_ids, "a list of token ids"),
    "sequence_bias": (lambda v: isinstance(v, (dict, list)) and len(v) > 0, "a non-empty dict or list"),
    "num_return_sequences": (_int(1), ">= 1"),
    "output_scores": (_bool, "true or false"),
    "output_logits": (_bool, "true or false"),
    "output_attentions": (_bool, "true or false"),
    "output_hidden_states": (_bool, "true or false"),
    "return_dict_in_generate": (_bool, "true or false"),
    "pad_token_id": (_int(), "a non-negative integer or None"),
    "bos_token_id": (_int(), "a non-negative integer or None"),
    "eos_token_id": (lambda v: _int()(v) or _ids(v), "a non-negative integer or a list of them"),
    "logit_bias": (lambda v: isinstance(v, dict), "a dict {token id: bias}"),
    "presence_penalty": (_num(), "a number"),
    "frequency_penalty": (_num(), "a number"),
    "num_assistant_tokens": (_int(1), "an integer >= 1"),
    "num_assistant_tokens_schedule": (
        lambda v: v in ("constant", "heuristic", "heuristic_transient"),
        "'constant', 'heuristic' or 'heuristic_transient'",
    ),
    "assistant_confidence_threshold": (_num(0, 1), "in [0, 1] (0: off)"),
    "prompt_lookup_num_tokens": (_int(1), "an integer >= 1"),
    "max_matching_ngram_size": (_int(1), "an integer >= 1"),
}


def _ids_of(v, kind) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, kind) for x in v)
