"""Cosmos3 Edge's language model (nvidia/Cosmos3-Edge; model_type cosmos3_edge_text, and cosmos3_edge: the
image-text checkpoints): Llama's pre-norm layer of grouped-query attention (optional q/k/v/o biases,
`attention_bias`) with Qwen3-VL's multimodal RoPE, and CLIP's two-layer MLP, fc2(act(fc1(x))) with ReLU-squared by
default and optional biases (`mlp_bias`), no gate. head_dim 128 whatever the hidden size, RoPE base 1e8, an untied
head. The RoPE is "default" with three sections (`mrope_section`, summing to head_dim / 2), kept in rope_parameters
as read; on text every token's three positions are its text position, so it is plain RoPE over halves.

The image-text config holds the language model's settings as text_config; its head is never tied (transformers'
image-text model ties no weights). The checkpoint's generator tensors (the Cosmos world model's action and time embeddings, its
MoE-generation branch), which transformers drops, are skipped. llama.cpp has no Cosmos3 Edge architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, Ignored, Linear, Rename, RMSNorm
from .base import CausalLM, DecoderModel
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .llama import LlamaConfig, LlamaDecoderLayer

_THETA = 100_000_000.0


@dataclass(repr=False)
class Cosmos3EdgeTextConfig(LlamaConfig):
    """transformers' Cosmos3EdgeTextConfig: LlamaConfig's fields with Cosmos3 Edge's defaults (see the module
    docstring)."""

    model_type: ClassVar[str] = "cosmos3_edge_text"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)  # the MLP's, any transformers names

    vocab_size: int = 131072
    hidden_size: int = 2048
    intermediate_size: int = 9216
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hidden_act: str = "relu2"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 11
    pretraining_tp: int | None = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": _THETA, "mrope_section": [24, 20, 20]}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        if d.get("rope_parameters") is None and d.get("rope_scaling") is None and "rope_theta" not in d:
            d = {
                **d,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": _THETA,
                    "mrope_section": [24, 20, 20],
                },
            }
        return super().read_rope({"rope_theta": _THETA, **d}, source)

    def validate(self) -> None:
        super().validate()
        src, rope = self.source, self.rope_parameters
        if rope.get("rope_type") != "default":
            raise ConfigError(
                f"{src}: Cosmos3 Edge needs rope_type 'default', found {rope.get('rope_type')!r}"
            )
        sections = rope.get("mrope_section")
        if (
            not isinstance(sections, list)
            or len(sections) != 3
            or not all(_is_int(s) and s >= 0 for s in sections)
            or sum(sections) != self.head_dim // 2
        ):
            raise ConfigError(
                f"{src}: rope_parameters.mrope_section must be three non-negative integers summing to head_dim / 2 "
                f"({self.head_dim // 2}), found {sections!r}"
            )


class Cosmos3EdgeConfig(ImageTextConfig):
    """transformers' Cosmos3EdgeConfig (model_type cosmos3_edge): its language model's config, the head never tied
    (transformers' Cosmos3EdgeForConditionalGeneration ties no weights, whatever tie_word_embeddings says)."""

    model_type: ClassVar[str] = "cosmos3_edge"
    text_class: ClassVar[type] = Cosmos3EdgeTextConfig
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}


class Cosmos3EdgeTextMLP(nn.Module):
    """fc2(act(fc1(x))), CLIP's names, biases by `mlp_bias`."""

    def __init__(self, config: Cosmos3EdgeTextConfig):
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.activation_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class Cosmos3EdgeTextDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with CLIP's MLP."""

    def __init__(self, config: Cosmos3EdgeTextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = Cosmos3EdgeTextMLP(config)


class Cosmos3EdgeTextModel(DecoderModel):
    def __init__(self, config: Cosmos3EdgeTextConfig):
        super().__init__(
            config, Cosmos3EdgeTextDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps)
        )


# the generator's tensors transformers drops on load (its _COSMOS3_EDGE_DROPPED_GENERATOR_KEYS), after the language
# model's prefix is renamed to model.
_GENERATOR = Ignored(
    r"(model\.)?(action_modality_embed|action_proj_(in|out)\.(bias|fc)\.weight|time_embedder\..+|proj_(in|out)\..+"
    r"|norm_moe_gen\..+|layers\.\d+\.(input_layernorm_moe_gen|post_attention_layernorm_moe_gen|mlp_moe_gen)\..+"
    r"|layers\.\d+\.self_attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk]|k_norm_und_for_gen)\..+)"
)


class Cosmos3EdgeForCausalLM(CausalLM):
    """Cosmos3 Edge's language model (transformers has no text-only causal LM: its Cosmos3EdgeTextModel carries the
    head's hidden states)."""

    config_class = Cosmos3EdgeTextConfig
    # the files' own layout (transformers converts it on load and saves it back so): the language model's
    # tensors at the top level, diffusers' attention names (to_q ... to_out), the MLP as up_proj / down_proj; saved,
    # the text model's names
    checkpoint_rules = CheckpointRules(
        [
            *IMAGE_TEXT_RULES,
            Rename(r"^(embed_tokens|norm|layers)\.", r"model.\1.", r"(?!)", ""),
            Rename(r"\.self_attn\.to_([qkv])\.", r".self_attn.\1_proj.", r"(?!)", ""),
            Rename(r"\.self_attn\.to_out\.", ".self_attn.o_proj.", r"(?!)", ""),
            Rename(r"\.mlp\.up_proj\.", ".mlp.fc1.", r"(?!)", ""),
            Rename(r"\.mlp\.down_proj\.", ".mlp.fc2.", r"(?!)", ""),
            _GENERATOR,
        ]
    )
    # transformers' base_model_tp_plan for Cosmos3 Edge: Llama's attention, fc1 by columns and fc2 by rows
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["Cosmos3EdgeTextDecoderLayer"]

    def __init__(self, config: Cosmos3EdgeTextConfig):
        super().__init__(config, Cosmos3EdgeTextModel(config))
