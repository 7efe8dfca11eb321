"""HyperCLOVA X SEED (naver-hyperclovax/HyperCLOVAX-SEED-Think-14B): Granite's layer and muP multipliers with two
differences. Peri-layer normalization (`use_post_norm`, on by default): each sublayer's output passes an RMSNorm of
its own (`post_norm1` after attention, `post_norm2` after the MLP) before it is scaled by `residual_multiplier` and
added to the residual. The logits are multiplied by `logits_scaling` (Granite divides). `attention_multiplier` (the
attention scores' scale) defaults to head_dim ** -0.5, and head_dim may be given.

GGUF: llama.cpp's converter has no class for HyperCLOVAXForCausalLM: this family has no GGUF layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..nn import RMSNorm
from .base import CausalLM, DecoderModel
from .granite import GraniteConfig, GraniteDecoderLayer, GraniteModel
from .image_text import ImageTextConfig


@dataclass(repr=False)
class HyperCLOVAXConfig(GraniteConfig):
    """transformers' HyperCLOVAXConfig: Granite's fields and defaults, head_dim, attention_multiplier resolved to
    head_dim ** -0.5 where not given (and written so, as transformers writes it), use_post_norm."""

    model_type: ClassVar[str] = "hyperclovax"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*GraniteConfig.bool_fields, "use_post_norm")

    attention_multiplier: float | None = None
    use_post_norm: bool = True

    def __post_init__(self) -> None:
        hidden, heads = self.hidden_size, self.num_attention_heads
        if self.head_dim is None and _is_int(hidden) and _is_int(heads) and heads > 0 and hidden % heads == 0:
            self.head_dim = hidden // heads
        if self.attention_multiplier is None and _is_int(self.head_dim) and self.head_dim > 0:
            self.attention_multiplier = self.head_dim**-0.5
        super().__post_init__()


class HyperCLOVAXDecoderLayer(GraniteDecoderLayer):
    """Granite's layer with each sublayer's output normed (post_norm1, post_norm2; identities without
    use_post_norm) before the residual multiplier."""

    def __init__(self, config: HyperCLOVAXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.post_norm1 = RMSNorm(h, eps) if config.use_post_norm else nn.Identity()
        self.post_norm2 = RMSNorm(h, eps) if config.use_post_norm else nn.Identity()

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_norm1(self.self_attn(self.input_layernorm(x), ctx)) * self.residual_multiplier
        return x + self.post_norm2(self.mlp(self.post_attention_layernorm(x))) * self.residual_multiplier


class HyperCLOVAXModel(DecoderModel):
    def __init__(self, config: HyperCLOVAXConfig):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, HyperCLOVAXDecoderLayer, norm)
        self.embedding_multiplier = float(config.embedding_multiplier)

    scale_inputs = GraniteModel.scale_inputs  # the embeddings times embedding_multiplier


class HyperCLOVAXVisionV2Config(ImageTextConfig):
    """transformers' HyperCLOVAXVisionV2Config (HyperCLOVA X SEED Vision 2): its language model's, a HyperCLOVA X
    (the head's logits_scaling applied as the text model applies it); the head tied by default."""

    model_type: ClassVar[str] = "hyperclovax_vision_v2"
    text_class: ClassVar[type] = HyperCLOVAXConfig
    tie_default: ClassVar[bool | None] = True


class HyperCLOVAXForCausalLM(CausalLM):
    """transformers' HyperCLOVAXForCausalLM."""

    config_class = HyperCLOVAXConfig
    gguf = None  # llama.cpp has no HyperCLOVA X
    _no_split_modules: ClassVar[list[str]] = ["HyperCLOVAXDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, HyperCLOVAXModel(config))
        self.logits_scaling = float(config.logits_scaling)  # an attribute: the compiled head's key holds it

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.logits_scaling  # muP: multiplied, where Granite divides
