"""Model configs: config.json -> a dataclass with Hugging Face's field names, and back.

One dataclass describes the whole Llama family; each model_type is a subclass that only changes
defaults (transformers' defaults for that model_type) and which layers use a sliding window.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Keys that live outside the dataclass fields but that we read; everything else is kept verbatim.
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
_INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
)


@dataclass
class LlamaConfig:
    """Config of a Llama-architecture decoder; field names and defaults are transformers'."""

    model_type: ClassVar[str] = "llama"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 0
    layer_types: list[str] | None = None
    # Normalised RoPE parameters: {"rope_type": ..., "rope_theta": ..., "factor": ..., ...}.
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    dtype: str | None = None
    # Keys of config.json that autolm does not model, kept so a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict)
    # "v5" writes rope_parameters, "v4" writes rope_theta + rope_scaling (as the file we read did).
    rope_spelling: str = "v5"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            if isinstance(self.hidden_size, int) and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"config.json: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and no head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads if isinstance(self.hidden_size, int) else None
        self.validate()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from a config.json dict; unknown keys go to `extra`, both RoPE spellings accepted."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_parameters", "rope_spelling", "dtype"}
        kwargs = {k: d[k] for k in names if k in d}
        extra = {k: v for k, v in d.items() if k not in names and k not in _ROPE_KEYS and k not in ("dtype", "torch_dtype")}
        extra.pop("model_type", None)
        dtype = d.get("dtype", d.get("torch_dtype"))
        rope, spelling = _read_rope(d, cls, source)
        try:
            return cls(**kwargs, rope_parameters=rope, dtype=dtype, extra=extra, rope_spelling=spelling)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: known fields, RoPE in the spelling it was read in, unknown keys kept."""
        out: dict[str, Any] = dict(self.extra)
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_parameters", "rope_spelling", "dtype"):
                continue
            if f.name == "layer_types" and self.layer_types is None:
                continue  # transformers derives it when absent; a null breaks its mask code for llama
            out[f.name] = getattr(self, f.name)
        if self.dtype is not None:
            out["dtype"] = self.dtype
        rope = dict(self.rope_parameters)
        if self.rope_spelling == "v4":
            out["rope_theta"] = rope.pop("rope_theta")
            out["rope_scaling"] = None if rope.get("rope_type") == "default" and len(rope) == 1 else rope
        else:
            out["rope_parameters"] = rope
        return out

    def save(self, directory: str) -> None:
        """Write config.json atomically."""
        from .saving import atomic_write_text

        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(self.to_dict(), indent=2, sort_keys=True))

    # ---- derived values -----------------------------------------------------------------------

    # Which projections carry a bias, and whether q/k get a per-head RMSNorm: the math that differs by family.
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return False

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    def layer_window(self, i: int) -> int | None:
        """The sliding-window size of layer i, or None for full attention."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
        return None

    def windows(self) -> set[int | None]:
        """The distinct window sizes over the layers (None: full attention)."""
        return {self.layer_window(i) for i in range(self.num_hidden_layers)}

    def validate(self) -> None:
        """Raise ConfigError on wrong types, non-positive sizes or inconsistent head counts."""
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, found {v!r}")
        if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
            raise ConfigError(f"config.json: rms_norm_eps must be a positive number, found {self.rms_norm_eps!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"config.json: hidden_act {self.hidden_act!r} is not supported (expected 'silu')")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"config.json: sliding_window must be a positive integer or null, found {self.sliding_window!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"config.json: layer_types must list {self.num_hidden_layers} entries, found {self.layer_types!r}"
                )
            bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if bad:
                raise ConfigError(f"config.json: unknown layer_types {sorted(bad)}")
        rope_type = self.rope_parameters.get("rope_type")
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"config.json: RoPE type {rope_type!r} is not supported (expected one of {ROPE_TYPES})")
        theta = self.rope_parameters.get("rope_theta")
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"config.json: rope_theta must be a positive number, found {theta!r}")
        needed = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
        for k in needed:
            if not isinstance(self.rope_parameters.get(k), (int, float)):
                raise ConfigError(f"config.json: RoPE type {rope_type!r} needs a numeric {k!r}")


@dataclass
class MistralConfig(LlamaConfig):
    """Mistral: a sliding window (when set) on every layer."""

    model_type: ClassVar[str] = "mistral"
    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096

    def layer_window(self, i: int) -> int | None:
        if self.layer_types is not None:
            return super().layer_window(i)
        return self.sliding_window

    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def o_bias(self) -> bool:
        return False


@dataclass
class Qwen2Config(LlamaConfig):
    """Qwen2: q/k/v biases; a sliding window only when use_sliding_window, on layers >= max_window_layers."""

    model_type: ClassVar[str] = "qwen2"
    vocab_size: int = 151936
    intermediate_size: int = 22016
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def layer_window(self, i: int) -> int | None:
        window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is not None:
            return window if self.layer_types[i] == "sliding_attention" else None
        return window if window is not None and i >= self.max_window_layers else None

    @property
    def qkv_bias(self) -> bool:
        return True

    @property
    def o_bias(self) -> bool:
        return False


@dataclass
class Qwen3Config(Qwen2Config):
    """Qwen3: Qwen2 without q/k/v biases by default, plus RMSNorm on queries and keys per head."""

    model_type: ClassVar[str] = "qwen3"
    head_dim: int | None = 128

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True


def _read_rope(d: dict[str, Any], cls: type, source: str) -> tuple[dict[str, Any], str]:
    """Normalise the two RoPE spellings into one dict; return it and the spelling found."""
    default_theta = 10000.0
    if d.get("rope_parameters") is not None:
        rope = d["rope_parameters"]
        spelling = "v5"
    else:
        rope = d.get("rope_scaling") or {}
        spelling = "v4"
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: RoPE parameters must be an object, found {rope!r}")
    rope = dict(rope)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", d.get("rope_theta", default_theta))
    if rope["rope_type"] in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings",
                        d.get("max_position_embeddings", cls.max_position_embeddings))
    return rope, spelling


def load_config_file(path: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Read a JSON object from a file, raising `error` naming the file on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


class AutoConfig:
    """`AutoConfig.from_pretrained(path_or_repo_id)`: the config class chosen by model_type."""

    @staticmethod
    def from_pretrained(path_or_repo_id: str, **kwargs: Any) -> LlamaConfig:
        from .hub import resolve_model_dir

        directory = resolve_model_dir(path_or_repo_id, **kwargs)
        return config_from_file(os.path.join(directory, "config.json"))

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> LlamaConfig:
        from .registry import config_class

        return config_class(model_type)(**kwargs)


def config_from_file(path: str) -> LlamaConfig:
    """Read config.json and build the config class its model_type names."""
    from .registry import config_class

    d = load_config_file(path)
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: no 'model_type' key (expected e.g. 'llama', 'mistral', 'qwen2')")
    return config_class(model_type, source=path).from_dict(d, source=path)
