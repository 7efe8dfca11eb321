"""Granite (IBM): Llama with four multipliers. The input embeddings are scaled by `embedding_multiplier`, each
sublayer's output by `residual_multiplier` before its residual add, attention scores by `attention_multiplier`
(instead of 1/sqrt(head_dim)), and the logits divided by `logits_scaling`. llama.cpp's "minicpm" GGUF files (MiniCPM
1/2, remote code) load as Granite."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig
from .llama import LlamaConfig

_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


@dataclass(repr=False)
class GraniteConfig(LlamaConfig):
    """transformers' GraniteConfig: Llama's fields and defaults plus the four multipliers."""

    model_type: ClassVar[str] = "granite"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0

    def validate(self) -> None:
        super().validate()
        for name in _MULTIPLIERS:
            v = getattr(self, name)
            if not _is_number(v) or (name == "logits_scaling" and v == 0):
                raise ConfigError(
                    f"{self.source}: {name} must be a finite number (logits_scaling not 0), found {v!r}"
                )


class GraniteDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            scale=config.attention_multiplier,
            window=config.layer_window(layer_idx),
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.residual_multiplier = float(config.residual_multiplier)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx) * self.residual_multiplier
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier


class GraniteModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, GraniteDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embedding_multiplier = float(config.embedding_multiplier)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return x * self.embedding_multiplier  # given inputs_embeds too, as transformers does


GRANITE_SCALES = (
    ("attention.scale", "attention_multiplier"),
    ("embedding_scale", "embedding_multiplier"),
    ("residual_scale", "residual_multiplier"),
    ("logit_scale", "logits_scaling"),
)


def _minicpm(d: dict[str, Any], get) -> None:
    """llama.cpp's minicpm: attention at 1 / sqrt(head size) (it reads no attention.scale), and for a file of an
    older converter, which wrote no scales, MiniCPM's constants: embeddings x 12, residuals x 1.4 / sqrt(layers),
    logits / (hidden / 256). (llama.cpp 0.3.36 falls back to logits / (256 / hidden), the inverse of what MiniCPM
    and its own graph of before computed: here MiniCPM's.)"""
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    if not heads or not hidden or not d.get("num_hidden_layers"):
        return  # the config's own check names what is missing
    d["attention_multiplier"] = 1.0 / math.sqrt(d.get("head_dim") or hidden // heads)
    d.setdefault("embedding_multiplier", 12.0)
    d.setdefault("residual_multiplier", 1.4 / math.sqrt(d["num_hidden_layers"]))
    d.setdefault("logits_scaling", hidden / 256)


class GraniteSpeechConfig(ImageTextConfig):
    """transformers' GraniteSpeechConfig (Granite Speech, audio-text): its language model's, a Granite; the head tied
    by default. The audio-text model's head does not divide its logits (logits_scaling 1 whatever text_config says):
    autolm gives its logits."""

    model_type: ClassVar[str] = "granite_speech"
    text_class: ClassVar[type] = GraniteConfig
    tie_default: ClassVar[bool | None] = True
    fixed: ClassVar[dict[str, Any]] = {"logits_scaling": 1.0}


class GraniteDoclingConfig(ImageTextConfig):
    """transformers' GraniteDoclingConfig (Granite Docling): its language model's (`granite_docling_text`, Granite's
    model exactly, with Granite Docling's defaults), the head dividing by logits_scaling as Granite's and tied by the
    outer config (tied by default); the vision tower, its connector and the density router skipped."""

    model_type: ClassVar[str] = "granite_docling"
    text_class: ClassVar[type] = GraniteConfig
    tie_default: ClassVar[bool | None] = True
    defaults: ClassVar[dict[str, Any]] = dict(
        vocab_size=133800, hidden_size=1024, intermediate_size=2048, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-5, pad_token_id=100256,
        bos_token_id=100257, eos_token_id=100257, embedding_multiplier=12.0, logits_scaling=4.0,
        residual_multiplier=0.263, attention_multiplier=0.015625,
    )  # fmt: skip


class Granite4VisionConfig(ImageTextConfig):
    """transformers' Granite4VisionConfig (Granite 4 Vision): its language model's (`granite4_vision_text`, Granite's
    model: its rotary, attention and decoder layer are Granite's unchanged; the visual features it adds before some
    layers come only with an image), the head dividing by logits_scaling and tied by the outer config (untied by
    default); the vision tower and the Q-Former projectors skipped."""

    model_type: ClassVar[str] = "granite4_vision"
    text_class: ClassVar[type] = GraniteConfig
    tie_default: ClassVar[bool | None] = False


class GraniteForCausalLM(CausalLM):
    config_class = GraniteConfig
    # llama.cpp writes Granite as Llama (q/k rows permuted) with the multipliers under their "scale" names
    gguf = GGUFLayout(
        "granite",
        permute_qk=True,
        config=GRANITE_SCALES,
        present=(("blk.0.attn_q.bias", "attention_bias"), ("blk.0.ffn_up.bias", "mlp_bias")),
    )
    # MiniCPM 1/2 (remote code) is Granite's arithmetic: scale_emb, scale_depth / sqrt(layers) and hidden_size /
    # dim_model_base are its multipliers, which llama.cpp's converter writes under the "scale" names (see _minicpm)
    gguf_more = (
        GGUFLayout("minicpm", permute_qk=True, config=GRANITE_SCALES[1:], derive=_minicpm, rope_freqs=True),
    )
    _no_split_modules: ClassVar[list[str]] = ["GraniteDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GraniteModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.logits_scaling
