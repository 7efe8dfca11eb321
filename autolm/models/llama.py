"""Llama: pre-norm decoder layers of grouped-query attention with RoPE and a SiLU-gated MLP, RMSNorm.

Mistral, Qwen 2 and Qwen 3 are this architecture with other defaults, biases, q/k norms and windows; their
files hold only their configs. llama.cpp's "exaone" and "internlm2" GGUF files (remote-code models) load as Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import EitherTiesConfig, ImageTextConfig


@dataclass(repr=False)
class LlamaConfig(PretrainedConfig):
    """transformers' LlamaConfig; the q/k/v and o biases, q/k norms and each layer's window are the properties
    the Llama-shaped families differ in."""

    model_type: ClassVar[str] = "llama"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "mlp_bias",
        "use_sliding_window",
    )

    attention_bias: bool = False
    mlp_bias: bool = False
    use_sliding_window: bool = False
    max_window_layers: int = 0

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return False

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.max_window_layers) or self.max_window_layers < 0:
            raise ConfigError(
                f"{self.source}: max_window_layers must be a non-negative integer, found {self.max_window_layers!r}"
            )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.qkv_bias,
            o_bias=config.o_bias,
            window=config.layer_window(layer_idx),
            qk_norm="head" if config.qk_norm else None,
            norm=lambda dim: RMSNorm(dim, eps),
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, LlamaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class LlavaConfig(ImageTextConfig):
    """transformers' LlavaConfig (LLaVA 1.5 and its kin): its language model's, a Llama unless text_config names
    another family (autolm.models.image_text); the head untied by default."""

    model_type: ClassVar[str] = "llava"
    text_class: ClassVar[type] = LlamaConfig
    tie_default: ClassVar[bool | None] = False


class LlavaNextConfig(LlavaConfig):
    """transformers' LlavaNextConfig (LLaVA-NeXT), read as LlavaConfig."""

    model_type: ClassVar[str] = "llava_next"


class Idefics3Config(LlavaConfig):
    """transformers' Idefics3Config (Idefics 3): its language model's (model.text_model.*), a Llama by default."""

    model_type: ClassVar[str] = "idefics3"


class SmolVLMConfig(LlavaConfig):
    """transformers' SmolVLMConfig (SmolVLM, SmolVLM2), read as Idefics3Config."""

    model_type: ClassVar[str] = "smolvlm"


class VipLlavaConfig(LlavaConfig):
    """transformers' VipLlavaConfig (ViP-LLaVA), read as LlavaConfig."""

    model_type: ClassVar[str] = "vipllava"


class VideoLlavaConfig(LlavaConfig):
    """transformers' VideoLlavaConfig (Video-LLaVA), read as LlavaConfig (its image and video towers skipped)."""

    model_type: ClassVar[str] = "video_llava"


class LlavaNextVideoConfig(EitherTiesConfig):
    """transformers' LlavaNextVideoConfig (LLaVA-NeXT-Video): a Llama unless text_config names another family; the
    head tied by the outer config or, as older files hold it, by text_config."""

    model_type: ClassVar[str] = "llava_next_video"
    text_class: ClassVar[type] = LlamaConfig


class DeepseekVLConfig(LlavaConfig):
    """transformers' DeepseekVLConfig (DeepSeek-VL): its language model's, a Llama; the head tied by default."""

    model_type: ClassVar[str] = "deepseek_vl"
    tie_default: ClassVar[bool | None] = True


class DeepseekVLHybridConfig(DeepseekVLConfig):
    """transformers' DeepseekVLHybridConfig (DeepSeek-VL with its high-resolution tower), read as DeepseekVLConfig."""

    model_type: ClassVar[str] = "deepseek_vl_hybrid"


class JanusConfig(DeepseekVLConfig):
    """transformers' JanusConfig (Janus, Janus-Pro): its language model's, a Llama, the head tied by default (the
    outer config's, whatever text_config says); the image generation head and VQ model skipped."""

    model_type: ClassVar[str] = "janus"


class PerceptionLMConfig(ImageTextConfig):
    """transformers' PerceptionLMConfig (Meta Perception LM): its language model's, a Llama, tied by the outer config
    where it says, else by text_config's."""

    model_type: ClassVar[str] = "perception_lm"
    text_class: ClassVar[type] = LlamaConfig


class VoxtralConfig(ImageTextConfig):
    """transformers' VoxtralConfig (Voxtral, audio-text): its language model's, a Llama with Voxtral's defaults
    where text_config leaves them out; the head never tied (the model ties none)."""

    model_type: ClassVar[str] = "voxtral"
    text_class: ClassVar[type] = LlamaConfig
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}
    defaults: ClassVar[dict[str, Any]] = dict(vocab_size=131072, hidden_size=3072, intermediate_size=8192,
                                              num_hidden_layers=30, num_key_value_heads=8,
                                              max_position_embeddings=131072, rms_norm_eps=1e-5, use_cache=True,
                                              rope_theta=1e8, head_dim=128)  # fmt: skip


class GlmAsrConfig(ImageTextConfig):
    """transformers' GlmAsrConfig (GLM-ASR, audio-text): its language model's, a Llama with GLM-ASR's defaults
    where text_config leaves them out; the head tied by default."""

    model_type: ClassVar[str] = "glmasr"
    text_class: ClassVar[type] = LlamaConfig
    tie_default: ClassVar[bool | None] = True
    defaults: ClassVar[dict[str, Any]] = dict(vocab_size=59264, hidden_size=2048, intermediate_size=6144,
                                              num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4,
                                              max_position_embeddings=8192, rms_norm_eps=1e-5, use_cache=True,
                                              eos_token_id=[59246, 59253, 59255])  # fmt: skip


class LlamaForCausalLM(CausalLM):
    """transformers' LlamaForCausalLM (and MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)."""

    config_class = LlamaConfig
    gguf = GGUFLayout("llama", permute_qk=True)
    # remote-code models llama.cpp runs with Llama's arithmetic under their own names, read as Llama (written as
    # "llama"): EXAONE 3.0 / 3.5 (NeoX RoPE, so q/k rows as the checkpoint's; Llama 3's RoPE scaling as rope_freqs;
    # today's converter writes the epsilon as layer_norm_epsilon, which llama.cpp's exaone refuses: read all the
    # same) and InternLM2 / 2.5 (wqkv split into q/k/v, q/k rows permuted; dynamic NTK RoPE written as none)
    gguf_more = (
        GGUFLayout("exaone", config=(("attention.layer_norm_epsilon", "rms_norm_eps"),)),
        GGUFLayout("internlm2", permute_qk=True),
    )
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, LlamaModel(config))
