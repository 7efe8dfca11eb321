"""LFM3 (Liquid AI's LFM3-1.7B): LFM2's hybrid of gated short-convolution and attention layers (see models/lfm2.py)
with three layer kinds (`layer_types`: "conv", "sliding_attention", "full_attention"; by default layer i is full
when i % 4 == 2, sliding when i % 4 == 0 and i > 0, else a convolution), as transformers builds it from LFM2,
LFM2-MoE, Qwen 3 and OLMo 3 pieces:

- Attention is Qwen 3's (q_proj / k_proj / v_proj / o_proj, biases with `attention_bias`, per-head RMSNorms
  `q_norm` / `k_norm` before RoPE); sliding layers see the last `sliding_window` keys. With `use_attention_gate`
  each head's output is scaled by sigmoid(g_proj(x)) (g_proj: h -> one gate per head) before o_proj (saved as `self_attn.gate_proj`, transformers' file name for it).
- RoPE per layer type: the sliding layers plain RoPE (base 1e4), the full layers Gemma 4's "proportional" RoPE
  (base 1e6, only the first partial_rotary_factor (0.5) of the frequencies turning).
- With `use_sandwich_norm` the mixer's and the feed-forward block's outputs are RMS-normed (`post_operator_norm`,
  `post_ffn_norm`) before they join the residual stream.
- The feed-forward block is LFM2's SiLU-gated MLP (w1, w3, w2) of intermediate_size, no width adjustment; the
  short convolution is LFM2's (7 taps by default).

llama.cpp has no LFM3 architecture: no GGUF in or out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..config_fields import validate_rope
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Linear, Rename, RMSNorm
from .base import CausalLM
from .gemma4 import Gemma4Rotary, _validate_proportional
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .lfm2 import LFM2_TP, Lfm2Config, Lfm2DecoderLayer, Lfm2Model

_KINDS = ("full_attention", "sliding_attention")  # the attention layer types, each with its RoPE table
LAYER_KINDS = ("conv", *_KINDS)


def _default_rope() -> dict[str, Any]:
    return {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "rope_theta": 1000000.0,
            "partial_rotary_factor": 0.5,
        },
    }


@dataclass(repr=False)
class Lfm3Config(Lfm2Config):
    """transformers' Lfm3Config: LFM2's fields less the block_* ones and full_attn_idxs (written only where set),
    plus head_dim, sliding_window, the attention's bias and gate and the sandwich norms; rope_parameters holds
    one dict per attention layer type."""

    model_type: ClassVar[str] = "lfm3"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "hidden_act",
        "full_attn_idxs",
        "block_multiple_of",
        "block_ffn_dim_multiplier",
        "block_auto_adjust_ff_dim",
    )
    bool_fields: ClassVar[tuple[str, ...]] = (
        *Lfm2Config.bool_fields,
        "use_sandwich_norm",
        "use_attention_gate",
        "attention_bias",
    )
    original_names: ClassVar[dict[str, str]] = {"tie_embedding": "tie_word_embeddings"}

    vocab_size: int = 128000
    hidden_size: int = 2048
    intermediate_size: int = 7680
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = 128
    pad_token_id: int | None = 124893
    bos_token_id: int | None = 124894
    eos_token_id: int | list[int] | None = 124900
    rope_parameters: dict[str, Any] = field(default_factory=_default_rope)
    conv_L_cache: int = 7
    sliding_window: int | None = 256
    use_sandwich_norm: bool = True
    use_attention_gate: bool = True
    attention_bias: bool = False

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, as given (transformers' defaults where absent)."""
        given = d.get("rope_parameters")
        if given is None:
            return _default_rope(), "v5"
        if not (isinstance(given, dict) and all(isinstance(v, dict) for v in given.values())):
            raise ConfigError(
                f"{source}: rope_parameters must be an object of objects by layer type, found {str(given)[:100]}"
            )
        return {kind: {"rope_type": "default", **params} for kind, params in given.items()}, "v5"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = [
                "full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i > 0 else "conv"
                for i in range(n)
            ]
        super().__post_init__()

    gguf_not_compared: ClassVar[tuple[str, ...]] = ()

    @property
    def ff_dim(self) -> int:
        """The MLP's width: intermediate_size as it is."""
        return self.intermediate_size

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def own_rope_kinds(self) -> dict[str, dict[str, Any]]:
        """The model's RoPE tables: one per attention layer type present."""
        return {kind: self.rope_parameters.get(kind) for kind in _KINDS if kind in (self.layer_types or ())}

    def rope_kinds(self) -> dict[str, dict[str, Any]]:  # the shared code's: all but "proportional"
        return {k: r for k, r in self.own_rope_kinds().items() if r.get("rope_type") != "proportional"}

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    def validate(self) -> None:
        src, types, n = self.source, self.layer_types, self.num_hidden_layers
        self.layer_types = None  # the base knows only attention kinds; the RoPE tables are checked below
        try:
            PretrainedConfig.validate(self)
        finally:
            self.layer_types = types
        if not isinstance(types, list) or len(types) != n or not set(types) <= set(LAYER_KINDS):
            raise ConfigError(
                f"{src}: layer_types must list {n} entries of {LAYER_KINDS}, found {str(types)[:200]}"
            )
        v = self.conv_L_cache
        if not _is_int(v) or not 0 < v <= 4096:
            raise ConfigError(f"{src}: conv_L_cache must be a positive integer (at most 4096), found {v!r}")
        w = self.sliding_window
        if "sliding_attention" in types and not (_is_int(w) and w > 0):
            raise ConfigError(
                f"{src}: sliding_window must be a positive integer with sliding layers, found {w!r}"
            )
        for kind, rope in self.own_rope_kinds().items():
            if not rope:
                raise ConfigError(f"{src}: rope_parameters has no entry for {kind!r}")
            if rope.get("rope_type") == "proportional":
                _validate_proportional(rope, f"{src}: rope_parameters[{kind!r}]")
            else:
                validate_rope(rope, f"{src}: rope_parameters[{kind!r}]")


class Lfm3Attention(Attention):
    """Qwen 3's attention (per-head q/k RMSNorms) reading its layer type's RoPE table and window; with
    use_attention_gate each head's output times sigmoid(g_proj(x)) before o_proj."""

    def __init__(self, config: Any, layer_idx: int):
        eps = config.rms_norm_eps
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim, layer_idx, bias=config.attention_bias,
                         window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx), qk_norm="head",
                         norm=lambda dim: RMSNorm(dim, eps))  # fmt: skip
        gate = config.use_attention_gate
        self.g_proj = Linear(config.hidden_size, config.num_attention_heads, bias=False) if gate else None

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.g_proj is None:
            return y
        B, T, _ = y.shape
        g = torch.sigmoid(self.g_proj(x)).unsqueeze(-1)  # (B, T, heads, 1)
        return (y.view(B, T, self.num_heads, self.head_dim) * g).view(B, T, -1)


class Lfm3DecoderLayer(Lfm2DecoderLayer):
    """LFM2's layer with LFM3's attention; with use_sandwich_norm the mixer's and the MLP's outputs normed
    (post_operator_norm, post_ffn_norm) before the residual sums."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        if self.is_attention_layer:
            self.self_attn = Lfm3Attention(config, layer_idx)
        h, eps, sandwich = config.hidden_size, config.rms_norm_eps, config.use_sandwich_norm
        self.post_operator_norm = RMSNorm(h, eps) if sandwich else nn.Identity()
        self.post_ffn_norm = RMSNorm(h, eps) if sandwich else nn.Identity()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        mixer = self.self_attn if self.is_attention_layer else self.conv
        x = x + self.post_operator_norm(mixer(self.operator_norm(x), ctx))
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class Lfm3Model(Lfm2Model):
    """LFM2's body (final norm `embedding_norm`) with a RoPE table per attention layer type."""

    def __init__(self, config: Any):
        super().__init__(config, Lfm3DecoderLayer)
        kinds = config.own_rope_kinds()
        self.rotary = Gemma4Rotary(
            kinds, dict.fromkeys(kinds, config.head_dim), config.max_position_embeddings
        )


class Lfm3VlConfig(ImageTextConfig):
    """transformers' Lfm3VlConfig (LFM3-VL): its language model's, an LFM3; the head tied by default."""

    model_type: ClassVar[str] = "lfm3_vl"
    text_class: ClassVar[type] = Lfm3Config
    tie_default: ClassVar[bool | None] = True


class Lfm3ForCausalLM(CausalLM):
    """transformers' Lfm3ForCausalLM."""

    config_class = Lfm3Config
    recurrent: ClassVar[bool] = True
    # transformers writes the gate as `self_attn.gate_proj` and holds it as g_proj (its conversion mapping)
    checkpoint_rules = CheckpointRules(
        [
            Rename(
                r"\.self_attn\.gate_proj\.",
                ".self_attn.g_proj.",
                r"\.self_attn\.g_proj\.",
                ".self_attn.gate_proj.",
            ),
            *IMAGE_TEXT_RULES,
        ]
    )
    tp_patterns: ClassVar[dict[str, str]] = {
        **{k.replace("out_proj", "o_proj"): v for k, v in LFM2_TP.items()},
        "layers.*.self_attn.g_proj": "colwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["Lfm3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Lfm3Model(config))
