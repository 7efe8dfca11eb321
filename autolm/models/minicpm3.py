"""MiniCPM3 (openbmb/MiniCPM3-4B): Llama's pre-norm layers with DeepSeek-V2's Multi-head Latent Attention (the
module names and sizes of models.deepseek_v3: q_a_proj / q_a_layernorm / q_b_proj, or a plain q_proj where
q_lora_rank is null, kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj, o_proj; scores scaled by qk_head_dim ** -0.5)
and muP-style multipliers.

RoPE turns the rope parts (qk_rope_head_dim, the RoPE tables' width: `head_dim`) in rotate-half order, not
DeepSeek's interleaved pairs. The real checkpoint scales it with LongRoPE (short factors up to
original_max_position_embeddings, long ones beyond; the original length is max_position_embeddings where not
given, as transformers sets it).

The multipliers: the token embeddings times `scale_emb` (given inputs_embeds are not scaled), each sublayer's output times scale_depth /
sqrt(num_hidden_layers) before its residual add, the final hidden states divided by hidden_size / dim_model_base
before the (by default tied) LM head. A null v_head_dim is hidden_size / heads, a null scale_depth
sqrt(num_hidden_layers) (no scaling), a null dim_model_base hidden_size (none), as transformers resolves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .deepseek_v3 import DeepseekV3Attention, DeepseekV3Config


@dataclass(repr=False)
class MiniCPM3Config(PretrainedConfig):
    """transformers' MiniCPM3Config: its fields and defaults (MiniCPM3-4B's sizes). `head_dim` is always
    qk_rope_head_dim and `qk_head_dim` qk_nope_head_dim + qk_rope_head_dim, as transformers sets and writes them."""

    model_type: ClassVar[str] = "minicpm3"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "mlp_bias")
    rope_interleave: ClassVar[bool] = False  # rotate-half RoPE (read by DeepseekV3Attention)
    attention_scale = DeepseekV3Config.attention_scale  # qk_head_dim ** -0.5 (times YaRN's mscale squared)

    vocab_size: int = 73448
    hidden_size: int = 2560
    intermediate_size: int = 6400
    num_hidden_layers: int = 62
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 40
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    kv_lora_rank: int = 256
    q_lora_rank: int | None = 768
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int | None = None
    scale_emb: float = 12
    scale_depth: float | None = 1.4
    dim_model_base: int | None = 256

    def __post_init__(self) -> None:
        self.head_dim = self.qk_rope_head_dim  # transformers' too, whatever config.json says
        self.extra.pop("qk_head_dim", None)  # derived: written back from the parts
        heads, n = self.num_attention_heads, self.num_hidden_layers
        if self.v_head_dim is None and _is_int(self.hidden_size) and _is_int(heads) and heads > 0:
            self.v_head_dim = self.hidden_size // heads
        if self.scale_depth is None and _is_int(n) and n > 0:
            self.scale_depth = math.sqrt(n)
        if self.dim_model_base is None:
            self.dim_model_base = self.hidden_size
        super().__post_init__()
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def logits_scaling(self) -> float:
        """What the final hidden states are divided by: hidden_size / dim_model_base."""
        return self.hidden_size / self.dim_model_base

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["qk_head_dim"] = self.qk_head_dim
        return out

    def gguf_compared(self) -> dict[str, Any]:
        """Compared by GGUF out beyond the fields: the attention scale (YaRN's mscale_all_dim changes it)."""
        return {"attention scale": self.attention_scale()}

    def validate(self) -> None:
        src = self.source
        positive_ints(self, ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "dim_model_base"), 1
                             << 17)  # fmt: skip
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"{src}: qk_rope_head_dim must be even (RoPE turns pairs), found {self.qk_rope_head_dim}"
            )
        q = self.q_lora_rank
        if q is not None and not (_is_int(q) and 0 < q <= 1 << 17):
            raise ConfigError(f"{src}: q_lora_rank must be a positive integer or null, found {q!r}")
        for name in ("scale_emb", "scale_depth"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{src}: {name} must be a finite number, found {getattr(self, name)!r}")
        super().validate()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{src}: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                              f"({self.num_attention_heads})")  # fmt: skip
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                              f"({self.num_attention_heads}): MLA gives every head its own keys and values")  # fmt: skip
        rope = self.rope_parameters
        if (
            rope.get("rope_type") != "default"
            and rope.get("mscale_all_dim")
            and not _is_number(rope.get("factor"))
        ):
            raise ConfigError(f"{src}: RoPE mscale_all_dim needs a numeric factor (the attention scale's "
                              f"mscale(factor, mscale_all_dim)), found {rope.get('factor')!r}")  # fmt: skip
        for name in ("short_factor", "long_factor") if rope.get("rope_type") == "longrope" else ():
            f = rope.get(name)
            if not (isinstance(f, list) and len(f) == self.qk_rope_head_dim // 2
                    and all(_is_number(x) and x > 0 for x in f)):  # fmt: skip
                raise ConfigError(f"{src}: RoPE {name} must be a list of {self.qk_rope_head_dim // 2} positive "
                                  f"numbers (one per pair of qk_rope_head_dim), found {str(f)[:200]}")  # fmt: skip


class MiniCPM3DecoderLayer(nn.Module):
    """Pre-norm MLA and gated MLP, each output times scale_depth / sqrt(num_hidden_layers) before its residual add."""

    def __init__(self, config: MiniCPM3Config, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DeepseekV3Attention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.residual_scale = float(config.scale_depth / math.sqrt(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class MiniCPM3Model(DecoderModel):
    def __init__(self, config: MiniCPM3Config):
        super().__init__(config, MiniCPM3DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.scale_emb = float(config.scale_emb)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings times scale_emb, cast to their dtype first (transformers' scaled embedding: given
        inputs_embeds are not scaled)."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.scale_emb, dtype=x.dtype, device=x.device)


# ---- GGUF: llama.cpp's MiniCPM3Model converter (arch "minicpm3") ---------------------------------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """What llama.cpp's minicpm3 reads in its own terms: the rope part's width as rope.dimension_count, the whole
    q/k head as attention.key_length, the value head hidden / heads (no key for it), a low-rank query always;
    LongRoPE where the factors are in the file, switching to the long ones past the training context."""
    rope_dim, key = d.get("head_dim"), get("attention.key_length")
    d["qk_rope_head_dim"] = rope_dim
    d["qk_nope_head_dim"] = key - rope_dim if _is_int(key) and _is_int(rope_dim) else key
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    d["v_head_dim"] = hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else None
    if get("attention.q_lora_rank") is None:
        raise ConfigError("llama.cpp's minicpm3 needs attention.q_lora_rank (it has no plain q projection): "
                          "q_lora_rank")  # fmt: skip
    rope = d["rope_parameters"]
    if "long_factor" in rope or "short_factor" in rope:
        rope["rope_type"] = "longrope"
        rope["original_max_position_embeddings"] = d.get("max_position_embeddings")


def _gguf_write_config(m: dict[str, Any], c: MiniCPM3Config) -> None:
    """The inverse of _gguf_config, as the converter writes it: no RoPE base (llama.cpp's 10000), no value
    length; LongRoPE's factors go out as tensors. Refused: RoPE scaling the converter does not write (only
    LongRoPE's factors), a LongRoPE whose original length is not the context length (llama.cpp switches to the
    long factors past its context length)."""
    rope = c.rope_parameters
    if rope.get("rope_type") not in ("default", "longrope"):
        raise ConfigError(f"rope_type {rope.get('rope_type')!r}: llama.cpp's minicpm3 runs the plain RoPE or "
                          "LongRoPE's factors only")  # fmt: skip
    original = rope.get("original_max_position_embeddings", c.max_position_embeddings)
    if rope.get("rope_type") == "longrope" and original != c.max_position_embeddings:
        raise ConfigError(f"original_max_position_embeddings {original}: llama.cpp's minicpm3 switches to the "
                          f"long factors past its context length ({c.max_position_embeddings})")  # fmt: skip
    for key in ("rope.freq_base", "attention.value_length"):
        m.pop(key, None)
    m["attention.key_length"] = c.qk_head_dim


class MiniCPM3ForCausalLM(CausalLM):
    """transformers' MiniCPM3ForCausalLM."""

    config_class = MiniCPM3Config
    # llama.cpp's MiniCPM3Model converter: tensors one to one (kv_b_proj whole), LongRoPE's factors as tensors; its
    # graph has the multipliers built in (12, 1.4, 256), no biases, SiLU
    gguf = GGUFLayout(
        "minicpm3",
        config=(("attention.q_lora_rank", "q_lora_rank"), ("attention.kv_lora_rank", "kv_lora_rank")),
        layer=(("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"),
               ("attn_q_b", "self_attn.q_b_proj"), ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
               ("attn_kv_a_norm", "self_attn.kv_a_layernorm"), ("attn_kv_b", "self_attn.kv_b_proj")),
        fixed=(("scale_emb", 12), ("scale_depth", 1.4), ("dim_model_base", 256), ("attention_bias", False),
               ("mlp_bias", False), ("hidden_act", "silu")),
        rope_tensors=(("rope_factors_long.weight", "long_factor"), ("rope_factors_short.weight", "short_factor")),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )  # fmt: skip
    # transformers' plan: heads split across ranks (q_proj / q_b_proj and kv_b_proj give each rank its heads' rows;
    # the low-rank q_a / kv_a projections and their norms stay whole), o_proj takes their slice of its input
    tp_patterns: ClassVar[dict[str, str]] = {
        **{f"layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "q_b_proj", "kv_b_proj")},
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["MiniCPM3DecoderLayer"]

    def __init__(self, config: MiniCPM3Config):
        super().__init__(config, MiniCPM3Model(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.logits_scaling
