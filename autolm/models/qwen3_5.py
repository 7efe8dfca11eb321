"""Qwen 3.5's text model (model_type qwen3_5_text; qwen3_5: the image-text checkpoints' language model): Qwen3-Next's
hybrid layers (autolm.models.qwen3_next: gated attention with zero-centred q/k norms and partial RoPE, Gated
DeltaNet linear attention, zero-centred RMSNorms) with a dense gated MLP in every layer and the linear layers'
projections kept apart and unpermuted: in_proj_qkv gives [q; k; v] (all heads of each in turn, the conv's input as
is), in_proj_z the output gates, in_proj_b and in_proj_a one beta and one decay input per value head.

RoPE: transformers' Qwen 3.5 rotates by multimodal RoPE, `mrope_section` (in rope_parameters) giving the rotary
frequencies' shares of the temporal, height and width positions (interleaved). For text every token's three
positions are its text position, so each frequency turns by that position: plain partial RoPE, which is what
autolm computes (mrope_section and mrope_interleaved are kept as read).

The image-text checkpoints keep the language model under model.language_model.* (the vision tower, model.visual.*,
and the multi-token-prediction layers, mtp.*, are skipped); saved, the model is the text model transformers'
Qwen3_5ForCausalLM loads. GGUF: llama.cpp's "qwen35" (autolm.models.qwen3_next_gguf: Qwen3-Next's conversion,
the value heads tiled, the RoPE sections written).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn import CheckpointRules, GatedMLP, GGUFLayout, Linear
from ..nn.linear import packed
from . import qwen3_next_gguf
from .base import LLAMA_TP, CausalLM
from .image_text import ImageTextConfig
from .llama import LlamaConfig
from .qwen3_next import HybridConfig, HybridDecoderLayer, HybridModel, Qwen3NextGatedDeltaNet


@dataclass(repr=False)
class Qwen3_5TextConfig(HybridConfig, LlamaConfig):
    """transformers' Qwen3_5TextConfig (its fields and defaults)."""

    model_type: ClassVar[str] = "qwen3_5_text"
    absent_keys: ClassVar[tuple[str, ...]] = ("mlp_bias", "sliding_window", "use_sliding_window",
                                              "max_window_layers")  # fmt: skip
    vocab_size: int = 248320
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32

    def __post_init__(self) -> None:
        self.hybrid_post_init()
        super().__post_init__()

    qk_norm = property(lambda self: True)


class Qwen3_5Config(ImageTextConfig):
    """transformers' Qwen3_5Config (model_type qwen3_5: the image-text checkpoints). autolm runs their language model:
    the config is its text_config, read as a Qwen3_5TextConfig (autolm.models.image_text); the vision tower's
    tensors are skipped at load."""

    model_type: ClassVar[str] = "qwen3_5"
    text_class: ClassVar[type] = Qwen3_5TextConfig


class MiniCPMOcrConfig(Qwen3_5Config):
    """transformers' MiniCPMOcrConfig (MiniCPM-OCR): its language model's, a Qwen 3.5; the head tied by default."""

    model_type: ClassVar[str] = "minicpm_ocr"
    tie_default: ClassVar[bool | None] = True


class MiniCPMV4_6Config(Qwen3_5Config):
    """transformers' MiniCPMV4_6Config (MiniCPM-V 4.6): its language model's, a Qwen 3.5; untied by default."""

    model_type: ClassVar[str] = "minicpmv4_6"
    tie_default: ClassVar[bool | None] = False


class MiniCPMV4_7Config(MiniCPMV4_6Config):
    """transformers' MiniCPMV4_7Config (MiniCPM-V 4.7), read as MiniCPMV4_6Config."""

    model_type: ClassVar[str] = "minicpmv4_7"


class Qwen3_5GatedDeltaNet(Qwen3NextGatedDeltaNet):
    """Qwen3-Next's mixer with Qwen 3.5's four separate projections."""

    def make_projections(self, hidden: int) -> None:
        self.in_proj_qkv = Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = Linear(hidden, self.num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        qkv, z, b, a = packed(x, (self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a))
        return qkv, z.reshape(B, T, -1, self.head_v_dim), b, a


class Qwen3_5DecoderLayer(HybridDecoderLayer):
    """Gated attention or Gated DeltaNet, then a dense gated MLP."""

    mixer_cls: ClassVar[type[nn.Module]] = Qwen3_5GatedDeltaNet

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)


class Qwen3_5ForCausalLM(CausalLM):
    """transformers' Qwen3_5ForCausalLM (the text model; model_type qwen3_5_text, or qwen3_5's language model)."""

    config_class = Qwen3_5TextConfig
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP  # the linear-attention mixers run whole on every rank
    _no_split_modules: ClassVar[list[str]] = ["Qwen3_5DecoderLayer"]
    recurrent: ClassVar[bool] = True
    # llama.cpp reads no attention biases (nor key and value heads of other sizes: qwen3_next_gguf.write_config)
    gguf = GGUFLayout(
        "qwen35",
        config=qwen3_next_gguf.GGUF_LINEAR_KEYS,
        layer=qwen3_next_gguf.GGUF_LINEAR_35,
        fixed=(("attention_bias", False),),
        norm_shift=1.0,
        derive=qwen3_next_gguf.derive_35,
        write_config=qwen3_next_gguf.write_config_35,
        bare=("ssm_a",),
    )

    def __init__(self, config: Any):
        super().__init__(config, HybridModel(config, Qwen3_5DecoderLayer))
        # llama.cpp's linear-layer tensors: a rule that knows the value heads
        self.checkpoint_rules = CheckpointRules(
            [*type(self).checkpoint_rules.rules, qwen3_next_gguf.Qwen35GGUF(config)]
        )
