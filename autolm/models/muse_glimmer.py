"""Muse Glimmer's language model (model_type muse_glimmer_text; muse_glimmer: the image-text checkpoints, whose vision
tower and adapter are skipped). transformers 5.23 has no text-only causal LM for it: its language model runs inside
MuseGlimmerForConditionalGeneration. A Gemma 2 layer with AFMoE's attention:

- four centered norms per layer (RMSNorm times (1 + w) in fp32, as Gemma's), the two after the sublayers with
  their own epsilon, `post_norm_eps`; the final norm times w in fp32 (weights starting at one);
- the token embeddings normed by a weightless RMSNorm (not scaled by sqrt(hidden_size)); `inputs_embeds` a user
  passes are taken as they are, as transformers' normed embedding module is skipped then;
- attention with an output gate (sigmoid(x @ `gate_proj`), AFMoE's), queries and keys normed per head by a
  weightless RMSNorm and the queries times `qk_scale_factor` (folded into the scores' scale, head_dim ** -0.5);
  sliding and full layers by `layer_types` (by default full every 4th counted back from the last);
- RoPE where `layer_rope_theta` is not 0 (by default the full layers are NoPE). transformers rotates every such
  layer with rope_parameters' theta whatever other value the list gives, and so does autolm;
- a gated MLP (`hidden_activation`, SiLU by default); logits times `output_multiplier`, then soft-capped (tanh) at
  `final_logit_softcapping`. The image-text model ties its head by the outer config's tie_word_embeddings alone.

GGUF in and out as llama.cpp's "muse-glimmer" (converter conversion/muse_glimmer.py, graph
src/models/muse-glimmer.cpp): muse_glimmer_gguf.py (qk_scale_factor as the q norms' weights; what the graph fixes
refused on the way out, by field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, GatedMLP, Ignored, Linear, RMSNorm
from . import muse_glimmer_gguf as gguf_io
from .afmoe import AfmoeAttention
from .base import LLAMA_TP, CausalLM, DecoderModel
from .gemma2 import Gemma2Config, Gemma2DecoderLayer, softcap, takes_hidden_activation
from .gemma4 import WeightlessRMSNorm
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig


def nope_every_fourth(n: int) -> list[bool]:
    """transformers' default pattern: every 4th layer counted back from the last is full attention and NoPE."""
    return [(n - 1 - i) % 4 == 0 for i in range(n)]


@takes_hidden_activation
@dataclass(repr=False)
class MuseGlimmerTextConfig(Gemma2Config):
    """transformers' MuseGlimmerTextConfig (its field names and defaults): Gemma2Config without the attention scalar,
    the attention soft-cap and bidirectional attention; layer_types and layer_rope_theta derived where absent."""

    model_type: ClassVar[str] = "muse_glimmer_text"
    absent_keys: ClassVar[tuple[str, ...]] = ("query_pre_attn_scalar", "attn_logit_softcapping",
                                              "use_bidirectional_attention")  # fmt: skip

    vocab_size: int = 202_048
    hidden_size: int = 6656
    intermediate_size: int = 19968
    num_hidden_layers: int = 52
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    hidden_act: str = "silu"  # config.json's hidden_activation
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 200_000
    eos_token_id: int | list[int] | None = 200_001
    pad_token_id: int | None = None
    sliding_window: int | None = 2048
    final_logit_softcapping: float | None = 20.0
    attn_logit_softcapping: float | None = None  # not a field of transformers': never applied
    qk_scale_factor: float = 3.87
    output_multiplier: float = 0.19611613513818404
    post_norm_eps: float = 1e-8
    layer_rope_theta: list[float] | None = None
    # GGUF out: compared through each layer's RoPE (transformers rotates with rope_parameters' theta)
    gguf_not_compared: ClassVar[tuple[str, ...]] = ("layer_rope_theta",)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n) and n > 0:
            full = nope_every_fourth(n)
            if self.layer_types is None:
                self.layer_types = ["full_attention" if f else "sliding_attention" for f in full]
            if self.layer_rope_theta is None and isinstance(self.rope_parameters, dict):
                theta = self.rope_parameters.get("rope_theta")
                self.layer_rope_theta = [0 if f else theta for f in full]
        super().__post_init__()

    @property
    def attn_softcap(self) -> None:
        return None

    def layer_rope(self, i: int) -> str | None:
        """The full RoPE table where layer i's theta is not 0 (rope_parameters' theta, as transformers), else none."""
        return "default" if self.layer_rope_theta[i] else None

    def validate(self) -> None:
        super().validate()
        src = self.source
        for name in ("qk_scale_factor", "output_multiplier", "final_logit_softcapping"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise ConfigError(f"{src}: {name} must be a positive number, found {v!r}")
        if not _is_number(self.post_norm_eps) or not 0 < self.post_norm_eps < 1:
            raise ConfigError(
                f"{src}: post_norm_eps must be a positive number below 1, found {self.post_norm_eps!r}"
            )
        thetas = self.layer_rope_theta
        if not (isinstance(thetas, list) and len(thetas) == self.num_hidden_layers
                and all(_is_number(t) and t >= 0 for t in thetas)):  # fmt: skip
            raise ConfigError(f"{src}: layer_rope_theta must list {self.num_hidden_layers} numbers >= 0 (0: no "
                              f"RoPE), found {str(thetas)[:200]}")  # fmt: skip


class MuseGlimmerConfig(ImageTextConfig):
    """transformers' MuseGlimmerConfig (image-text): its language model's text_config; the head tied by the outer
    config alone (untied by default)."""

    model_type: ClassVar[str] = "muse_glimmer"
    text_class: ClassVar[type] = MuseGlimmerTextConfig
    tie_default: ClassVar[bool | None] = False


class MuseGlimmerTextAttention(AfmoeAttention):
    """AFMoE's gated attention with weightless per-head q/k norms and the queries scaled by qk_scale_factor."""

    def __init__(self, config: Any, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        Attention.__init__(self, config.hidden_size, nh, nkv, hd, layer_idx, bias=config.attention_bias,
                           scale=config.qk_scale_factor * hd**-0.5, window=config.layer_window(layer_idx),
                           rope=config.layer_rope(layer_idx), qk_norm="head",
                           norm=lambda dim: WeightlessRMSNorm(config.rms_norm_eps))  # fmt: skip
        self.gate_proj = Linear(config.hidden_size, nh * hd, bias=False)


class MuseGlimmerTextDecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer (norms on both sides of each sublayer; forward inherited) with Muse's attention."""

    def __init__(self, config: Any, layer_idx: int):
        nn.Module.__init__(self)
        h, eps, post = config.hidden_size, config.rms_norm_eps, config.post_norm_eps
        self.self_attn = MuseGlimmerTextAttention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, post, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, post, offset=1.0)


class MuseGlimmerTextModel(DecoderModel):
    """The normed token embeddings, the layers, the final norm (times w in fp32)."""

    def __init__(self, config: Any, layer_cls: type[nn.Module] = MuseGlimmerTextDecoderLayer):
        h, eps = config.hidden_size, config.rms_norm_eps
        super().__init__(config, layer_cls, RMSNorm(h, eps, weight_in_fp32=True))
        self.embed_norm = WeightlessRMSNorm(eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(self.embed_tokens(input_ids))


# the image-text checkpoints' vision adapter (model.vision_adapter.*) besides the towers IMAGE_TEXT_RULES skips
MUSE_RULES = CheckpointRules([*IMAGE_TEXT_RULES, Ignored(r"(model\.)?vision_adapter\..+")])


class MuseGlimmerForCausalLM(CausalLM):
    """The language model of transformers' MuseGlimmerForConditionalGeneration."""

    config_class = MuseGlimmerTextConfig
    checkpoint_rules = MUSE_RULES
    tp_patterns: ClassVar[dict[str, str]] = {**LLAMA_TP, "layers.*.self_attn.gate_proj": "colwise"}
    gguf = gguf_io.LAYOUT  # llama.cpp's MuseGlimmerModel converter's file (models.muse_glimmer_gguf)
    _no_split_modules: ClassVar[list[str]] = ["MuseGlimmerTextDecoderLayer"]

    def __init__(self, config: Any, model: DecoderModel | None = None):
        super().__init__(config, model or MuseGlimmerTextModel(config))
        if self.gguf is gguf_io.LAYOUT:  # GGUF's q/k norms (not a subclass's: Muse Spark has no GGUF)
            self.checkpoint_rules = gguf_io.with_rules(type(self).checkpoint_rules, config)
        # settings of the compiled head's graph
        self.output_multiplier = float(config.output_multiplier)
        self.final_logit_softcapping = float(config.final_logit_softcapping)

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits * self.output_multiplier, self.final_logit_softcapping)
