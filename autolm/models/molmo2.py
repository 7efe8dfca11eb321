"""Molmo 2's language model (`molmo2_text`, AI2): Llama's decoder layer (grouped-query attention with RoPE, a
SiLU-gated MLP, Llama's RMSNorm) with four differences.

- RMSNorm on queries and keys (transformers builds them always): per head (`qk_norm_type` "qwen3", Qwen 3's) or over
  the whole projection (`"olmo"`, OLMo 2's), before RoPE;
- `norm_after`: the layer norms move from each sublayer's input to its output, before the residual add (OLMo 2's
  placement, under the names input_layernorm / post_attention_layernorm);
- the token embeddings have `additional_vocab_size` more rows than the head (the image and video special tokens:
  they can be input, never predicted); the head is never tied;
- `rope_scaling_layers`: the layers whose RoPE is rope_parameters' scaled one; the others run the default RoPE of
  the same theta (every layer by default).

Molmo 2's files (the Hub's, and transformers' save_pretrained of either the image-text or the text model) keep the
original layout: model.transformer.blocks.N with attn_norm / ff_norm, one fused self_attn.att_proj (q, k, v rows),
attn_out, mlp.ff_proj (up then gate rows) and ff_out, the embeddings as two tables wte.embedding and
wte.new_embedding (joined in order; transformers' own save cuts them in halves), ln_f; the vision backbone
(model.vision_backbone.*) skipped. transformers 5's names (model.language_model.*) load too; saved, the model is
the text model under transformers' module names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import CheckpointError, ConfigError
from ..nn import Attention, CheckpointRules, GatedMLP, Ignored, Rename, RMSNorm, embedding
from .base import LLAMA_TP, CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig
from .olmo2 import Olmo2ForCausalLM

QK_NORM_TYPES = ("qwen3", "olmo")


@dataclass(repr=False)
class Molmo2TextConfig(LlamaConfig):
    """transformers' Molmo2TextConfig: its fields and defaults (no special tokens of its own)."""

    model_type: ClassVar[str] = "molmo2_text"
    absent_keys: ClassVar[tuple[str, ...]] = (
        *LlamaConfig.absent_keys,
        "mlp_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    bool_fields: ClassVar[tuple[str, ...]] = (*LlamaConfig.bool_fields, "norm_after")
    aliases: ClassVar[dict[str, str]] = {"qkv_bias": "attention_bias", "layer_norm_eps": "rms_norm_eps"}

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    vocab_size: int = 151936
    additional_vocab_size: int = 128
    qk_norm_type: str = "qwen3"
    num_hidden_layers: int = 36
    intermediate_size: int = 12288
    max_position_embeddings: int = 36864
    rope_scaling_layers: list[int] | None = None
    rms_norm_eps: float = 1e-6
    norm_after: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        """transformers' attribute_map: the original's qkv_bias and layer_norm_eps."""
        if isinstance(d, dict):
            d = {
                cls.aliases.get(k, k): v
                for k, v in d.items()
                if not (k in cls.aliases and cls.aliases[k] in d)
            }
        return super().from_dict(d, source, **overrides)

    def __post_init__(self) -> None:
        if self.rope_scaling_layers is None and _is_int(self.num_hidden_layers):
            self.rope_scaling_layers = list(range(self.num_hidden_layers))
        super().__post_init__()

    def validate(self) -> None:
        src, layers = self.source, self.rope_scaling_layers
        if not isinstance(layers, list) or not all(_is_int(i) for i in layers):
            raise ConfigError(f"{src}: rope_scaling_layers must be a list of layer indices, found {layers!r}")
        super().validate()
        if self.qk_norm_type not in QK_NORM_TYPES:
            raise ConfigError(
                f"{src}: qk_norm_type must be one of {QK_NORM_TYPES}, found {self.qk_norm_type!r}"
            )
        if not _is_int(self.additional_vocab_size) or not 0 <= self.additional_vocab_size <= 1 << 20:
            raise ConfigError(f"{src}: additional_vocab_size must be a non-negative integer, "
                              f"found {self.additional_vocab_size!r}")  # fmt: skip
        if self.tie_word_embeddings:
            raise ConfigError(f"{src}: tie_word_embeddings: Molmo 2's head (vocab_size rows) is never tied to its "
                              "embeddings (vocab_size + additional_vocab_size rows)")  # fmt: skip

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        kinds = {"default": self.rope_parameters}
        if any(self.layer_rope(i) == "unscaled" for i in range(self.num_hidden_layers)):
            kinds["unscaled"] = {"rope_type": "default", "rope_theta": self.rope_parameters["rope_theta"]}
        return kinds

    def layer_rope(self, i: int) -> str:
        """Layer i's RoPE table: the scaled one in rope_scaling_layers, else the default one of the same theta."""
        scaled = (
            i in self.rope_scaling_layers or self.rope_parameters.get("rope_type", "default") == "default"
        )
        return "default" if scaled else "unscaled"


class Molmo2DecoderLayer(nn.Module):
    """Llama's layer with q/k norms; `norm_after` moves the norms onto the sublayers' outputs."""

    def __init__(self, config: Molmo2TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=config.attention_bias, o_bias=False,
                                   rope=config.layer_rope(layer_idx),
                                   qk_norm="head" if config.qk_norm_type == "qwen3" else "full",
                                   norm=lambda dim: RMSNorm(dim, eps))  # fmt: skip
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.norm_after = config.norm_after

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        if self.norm_after:
            x = x + self.input_layernorm(self.self_attn(x, ctx))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Molmo2TextModel(DecoderModel):
    def __init__(self, config: Molmo2TextConfig):
        super().__init__(config, Molmo2DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embed_tokens = embedding(config.embedding_rows, config.hidden_size)


@dataclass(frozen=True)
class JoinedEmbeddings:
    """Checkpoint rule: the original's two embedding tables (wte.embedding, wte.new_embedding) as embed_tokens."""

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.*)\.wte\.(embedding|new_embedding)", name)
        return None if m is None else (f"{m.group(1)}.embed_tokens.weight", m.group(2))

    def pieces(self, name: str) -> int:
        return 2

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        t = torch.cat([got["embedding"], got["new_embedding"]])
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: wte.embedding and wte.new_embedding together are {tuple(t.shape)}; "
                                  f"{name!r} is {tuple(shape)} (vocab_size + additional_vocab_size rows)")  # fmt: skip
        return t


def _load(checkpoint: str, model: str) -> Rename:
    return Rename(checkpoint, model, r"(?!)", "")  # saved under the model's names


MOLMO2_RULES = (
    *IMAGE_TEXT_RULES,
    _load(r"^(model\.)?transformer\.blocks\.", "model.layers."),
    _load(r"^(model\.)?transformer\.(ln_f|wte)\.", r"model.\2."),
    _load(r"^model\.ln_f\.", "model.norm."),
    _load(r"\.attn_norm\.", ".input_layernorm."),
    _load(r"\.ff_norm\.", ".post_attention_layernorm."),
    _load(r"\.self_attn\.attn_out\.", ".self_attn.o_proj."),
    _load(r"\.mlp\.ff_out\.", ".mlp.down_proj."),
    Ignored(r"(model\.)?vision_backbone\..+"),
    JoinedEmbeddings(),
)


class Molmo2Rules(CheckpointRules):
    """MOLMO2_RULES, and the fused projections cut into the model's: att_proj into q, k and v (`sizes` rows), ff_proj
    into up and gate (halves)."""

    def __init__(self, rules: tuple, sizes: tuple[int, ...] = ()):
        super().__init__(rules)
        self.sizes = sizes

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        m = re.fullmatch(r"(.+)\.(self_attn\.att_proj|mlp\.ff_proj)\.(weight|bias)", name)
        if m is None:
            return super().split(name, t)
        stem, fused, kind = m.groups()
        parts, sizes = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), self.sizes)
        if fused == "mlp.ff_proj":
            parts, sizes = ("mlp.up_proj", "mlp.gate_proj"), (t.shape[0] // 2,) * 2
        if sum(sizes) != t.shape[0]:
            raise CheckpointError(
                f"{name!r} has {t.shape[0]} rows; the model's {', '.join(parts)} have {sizes}"
            )
        return [(f"{stem}.{p}.{kind}", c) for p, c in zip(parts, t.split(list(sizes)), strict=True)]


class Molmo2TextForCausalLM(CausalLM):
    """transformers' Molmo2ForConditionalGeneration on text (its language model and head)."""

    config_class = Molmo2TextConfig
    checkpoint_rules = Molmo2Rules(MOLMO2_RULES)
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["Molmo2DecoderLayer"]

    def __init__(self, config: Molmo2TextConfig):
        super().__init__(config, Molmo2TextModel(config))
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        self.checkpoint_rules = Molmo2Rules(MOLMO2_RULES, (q, kv, kv))
        if config.qk_norm_type == "olmo":  # q/k norms over all heads: OLMo 2's plan (q/k/v gathered whole)
            self.tp_patterns = Olmo2ForCausalLM.tp_patterns

    def shard_heads(self, world: int) -> None:
        """Per-head q/k norms: each rank runs its share of the heads; whole-projection ones: all heads (OLMo 2)."""
        if self.config.qk_norm_type == "qwen3":
            super().shard_heads(world)


class Molmo2Config(ImageTextConfig):
    """transformers' Molmo2Config (Molmo 2): its language model's; the head never tied."""

    model_type: ClassVar[str] = "molmo2"
    text_class: ClassVar[type] = Molmo2TextConfig
    tie_default: ClassVar[bool | None] = False
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}
