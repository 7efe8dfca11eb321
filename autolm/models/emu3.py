"""Emu3's text model (BAAI's Emu3: model_type emu3_text_model, and the language model of the image-text checkpoints,
model_type emu3, BAAI/Emu3-Chat-hf and Emu3-Gen-hf).

Llama's architecture (pre-norm grouped-query attention with RoPE, a SiLU-gated MLP, RMSNorm; head_dim from config.json
where given), with Emu3's defaults: RoPE base 1e6, a 184622-token vocabulary (text and image tokens), 9216
positions. transformers' Emu3 adds a dropout of `attention_dropout` (0.1 by default) on the attention's and the MLP's
outputs in training; like every autolm family's dropouts it is kept in the config and not applied. Its config has no
attention_bias / mlp_bias fields but reads them where config.json sets them, as Llama does; a sliding window or
layer_types in config.json changes nothing (transformers' Emu3 builds a plain causal mask).

The image-text checkpoints (model_type emu3) keep the language model as text_model.model.* and text_model.lm_head.*
(transformers 5 in memory: model.text_model.*, lm_head.*) beside the VQ-VAE image tokenizer (vqmodel.*, skipped).
transformers' AutoModelForCausalLM builds an Emu3ForCausalLM from such a config.json's text_config but finds none of
those tensors under its names (it leaves them all at their random initialization); autolm loads them.

llama.cpp has no Emu3 architecture (its converter writes none): no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..nn import CheckpointRules, Ignored, Rename
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig, LlamaForCausalLM

EMU3_RULES = CheckpointRules(
    [
        *IMAGE_TEXT_RULES,
        Rename(r"^text_model\.model\.", "model.", r"(?!)", ""),
        Rename(r"^text_model\.lm_head\.", "lm_head.", r"(?!)", ""),
        Ignored(r"(model\.)?vqmodel\..+"),
    ]
)


@dataclass(repr=False)
class Emu3TextConfig(LlamaConfig):
    """transformers' Emu3TextConfig: its fields and defaults (Emu3's 8B language model)."""

    model_type: ClassVar[str] = "emu3_text_model"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "mlp_bias",
        "head_dim",
        "max_window_layers",
        "sliding_window",
        "use_sliding_window",
    )
    default_theta: ClassVar[float] = 1_000_000.0

    vocab_size: int = 184622
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 9216
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.1
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151849
    eos_token_id: int | list[int] | None = 151850
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1_000_000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Emu3 builds a plain causal mask whatever the config says


class Emu3Config(ImageTextConfig):
    """transformers' Emu3Config (model_type emu3: the image-text checkpoints): its language model, text_config read
    as an Emu3TextConfig; loading skips the VQ-VAE's tensors. Saved, it is the text model (emu3_text_model)."""

    model_type: ClassVar[str] = "emu3"
    text_class: ClassVar[type] = Emu3TextConfig


class Emu3ForCausalLM(LlamaForCausalLM):
    """transformers' Emu3ForCausalLM: Llama's model with Emu3's config and checkpoint names."""

    config_class = Emu3TextConfig
    checkpoint_rules: ClassVar[CheckpointRules] = EMU3_RULES
    gguf = None
    gguf_more = ()
    _no_split_modules: ClassVar[list[str]] = ["Emu3DecoderLayer"]
