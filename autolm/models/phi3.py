"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): Llama's layer with q/k/v packed into one `qkv_proj` and gate/up into one
`gate_up_proj` (in the checkpoint and the model alike), partial rotary embeddings (`partial_rotary_factor`,
applied by Phi's default RoPE too), LongRoPE scaling (short factors up to `original_max_position_embeddings`,
long factors beyond) and a sliding window on every layer where one is set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GGUFLayout, Linear, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig


@dataclass(repr=False)
class Phi3Config(PretrainedConfig):
    """transformers' Phi3Config. RoPE: the old "su" / "yarn" names mean LongRoPE, a top-level
    partial_rotary_factor moves into the RoPE parameters, and original_max_position_embeddings is the field's
    value whatever the RoPE parameters say (transformers gives the field priority)."""

    model_type: ClassVar[str] = "phi3"
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim",)  # not in transformers' config: written when set
    partial_rotary_default: ClassVar[bool] = True  # Phi's default RoPE rotates only the partial dimensions

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000

    def __post_init__(self) -> None:
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            self.rope_parameters = {
                **rope,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        rope, spelling = super().read_rope(d, source)
        if rope["rope_type"] in ("su", "yarn"):
            rope["rope_type"] = "longrope"
        if d.get("partial_rotary_factor") is not None:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        return rope, spelling

    def validate(self) -> None:
        src, rope = self.source, self.rope_parameters
        if not _is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings <= 0:
            raise ConfigError(f"{src}: original_max_position_embeddings must be a positive integer, "
                              f"found {self.original_max_position_embeddings!r}")  # fmt: skip
        super().validate()
        if rope.get("rope_type") not in ("default", "longrope"):
            raise ConfigError(
                f"{src}: Phi-3's RoPE type must be 'default' or 'longrope', found {rope.get('rope_type')!r}"
            )
        rotary = int(self.head_dim * rope.get("partial_rotary_factor", 1.0))
        for name in ("short_factor", "long_factor"):
            f = rope.get(name)
            if (f is not None or rope["rope_type"] == "longrope") and not (
                isinstance(f, list) and len(f) == rotary // 2 and all(_is_number(x) and x > 0 for x in f)
            ):
                raise ConfigError(
                    f"{src}: RoPE {name} must be a list of {rotary // 2} positive numbers (one per pair of the "
                    f"{rotary} rotary dimensions), found {str(f)[:200]}"
                )

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window  # every layer, when set


class Phi3Attention(Attention):
    """Attention whose q/k/v projections are one Linear, `qkv_proj`: rows [q | k | v]."""

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.qkv_proj = Linear(hidden, (nh + 2 * nkv) * hd, bias=bias)
        self.o_proj = Linear(nh * hd, hidden, bias=o_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return q, k, v


class Phi3MLP(nn.Module):
    """down(up * act(gate)) with gate and up as one Linear, `gate_up_proj`: rows [gate | up]."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.act_fn = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act_fn(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Phi3Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                       layer_idx, window=config.layer_window(layer_idx))  # fmt: skip
        self.mlp = Phi3MLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, Phi3DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def gguf_config(d: dict[str, Any], get) -> None:
    """What llama.cpp's converter writes differently: rope.dimension_count is the rotary dimensions (the head
    size is hidden / heads), a sliding window of 0 means none, and factors in the file mean LongRoPE."""
    rope = d["rope_parameters"]
    heads, rotary = d.get("num_attention_heads"), d.pop("head_dim", None)
    if _is_int(heads) and heads > 0 and _is_int(d.get("hidden_size")) and rotary is not None:
        head_dim = d["hidden_size"] // heads
        if rotary != head_dim:
            rope["partial_rotary_factor"] = rotary / head_dim
    if not d.get("sliding_window"):
        d["sliding_window"] = None
    if "long_factor" in rope or "short_factor" in rope:
        rope["rope_type"] = "longrope"


def gguf_write_config(m: dict[str, Any], c: Phi3Config) -> None:
    """The inverse of gguf_config, as llama.cpp's Phi3MiniModel writes it: the rotary dimensions, a window of 0
    for none, LongRoPE's attention factor (its factors go out as tensors); no vocabulary size or head size."""
    rope = c.rope_parameters
    for key in ("vocab_size", "attention.key_length", "attention.value_length"):
        m.pop(key, None)
    m["rope.dimension_count"] = (
        int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
    )
    m["attention.sliding_window"] = c.sliding_window or 0
    if rope.get("long_factor"):
        original = c.original_max_position_embeddings
        scale = c.max_position_embeddings / original
        m["rope.scaling.attn_factor"] = (
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        )


class Phi4MultimodalConfig(ImageTextConfig):
    """transformers' Phi4MultimodalConfig (Phi-4-multimodal): the language model's settings at the top level beside
    vision_config and audio_config, read as Phi-3's (transformers' text path is Phi-3's layer; its image and audio
    embeddings, `model.embed_tokens_extend`, are skipped), with Phi-4-multimodal's text defaults."""

    model_type: ClassVar[str] = "phi4_multimodal"
    text_class: ClassVar[type] = Phi3Config
    flat: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = dict(
        vocab_size=200064, num_key_value_heads=8, max_position_embeddings=131072, bos_token_id=199999,
        pad_token_id=199999, eos_token_id=[199999, 200020], tie_word_embeddings=False,
    )  # fmt: skip


class Phi3ForCausalLM(CausalLM):
    config_class = Phi3Config
    # llama.cpp keeps qkv and gate_up fused (attn_qkv, ffn_up), writes the rotary dimensions as
    # rope.dimension_count and LongRoPE's factors as two tensors (see gguf_config)
    gguf = GGUFLayout(
        "phi3",
        config=(("rope.scaling.original_context_length", "original_max_position_embeddings"),),
        layer=(("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")),
        rope_tensors=(
            ("rope_factors_long.weight", "long_factor"),
            ("rope_factors_short.weight", "short_factor"),
        ),
        derive=gguf_config,
        write_config=gguf_write_config,
    )
    # As transformers: the packed outputs are gathered whole on every rank before they are split into q/k/v
    # (gate/up), and o_proj (down_proj) splits its input again; every rank runs every head.
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.qkv_proj": "colwise_gather",
        "layers.*.self_attn.o_proj": "rowwise_split",
        "layers.*.mlp.gate_up_proj": "colwise_gather",
        "layers.*.mlp.down_proj": "rowwise_split",
    }
    _no_split_modules: ClassVar[list[str]] = ["Phi3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Phi3Model(config))

    def shard_heads(self, world: int) -> None:
        """Every rank runs all heads (the packed outputs are gathered): nothing to shard."""
