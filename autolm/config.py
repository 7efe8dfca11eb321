"""Model configs: config.json -> a dataclass with Hugging Face's field names, validated, and back.

`PretrainedConfig` holds what decoder configs share (sizes, RoPE in either spelling, special tokens, layer
types) and the machinery: reading with unknown keys kept, validation naming the key, writing back as read.
Each family's config (in its model file) is a subclass with its own fields and transformers' defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._util import atomic_write_text, read_json
from .config_fields import ROPE_KEYS, _is_dtype, _is_int, _is_number, labels, read_rope, validate_rope
from .errors import ConfigError
from .hub import HUB_KWARGS, resolve_model_dir

_NOT_SAVED = ("extra", "rope_parameters", "rope_spelling", "dtype", "name_or_path")
_SWITCHES = ("output_hidden_states", "output_attentions", "return_dict")  # saved only when set
# Upper bounds that no real checkpoint of this family reaches; they stop a hostile config early.
_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 4096,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 28,
}


@dataclass(repr=False)
class PretrainedConfig:
    """What decoder configs share; field names and defaults are transformers' (Llama's where they differ)."""

    model_type: ClassVar[str] = ""
    # transformers' attribute_map: autolm's field name -> the name config.json uses for it (GPT-2's n_embd)
    attribute_map: ClassVar[dict[str, str]] = {}
    # the activations (config `hidden_act`) the family's modules implement
    activations: ClassVar[tuple[str, ...]] = ("silu", "swish")
    bool_fields: ClassVar[tuple[str, ...]] = ("tie_word_embeddings", "use_cache")
    # fields this family's transformers config does not have: config.json gets them only where they say something
    # (differ from their default; head_dim from hidden_size / num_attention_heads)
    absent_keys: ClassVar[tuple[str, ...]] = ()
    # the names layer_types may hold (hybrids add theirs: "linear_attention", "mamba", ...)
    layer_kinds: ClassVar[tuple[str, ...]] = ("full_attention", "sliding_attention")

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
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    use_cache: bool = True
    architectures: list[str] | None = None
    # Normalised RoPE parameters: {"rope_type": ..., "rope_theta": ..., "factor": ..., ...}.
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    dtype: Any = None  # a torch.dtype once read (transformers 5), written back as its name
    # Keys of config.json that autolm does not model, kept so a saved config round-trips.
    extra: dict[str, Any] = field(default_factory=dict)
    # "v5" writes rope_parameters, "v4" writes rope_theta + rope_scaling (as the file we read did).
    rope_spelling: str = "v5"
    name_or_path: str = ""
    source: ClassVar[str] = "config.json"
    # transformers' switches that forward() reads when its arguments leave them unset (config.json may set them)
    output_hidden_states: ClassVar[bool] = False
    output_attentions: ClassVar[bool] = False
    return_dict: ClassVar[bool] = True
    # transformers' default for a decoder-only model (TRL's CPO, ORPO and Online DPO trainers read it)
    is_encoder_decoder: ClassVar[bool] = False
    # the attention implementation asked for at load (from_pretrained's attn_implementation), as transformers
    # keeps it; autolm's attention is the same either way (PyTorch's sdpa and its own kernels)
    _attn_implementation: ClassVar[str] = "sdpa"

    def __post_init__(self) -> None:
        n, types = self.num_hidden_layers, self.layer_types
        if isinstance(types, list) and _is_int(n) and 0 < n < len(types):
            self.layer_types = types[:n]  # fewer layers than listed (num_hidden_layers=1): the first n
        if isinstance(self.dtype, str) and self.dtype != "auto":
            self.dtype = _torch_dtype(self.dtype)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            if _is_int(self.hidden_size) and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"{self.source}: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}) and no head_dim is given"
                )
            self.head_dim = (
                self.hidden_size // self.num_attention_heads if _is_int(self.hidden_size) else None
            )
        self.validate()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> PretrainedConfig:
        """Build from a config.json dict (plus keyword overrides); unknown keys go to `extra`."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        d = labels({**d, **overrides}, source)
        for ours, theirs in cls.attribute_map.items():
            if theirs in d:
                d[ours] = d.pop(theirs)
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d["torch_dtype"]
        names = {f.name for f in dataclasses.fields(cls)} - set(_NOT_SAVED) - {"rope_spelling"}
        kwargs = {k: d[k] for k in names if k in d}
        extra = {
            k: v
            for k, v in d.items()
            if k not in names
            and k not in ROPE_KEYS
            and k not in ("dtype", "torch_dtype", "model_type", "_name_or_path")
        }
        dtype = d.get("dtype")
        if isinstance(dtype, dict) or (
            dtype is not None and not isinstance(dtype, str) and not _is_dtype(dtype)
        ):
            raise ConfigError(f"{source}: dtype must be a string such as 'bfloat16', found {dtype!r}")
        rope, spelling = cls.read_rope(d, source)
        try:
            obj = cls.__new__(cls)
            obj.source = source
            obj.__init__(**kwargs, rope_parameters=rope, dtype=dtype, extra=extra, rope_spelling=spelling)
            for key in _SWITCHES:
                if isinstance(extra.get(key), bool):
                    setattr(obj, key, extra.pop(key))
            return obj
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """config.json's RoPE settings in either spelling -> (rope_parameters, the spelling found)."""
        return read_rope(d, cls, source)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        """This class from a model directory, a repo id or a config.json path, with field overrides."""
        name = os.fspath(path_or_repo_id)
        hub = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        kwargs.pop("trust_remote_code", None)  # accepted: autolm never runs code from a checkpoint
        path = name if os.path.isfile(name) else os.path.join(resolve_model_dir(name, **hub), "config.json")
        config = cls.from_dict(read_json(path), source=path, **kwargs)
        config.name_or_path = name
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict: known fields, RoPE in the spelling it was read in, unknown keys kept."""
        out: dict[str, Any] = dict(self.extra)
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name in _NOT_SAVED or f.name == "rope_spelling":
                continue
            if f.name in ("layer_types", "architectures") and getattr(self, f.name) is None:
                continue  # transformers derives layer_types when absent; a null breaks its mask code for llama
            if f.name in self.absent_keys and getattr(self, f.name) == self._implied(f):
                continue
            out[self.attribute_map.get(f.name, f.name)] = getattr(self, f.name)
        if self.dtype is not None:
            out["dtype"] = str(self.dtype).removeprefix("torch.")
        out.update({k: self.__dict__[k] for k in _SWITCHES if k in self.__dict__})
        rope = dict(self.rope_parameters)
        if self.rope_spelling == "v4":
            out["rope_theta"] = rope.pop("rope_theta")
            out["rope_scaling"] = None if rope.get("rope_type") == "default" and len(rope) == 1 else rope
        else:
            out["rope_parameters"] = rope
        return out

    def _implied(self, f: dataclasses.Field) -> Any:
        """A field's value where config.json does not give it."""
        if f.name == "head_dim" and _is_int(self.num_attention_heads) and self.num_attention_heads > 0:
            return self.hidden_size // self.num_attention_heads
        return f.default

    def to_json_string(self, use_diff: bool = False) -> str:
        return (
            json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"
        )

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = False) -> None:
        atomic_write_text(os.fspath(json_file_path), self.to_json_string(use_diff))

    def to_diff_dict(self) -> dict[str, Any]:
        """The keys whose values differ from this family's defaults (and model_type), as transformers' diff."""
        defaults = type(self)().to_dict()
        out = {k: v for k, v in self.to_dict().items() if k not in defaults or defaults[k] != v}
        return {"model_type": self.model_type, **out}

    def update(self, config_dict: dict[str, Any]) -> None:
        """Set fields (and keys autolm does not model, kept in `extra`) from a dict, as transformers' update."""
        names = {f.name for f in dataclasses.fields(self)} - {"extra"}
        for key, value in config_dict.items():
            if key in names or key in _SWITCHES:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """A decoder-only model's config is its own text config."""
        return self

    def __getattr__(self, name: str) -> Any:
        # config.json keys autolm does not model read as attributes, as on transformers' configs
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra and not name.startswith("__"):
            return extra[name]
        if name == "problem_type":  # transformers' default: the classification loss infers it
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def save_pretrained(self, directory: str | os.PathLike, **_: Any) -> None:
        """Write config.json atomically."""
        atomic_write_text(os.path.join(os.fspath(directory), "config.json"), self.to_json_string())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    @property
    def torch_dtype(self):
        """transformers 4's name for dtype."""
        return self.dtype

    @property
    def _name_or_path(self) -> str:
        return self.name_or_path

    # ---- derived values -----------------------------------------------------------------------

    @property
    def embedding_width(self) -> int:
        """The width of the token embeddings (hidden_size; OPT-350m's narrower word_embed_proj_dim)."""
        return self.hidden_size

    @property
    def embedding_rows(self) -> int:
        """The token embeddings' rows (vocab_size; Mllama's vocab_size + 8, its head vocab_size)."""
        return self.vocab_size

    @property
    def num_labels(self) -> int:
        """transformers' number of classification labels (a sequence classifier's outputs): len(id2label), 2
        where config.json names none."""
        return len(self.extra.get("id2label") or (0, 1))

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        self.extra.update(labels({"num_labels": n}, self.source))

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

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """The RoPE tables the layers read, by name: one ("default") here; Gemma 3 has one per layer type."""
        return {"default": self.rope_parameters}

    def validate(self) -> None:
        """Raise ConfigError naming the key and the file on a wrong type, a value out of range or an
        inconsistency: a bool is not a number or a string, numbers are finite."""
        src = self.source
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= limit:
                raise ConfigError(f"{src}: {name} must be a positive integer (at most {limit}), found {v!r}")
        for name in self.bool_fields:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{src}: {name} must be true or false, found {getattr(self, name)!r}")
        if not _is_number(self.rms_norm_eps) or not 0 < self.rms_norm_eps < 1:
            raise ConfigError(
                f"{src}: rms_norm_eps must be a positive number below 1, found {self.rms_norm_eps!r}"
            )
        if not _is_number(self.attention_dropout) or not 0 <= self.attention_dropout <= 1:
            raise ConfigError(
                f"{src}: attention_dropout must be a number in [0, 1], found {self.attention_dropout!r}"
            )
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                raise ConfigError(f"{src}: {name} must be a non-negative integer or null, found {v!r}")
        eos = self.eos_token_id
        if eos is not None and not (
            (_is_int(eos) and eos >= 0) or (isinstance(eos, list) and all(_is_int(e) and e >= 0 for e in eos))
        ):
            raise ConfigError(
                f"{src}: eos_token_id must be a non-negative integer, a list of them, or null, found {eos!r}"
            )
        if self.architectures is not None and not (
            isinstance(self.architectures, list) and all(isinstance(a, str) for a in self.architectures)
        ):
            raise ConfigError(f"{src}: architectures must be a list of strings, found {self.architectures!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{src}: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.hidden_act not in self.activations:
            raise ConfigError(
                f"{src}: hidden_act {self.hidden_act!r} is not supported (expected one of {self.activations})"
            )
        if self.sliding_window is not None and not (_is_int(self.sliding_window) and self.sliding_window > 0):
            raise ConfigError(
                f"{src}: sliding_window must be a positive integer or null, found {self.sliding_window!r}"
            )
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"{src}: layer_types must list {self.num_hidden_layers} entries, found "
                    f"{str(self.layer_types)[:200]}"
                )
            bad = {t for t in self.layer_types if not isinstance(t, str)} or (
                set(self.layer_types) - set(self.layer_kinds)
            )
            if bad:
                raise ConfigError(
                    f"{src}: unknown layer_types {sorted(map(str, bad))} (expected one of {list(self.layer_kinds)})"
                )
        for rope in self.rope_kinds().values():
            validate_rope(rope, src)


@dataclass(repr=False)
class PartialRotaryConfig(PretrainedConfig):
    """A family whose RoPE turns the first `partial_rotary_factor` of each head: `rotary_factor` where config.json
    gives none, read from the top level (transformers 4's spelling, written back there) or from rope_parameters (5's),
    and checked to leave an even number of rotary dimensions."""

    partial_rotary_default: ClassVar[bool] = True  # the default RoPE rotates only the partial dimensions
    rotary_factor: ClassVar[float] = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.rope_parameters, dict):  # built in Python: transformers' default factor
            self.rope_parameters = {"partial_rotary_factor": self.rotary_factor, **self.rope_parameters}
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = super().read_rope(d, source)
        rope.setdefault("partial_rotary_factor", d.get("partial_rotary_factor", cls.rotary_factor))
        return rope, spelling

    def validate(self) -> None:
        super().validate()
        factor = self.rope_parameters.get("partial_rotary_factor")
        if not _is_number(factor) or not 0 < factor <= 1 or int(self.head_dim * factor) % 2:
            raise ConfigError(
                f"{self.source}: partial_rotary_factor must be a number in (0, 1] that leaves an even number of "
                f"rotary dimensions of the {self.head_dim} in a head, found {factor!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.rope_spelling == "v4":
            scaling = dict(out.get("rope_scaling") or {})
            out["partial_rotary_factor"] = scaling.pop("partial_rotary_factor", None)
            plain = scaling.get("rope_type", "default") == "default" and set(scaling) <= {"rope_type"}
            out["rope_scaling"] = None if plain else scaling
        return out


def _torch_dtype(name: str) -> Any:
    """'bfloat16' -> torch.bfloat16; a name torch does not know stays a string (loading then ignores it)."""
    import torch

    value = getattr(torch, name, None)
    return value if isinstance(value, torch.dtype) else name
