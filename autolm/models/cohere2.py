"""Cohere 2 (CohereLabs/c4ai-command-r7b-12-2024, command-a-03-2025): Cohere's parallel block (one LayerNorm,
mean-subtracted, weight only, in fp32, feeding attention and the SwiGLU MLP, both added to the residual), with
local and global layers as `layer_types` says (by default every `sliding_window_pattern`-th layer, 4, global).
Local layers attend within `sliding_window` and rotate interleaved pairs (x0, x1), (x2, x3), ... with RoPE; global
layers attend over everything with no position encoding at all (NoPE). No q/k norms; logits multiplied by
`logit_scale`; the LM head tied to the embeddings by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout
from .base import LLAMA_TP, CausalLM, DecoderModel
from .cohere import CohereLayerNorm
from .image_text import ImageTextConfig

DEFAULT_PATTERN = 4  # transformers' sliding_window_pattern: every 4th layer global


def pattern_types(n: int, every: Any, source: str, key: str = "sliding_window_pattern") -> list[str]:
    """transformers' layer types from a pattern (config.json's `key`): layer i global where (i + 1) % every == 0."""
    if not _is_int(every) or every <= 0:
        raise ConfigError(f"{source}: {key} must be a positive integer, found {every!r}")
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]


@dataclass(repr=False)
class Cohere2Config(PretrainedConfig):
    """transformers' Cohere2Config: its fields and defaults (RoPE base 10000 where config.json names none);
    layer_types derived from config.json's sliding_window_pattern (read, not written back, as transformers)."""

    model_type: ClassVar[str] = "cohere2"
    default_theta: ClassVar[float] = 10000.0
    absent_keys: ClassVar[tuple[str, ...]] = (
        "rms_norm_eps",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("rms_norm_eps",)  # no RMSNorm here

    vocab_size: int = 256000
    hidden_size: int = 8192
    intermediate_size: int = 22528
    logit_scale: float = 0.0625
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    max_position_embeddings: int = 8192
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 5
    eos_token_id: int | list[int] | None = 255001
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    sliding_window: int | None = 4096
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )

    def __post_init__(self) -> None:
        every = self.extra.pop("sliding_window_pattern", DEFAULT_PATTERN)
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:  # else the base validation names the key
            self.layer_types = pattern_types(n, every, self.source)
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def validate(self) -> None:
        super().validate()
        check_cohere_fields(self)

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads: RoPE on the sliding-window layers only (none where no window is set,
        as transformers rotates only where the layer's window is set)."""
        return "default" if self.layer_window(i) is not None else None


def check_cohere_fields(c: Any) -> None:
    """ConfigError for a LayerNorm epsilon out of (0, 1) or a logit scale that is not a number."""
    if not _is_number(c.layer_norm_eps) or not 0 < c.layer_norm_eps < 1:
        raise ConfigError(
            f"{c.source}: layer_norm_eps must be a positive number below 1, found {c.layer_norm_eps!r}"
        )
    if not _is_number(c.logit_scale):
        raise ConfigError(f"{c.source}: logit_scale must be a finite number, found {c.logit_scale!r}")


class Cohere2DecoderLayer(nn.Module):
    """x + attn(ln(x)) + mlp(ln(x)); `make_mlp` and `make_norm` are the mixture-of-experts family's hooks."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            window=config.layer_window(layer_idx),
            rope=config.layer_rope(layer_idx),
            rope_interleaved=True,
        )
        self.mlp = self.make_mlp(config, layer_idx)
        self.input_layernorm = self.make_norm(config)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    @staticmethod
    def make_norm(config: Any) -> nn.Module:
        return CohereLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, ctx) + self.mlp(h)  # parallel residual, summed in transformers' order


class Cohere2Model(DecoderModel):
    def __init__(self, config: Any, layer_cls: type[nn.Module] = Cohere2DecoderLayer):
        super().__init__(config, layer_cls, layer_cls.make_norm(config))


def _refuse(c: Cohere2Config) -> None:
    """What llama.cpp's cohere2 cannot run, refused by name: an untied head (it reads the embeddings as the head)
    and a head_dim other than hidden / heads (it makes q (hidden, hidden))."""
    if not c.tie_word_embeddings:
        raise ConfigError(
            "llama.cpp's 'cohere2' format has no output tensor: a cohere2 model with tie_word_embeddings false "
            "cannot be written"
        )
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        raise ConfigError(
            f"llama.cpp's 'cohere2' format needs head_dim * num_attention_heads == hidden_size, found head_dim "
            f"{c.head_dim} with {c.num_attention_heads} heads and hidden_size {c.hidden_size}"
        )


def llama_cpp_types(n: int, dense_first: bool, every: int = DEFAULT_PATTERN) -> list[str]:
    """llama.cpp's layer types where a file gives no sliding_window_pattern array (set_swa_pattern): local but
    every `every`-th layer, the last of each period (cohere2) or the first (`dense_first`: cohere2moe)."""
    local = [(i % every != 0) if dense_first else (i % every < every - 1) for i in range(n)]
    return ["sliding_attention" if s else "full_attention" for s in local]


def gguf_layer_types(d: dict[str, Any], get, dense_first: bool) -> None:
    """The layer types a file gives: attention.sliding_window_pattern's flags (one per block), its period, or
    llama.cpp's default period of 4."""
    flags, n = get("attention.sliding_window_pattern"), d.get("num_hidden_layers", 0)
    if isinstance(flags, list):
        types = ["sliding_attention" if f else "full_attention" for f in flags]
    else:
        types = llama_cpp_types(n, dense_first, DEFAULT_PATTERN if flags is None else int(flags))
    d["layer_types"] = types[:n]


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's cohere2 reads no pattern the converter writes: every 4th layer global unless the file says."""
    gguf_layer_types(d, get, dense_first=False)


def write_cohere_keys(m: dict[str, Any], c: Any) -> None:
    """What both Cohere 2 converters write alike: the window (even where no layer is local), RoPE scaling type
    "none" (a scaled RoPE then reads back unscaled, and is refused), no RMS epsilon where there is no RMSNorm."""
    if c.sliding_window is not None:
        m["attention.sliding_window"] = c.sliding_window
    if getattr(c, "rms_norm_eps", None) is None or c.model_type == "cohere2":
        m.pop("attention.layer_norm_rms_epsilon", None)
    m.pop("rope.scaling.factor", None)
    m["rope.scaling.type"] = "none"


def _gguf_write_config(m: dict[str, Any], c: Cohere2Config) -> None:
    """What llama.cpp's Cohere2Model converter writes: TextModel's keys (sizes, head counts, the head size as
    key/value length, the RoPE base, the LayerNorm epsilon), logit_scale, the window, the vocabulary size, the
    rotary dimensions (config.json's rotary_pct, 1.0, of the head) and RoPE scaling type "none"; no RMS epsilon.
    A layer pattern other than llama.cpp's default (every 4th layer global) goes in as its flags, which llama.cpp
    reads (the converter writes none)."""
    _refuse(c)
    write_cohere_keys(m, c)
    if c.layer_types != llama_cpp_types(c.num_hidden_layers, dense_first=False):
        m["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in c.layer_types]


class AyaVisionConfig(ImageTextConfig):
    """transformers' AyaVisionConfig (Aya Vision): its language model's, a Command R7B (Cohere 2) unless
    text_config names another family; the head tied by default. The image-text model's head does not scale its
    logits (logit_scale 1 whatever text_config says): autolm gives its logits."""

    model_type: ClassVar[str] = "aya_vision"
    text_class: ClassVar[type] = Cohere2Config
    tie_default: ClassVar[bool | None] = True
    fixed: ClassVar[dict[str, Any]] = {"logit_scale": 1.0}


class Cohere2VisionConfig(AyaVisionConfig):
    """transformers' Cohere2VisionConfig (Command A Vision), read as AyaVisionConfig."""

    model_type: ClassVar[str] = "cohere2_vision"


class Cohere2ForCausalLM(CausalLM):
    """transformers' Cohere2ForCausalLM: logits = lm_head(h) * logit_scale."""

    config_class = Cohere2Config
    # llama.cpp's Cohere2Model converter: tensors renamed one to one by gguf-py's map (no q/k permutation: its
    # cohere2 graph rotates interleaved pairs, as the checkpoint does), no output tensor (tied), zero biases
    # dropped (its graph reads none: attention_bias is refused); RoPE on the local layers only, as here
    gguf = GGUFLayout(
        "cohere2",
        config=(("attention.layer_norm_epsilon", "layer_norm_eps"), ("logit_scale", "logit_scale")),
        fixed=(("attention_bias", False),),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP  # transformers' base_model_tp_plan for Cohere2
    _no_split_modules: ClassVar[list[str]] = ["Cohere2DecoderLayer"]
    layer_cls: ClassVar[type[nn.Module]] = Cohere2DecoderLayer

    def __init__(self, config: Any):
        super().__init__(config, Cohere2Model(config, self.layer_cls))
        self.logit_scale = float(config.logit_scale)  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.logit_scale
