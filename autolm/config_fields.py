"""How config.json's compound fields are read and checked: RoPE in either spelling, the classification label
maps, the value checks every family's config shares, and transformers' attribute_map on a config class."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def labels(d: dict[str, Any], source: str) -> dict[str, Any]:
    """transformers' label maps: num_labels=n (an argument, never saved) becomes id2label / label2id with names
    LABEL_i unless id2label already has n entries; id2label's keys are ints in memory, strings in the file."""
    n = d.pop("num_labels", None)
    if n is not None:
        if not _is_int(n) or n < 1:
            raise ConfigError(f"{source}: num_labels must be a positive integer, found {n!r}")
        if len(d.get("id2label") or ()) != n:
            d["id2label"], d["label2id"] = (
                {i: f"LABEL_{i}" for i in range(n)},
                {f"LABEL_{i}": i for i in range(n)},
            )
    if isinstance(d.get("id2label"), dict):
        try:
            d["id2label"] = {int(k): v for k, v in d["id2label"].items()}
        except ValueError:
            raise ConfigError(
                f"{source}: id2label's keys must be label indices, found {list(d['id2label'])}"
            ) from None
    return d


def _is_dtype(v: Any) -> bool:
    return type(v).__name__ == "dtype" and type(v).__module__ == "torch"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_ints(config: Any, names: tuple[str, ...], limit: int | None = None) -> None:
    """ConfigError naming the first of the config's fields `names` that is not a positive integer (at most
    `limit`)."""
    for name in names:
        v = getattr(config, name)
        if not _is_int(v) or v < 1 or (limit is not None and v > limit):
            raise ConfigError(f"{config.source}: {name} must be a positive integer, found {v!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_rope(rope: dict[str, Any], src: str) -> None:
    rope_type = rope.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{src}: RoPE type {rope_type!r} is not supported (expected one of {ROPE_TYPES})")
    theta = rope.get("rope_theta")
    if not _is_number(theta) or theta <= 0:
        raise ConfigError(f"{src}: rope_theta must be a positive number, found {theta!r}")
    needed = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "yarn": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }
    for k in needed.get(rope_type, ()):
        if not _is_number(rope.get(k)) or rope[k] <= 0:
            raise ConfigError(
                f"{src}: RoPE type {rope_type!r} needs a numeric {k!r} above 0, found {rope.get(k)!r}"
            )
    if rope_type == "llama3" and rope["high_freq_factor"] <= rope["low_freq_factor"]:
        raise ConfigError(
            f"{src}: llama3 RoPE needs high_freq_factor > low_freq_factor, found "
            f"{rope['high_freq_factor']} and {rope['low_freq_factor']}"
        )
    for k in (
        "partial_rotary_factor",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "original_max_position_embeddings",
    ):
        if rope.get(k) is not None and (not _is_number(rope[k]) or rope[k] < 0):
            raise ConfigError(f"{src}: RoPE {k!r} must be a non-negative number, found {rope[k]!r}")


def read_rope(d: dict[str, Any], cls: type, source: str) -> tuple[dict[str, Any], str]:
    """Normalise the two RoPE spellings into one dict; return it and the spelling found."""
    if d.get("rope_parameters") is not None:
        rope, spelling = d["rope_parameters"], "v5"
    else:
        rope, spelling = d.get("rope_scaling") or {}, "v4"
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: RoPE parameters must be an object, found {str(rope)[:100]}")
    rope = dict(rope)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault(
            "original_max_position_embeddings", d.get("max_position_embeddings", cls.max_position_embeddings)
        )
    return rope, spelling


def config_json_names(cls: type, aliases: dict[str, str] | None = None, keep_unknown: bool = False) -> None:
    """transformers' attribute_map on a config class (GPT-2's n_embd for hidden_size): each config.json name a
    property of autolm's field, and a keyword of cls(...) as in transformers. `aliases`: older names read as a field
    (Falcon's and BLOOM's n_embed); `keep_unknown`: keywords that are no field kept as config.json's unknown keys
    are (in `extra`), where transformers' class takes any."""
    for ours, theirs in cls.attribute_map.items():
        setattr(cls, theirs, property(lambda self, k=ours: getattr(self, k),
                                      lambda self, v, k=ours: setattr(self, k, v)))  # fmt: skip
    dataclass_init = cls.__init__
    names = {**{theirs: ours for ours, theirs in cls.attribute_map.items()}, **(aliases or {})}

    def __init__(self, **kwargs: Any) -> None:
        kwargs = {names.get(k, k): v for k, v in kwargs.items()}
        if keep_unknown:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = {k: kwargs.pop(k) for k in list(kwargs) if k not in fields}
            kwargs["extra"] = {**kwargs.get("extra", {}), **unknown}
        dataclass_init(self, **kwargs)

    cls.__init__ = __init__
