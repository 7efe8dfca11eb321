"""LFM2 (Liquid AI's LFM2-350M ... 2.6B): a hybrid of pre-norm attention layers and gated short-convolution
layers, as `layer_types` says ("full_attention" or "conv"; without it, `full_attn_idxs` lists the attention layers,
by default all of them).

- Attention: grouped-query attention with RoPE, RMSNorms per head on queries and keys (`q_layernorm`,
  `k_layernorm`, before RoPE), no biases; the output projection is `out_proj`.
- Short convolution (`conv`): `in_proj` (h -> 3h) gives B, C and x; B * x runs through a causal depthwise
  convolution of `conv_L_cache` taps (`conv.conv`, an nn.Conv1d with weight (h, 1, L)), the result times C goes
  through `out_proj`. `conv_bias` gives all three biases. Inputs at padding positions are zeroed first, as
  transformers does, so a left-padded row's state is its unpadded one (with conv_bias, in_proj's bias still
  reaches the convolution at padding positions, in transformers too); the state a cache keeps is the last L - 1
  values of B * x (in the model's dtype), so a forward continues from it for any number of new tokens.
- Every layer (the mixer under `operator_norm`, then `feed_forward` under `ffn_norm`) ends in a SiLU-gated MLP
  named w1 (gate), w3 (up), w2 (down); with `block_auto_adjust_ff_dim` its width is 2/3 of intermediate_size,
  times `block_ffn_dim_multiplier` (when set) rounded up to `block_multiple_of`.
- The final norm is `embedding_norm`; RMS epsilon `norm_eps`; the head is tied by default; RoPE base 1e6.
- GGUF (llama.cpp's "lfm2"): head_count_kv is per layer, 0 on the convolution layers (the layer kinds);
  feed_forward_length the adjusted width; `shortconv.l_cache` the taps; the convolution weight squeezed to (h, L);
  `embedding_norm` is `token_embd_norm`; no biases (conv_bias is refused on GGUF out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import CheckpointError, ConfigError
from ..nn import Attention, CheckpointRules, GGUFLayout, Linear, RMSNorm, packed
from ..nn.causal_conv import causal_conv1d
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig

LAYER_KINDS = ("full_attention", "conv")


@dataclass(repr=False)
class Lfm2Config(PretrainedConfig):
    """transformers' Lfm2Config: `norm_eps` is autolm's rms_norm_eps (an attribute under both names); config.json's
    `block_ff_dim` and `tie_embedding` (the original files' names) are read as intermediate_size and
    tie_word_embeddings, as transformers reads them."""

    model_type: ClassVar[str] = "lfm2"
    default_theta: ClassVar[float] = 1000000.0
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "norm_eps"}
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "hidden_act", "attention_dropout", "sliding_window")
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "conv_bias",
        "block_auto_adjust_ff_dim",
    )

    vocab_size: int = 65536
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1000000.0}
    )
    conv_bias: bool = False
    conv_L_cache: int = 3
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    block_auto_adjust_ff_dim: bool = True
    full_attn_idxs: list[int] | None = None
    # the original files' names transformers reads (and does not write back): config.json key -> field
    original_names: ClassVar[dict[str, str]] = {
        "tie_embedding": "tie_word_embeddings",
        "block_ff_dim": "intermediate_size",
    }

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def __post_init__(self) -> None:
        for theirs, ours in self.original_names.items():
            if theirs in self.extra:
                setattr(self, ours, self.extra.pop(theirs))
        n, idxs = self.num_hidden_layers, self.full_attn_idxs
        if self.layer_types is None and _is_int(n) and n > 0:  # else the base validation names the key
            if idxs is None:
                self.full_attn_idxs = idxs = list(range(n))
            if isinstance(idxs, list):
                self.layer_types = ["full_attention" if i in idxs else "conv" for i in range(n)]
        super().__post_init__()

    # GGUF out's check (autolm.gguf_plan) compares the width and the layer kinds these fields make, not the fields:
    # llama.cpp's metadata holds only the former
    gguf_not_compared: ClassVar[tuple[str, ...]] = (
        "intermediate_size",
        "block_multiple_of",
        "block_ffn_dim_multiplier",
        "block_auto_adjust_ff_dim",
        "full_attn_idxs",
    )

    def gguf_compared(self) -> dict[str, Any]:
        return {
            "ff_dim": self.ff_dim,
            "layer kinds": [self.is_attention(i) for i in range(self.num_hidden_layers)],
        }

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps

    def is_attention(self, i: int) -> bool:
        """Whether layer i is an attention layer (else a short convolution)."""
        return self.layer_types[i] != "conv"

    @property
    def ff_dim(self) -> int:
        """The feed-forward width: intermediate_size, adjusted as block_auto_adjust_ff_dim says."""
        width = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            width = int(2 * width / 3)
            if self.block_ffn_dim_multiplier is not None:
                width = int(self.block_ffn_dim_multiplier * width)
                m = self.block_multiple_of
                width = m * ((width + m - 1) // m)
        return width

    def validate(self) -> None:
        types, self.layer_types = self.layer_types, None  # the base knows only attention kinds
        try:
            super().validate()
        finally:
            self.layer_types = types
        src, n = self.source, self.num_hidden_layers
        idxs = self.full_attn_idxs
        if idxs is not None and not (isinstance(idxs, list) and all(_is_int(i) and i >= 0 for i in idxs)):
            raise ConfigError(
                f"{src}: full_attn_idxs must be a list of layer indices or null, found {str(idxs)[:200]}"
            )
        if not isinstance(types, list) or len(types) != n or not set(types) <= set(LAYER_KINDS):
            raise ConfigError(
                f"{src}: layer_types must list {n} entries of {LAYER_KINDS}, found {str(types)[:200]}"
            )
        for name in ("conv_L_cache", "block_multiple_of"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= 4096:
                raise ConfigError(f"{src}: {name} must be a positive integer (at most 4096), found {v!r}")
        m = self.block_ffn_dim_multiplier
        if m is not None and not (_is_number(m) and m > 0):
            raise ConfigError(
                f"{src}: block_ffn_dim_multiplier must be a positive number or null, found {m!r}"
            )
        if self.ff_dim < 1:
            raise ConfigError(
                f"{src}: intermediate_size {self.intermediate_size} leaves no feed-forward width after "
                "block_auto_adjust_ff_dim's 2/3 (expected at least 2)"
            )


class Lfm2Attention(Attention):
    """Attention with per-head RMSNorms on q and k named q_layernorm / k_layernorm and the output projection
    out_proj; no biases."""

    def __init__(self, config: Any, layer_idx: int):
        hd, eps = config.head_dim, config.rms_norm_eps
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, hd,
                         layer_idx)  # fmt: skip
        self.q_layernorm = RMSNorm(hd, eps)
        self.k_layernorm = RMSNorm(hd, eps)
        self.qk_norm = "head"

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = Linear(hidden, nh * hd, bias=False)
        self.k_proj = Linear(hidden, nkv * hd, bias=False)
        self.v_proj = Linear(hidden, nkv * hd, bias=False)
        self.out_proj = Linear(nh * hd, hidden, bias=False)

    # Attention.forward's names for them
    q_norm = property(lambda self: self.q_layernorm)
    k_norm = property(lambda self: self.k_layernorm)
    o_proj = property(lambda self: self.out_proj)


class Lfm2ShortConv(nn.Module):
    """The gated short convolution: B, C, x = in_proj(x); out_proj(C * causal_depthwise_conv(B * x)). Its
    recurrent state is the last L - 1 values of B * x (B, h, L - 1)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, L, bias = config.hidden_size, config.conv_L_cache, config.conv_bias
        self.layer_idx, self.L_cache = layer_idx, L
        self.conv = nn.Conv1d(h, h, L, groups=h, bias=bias, padding=L - 1)
        self.in_proj = Linear(h, 3 * h, bias=bias)
        self.out_proj = Linear(h, h, bias=bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        real = ctx.real_tokens()
        if real is not None:  # padding's inputs zeroed, as transformers does
            x = (x * real[:, :, None]).to(x.dtype)
        b, c, v = self.in_proj(x).chunk(3, dim=-1)
        bx = (b * v).transpose(1, 2)  # (B, h, T)
        state = ctx.state(self.layer_idx)
        y, conv_state = causal_conv1d(
            bx, self.conv.weight, self.conv.bias, None if state is None else state[0]
        )
        ctx.keep_state(self.layer_idx, (conv_state,))
        return self.out_proj(c * y.to(bx.dtype).transpose(1, 2))


class Lfm2MLP(nn.Module):
    """w2(silu(w1(x)) * w3(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = Linear(hidden, intermediate, bias=False)
        self.w3 = Linear(hidden, intermediate, bias=False)
        self.w2 = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = packed(x, (self.w1, self.w3))
        return self.w2(F.silu(gate) * up)


class Lfm2DecoderLayer(nn.Module):
    """The mixer (self_attn or conv) under operator_norm, then the feed-forward block under ffn_norm."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        self.is_attention_layer = config.is_attention(layer_idx)
        if self.is_attention_layer:
            self.self_attn = Lfm2Attention(config, layer_idx)
        else:
            self.conv = Lfm2ShortConv(config, layer_idx)
        self.feed_forward = self.make_feed_forward(config, layer_idx)
        self.operator_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def make_feed_forward(self, config: Any, layer_idx: int) -> nn.Module:
        return Lfm2MLP(config.hidden_size, config.ff_dim)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        mixer = self.self_attn if self.is_attention_layer else self.conv
        x = x + mixer(self.operator_norm(x), ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class Lfm2Model(DecoderModel):
    """The body; its final norm is `embedding_norm`."""

    def __init__(self, config: Any, layer_cls: type[nn.Module] = Lfm2DecoderLayer):
        super().__init__(config, layer_cls, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_norm = self.norm
        del self.norm

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_norm(x)


# tensor parallelism splits the attention heads and the MLP; the short convolutions run whole on every rank
LFM2_TP = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.out_proj": "rowwise",
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
}


# ---- GGUF: llama.cpp's "lfm2" (convert_hf_to_gguf.py's LFM2Model) -------------------------------------------

_CONV_WEIGHT = re.compile(r".+\.conv\.conv\.weight")


@dataclass(frozen=True)
class SqueezedConv:
    """Checkpoint rule: llama.cpp's `shortconv.conv` is the depthwise convolution's weight (h, 1, L) squeezed to
    (h, L) (its ssm_conv op takes 2-D); read back as the model's (h, 1, L), squeezed again for GGUF out."""

    def piece(self, name: str) -> tuple[str, str] | None:
        return (name, "weight") if _CONV_WEIGHT.fullmatch(name) else None

    def pieces(self, name: str) -> int:
        return 1

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = got["weight"]
        if t.numel() != torch.Size(shape).numel() or t.shape[0] != shape[0]:
            raise CheckpointError(
                f"{source}: {name!r} has shape {tuple(t.shape)}; the model expects {tuple(shape)}"
            )
        return t.reshape(shape)

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        return [(name, t.squeeze(1))] if _CONV_WEIGHT.fullmatch(name) else None


def gguf_derive(d: dict[str, Any], get) -> None:
    """The config llama.cpp's lfm2 metadata means: head_count_kv per layer, 0 on the convolution layers (the layer
    kinds); feed_forward_length the MLP's final width (the converter applies block_auto_adjust_ff_dim)."""
    kv, heads = d.get("num_key_value_heads"), d.get("num_attention_heads")
    n = d.get("num_hidden_layers")
    if isinstance(heads, list):
        d["num_attention_heads"] = heads = max(heads, default=0)
    if not isinstance(kv, list):
        kv = [heads if kv is None else kv] * (n if isinstance(n, int) else 0)
    d["layer_types"] = ["full_attention" if k else "conv" for k in kv]
    d["full_attn_idxs"] = [i for i, k in enumerate(kv) if k]
    d["num_key_value_heads"] = max(kv, default=0) or heads
    d["block_auto_adjust_ff_dim"] = False


def gguf_write_config(m: dict[str, Any], c: Any) -> None:
    """The inverse of gguf_derive: what LFM2Model.set_gguf_parameters writes (no head size keys: transformers'
    config has no head_dim)."""
    m["attention.head_count_kv"] = [
        c.num_key_value_heads if c.is_attention(i) else 0 for i in range(c.num_hidden_layers)
    ]
    m["feed_forward_length"] = c.ff_dim
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        m.pop(key, None)


LFM2_GGUF_LAYER = (
    ("attn_norm", "operator_norm"),
    ("ffn_norm", "ffn_norm"),
    ("attn_output", "self_attn.out_proj"),
    ("attn_q_norm", "self_attn.q_layernorm"),
    ("attn_k_norm", "self_attn.k_layernorm"),
    ("shortconv.conv", "conv.conv"),
    ("shortconv.in_proj", "conv.in_proj"),
    ("shortconv.out_proj", "conv.out_proj"),
)
LFM2_GGUF = GGUFLayout(
    "lfm2",
    config=(("shortconv.l_cache", "conv_L_cache"),),
    layer=(
        *LFM2_GGUF_LAYER,
        ("ffn_gate", "feed_forward.w1"),
        ("ffn_up", "feed_forward.w3"),
        ("ffn_down", "feed_forward.w2"),
    ),
    top=(("token_embd_norm", "model.embedding_norm"),),  # the final norm, under the converter's name
    fixed=(("conv_bias", False),),  # llama.cpp's shortconv has no biases
    derive=gguf_derive,
    write_config=gguf_write_config,
)


class Lfm2VlConfig(ImageTextConfig):
    """transformers' Lfm2VlConfig (LFM2-VL): its language model's, an LFM2; the head tied by default."""

    model_type: ClassVar[str] = "lfm2_vl"
    text_class: ClassVar[type] = Lfm2Config
    tie_default: ClassVar[bool | None] = True


class Lfm2ForCausalLM(CausalLM):
    """transformers' Lfm2ForCausalLM."""

    config_class = Lfm2Config
    recurrent: ClassVar[bool] = True
    checkpoint_rules = CheckpointRules([SqueezedConv(), *IMAGE_TEXT_RULES])
    gguf = LFM2_GGUF
    tp_patterns: ClassVar[dict[str, str]] = LFM2_TP
    _no_split_modules: ClassVar[list[str]] = ["Lfm2DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Lfm2Model(config))
