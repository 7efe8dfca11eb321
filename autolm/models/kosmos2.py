"""Kosmos-2 (microsoft/kosmos-2-patch14-224): an image-text model whose language model (`kosmos_2_text_model`,
transformers' Kosmos2TextForCausalLM) is a fairseq / Magneto decoder. Token embeddings times sqrt(embed_dim)
(`scale_embedding`; given inputs_embeds are scaled too, as transformers scales them), plus XGLM's fixed sinusoidal
position embeddings read from row pad_token_id + 1 on (transformers' RoBERTa-style position ids; the row at
pad_token_id zero), pre-norm layers with two sub-LayerNorms: `self_attn.inner_attn_ln` over the heads' output
before out_proj, and `ffn.ffn_layernorm` over the activated fc1 output before fc2; a final `layer_norm`, a head
tied to the embeddings.

Positions: transformers numbers each token by the tokens before it that are not pad_token_id (a prompt's position
ids come from its input_ids; its table rows are those numbers plus pad_token_id). autolm numbers them by the
attention mask as every family does: the same rows for a left-padded batch whose padding is pad_token_id, and for
every unpadded prompt. Two places where transformers differs and autolm does not follow: a real token equal to
pad_token_id (transformers gives it the zero row and does not count it), and the decode steps of a left-padded
batch in generate (transformers counts the cached padding slots there, shifting those rows' positions). Explicit
position_ids are positions from 0 (transformers reads its own as table rows).

The image-text model (`kosmos-2`, Kosmos2ForConditionalGeneration) puts its image's embeddings at the places
image_embeds_position_mask marks; autolm runs the language model on text alone: the vision tower and the
image-to-text projection are skipped on load, image inputs (pixel_values, image_embeds, image_embeds_position_mask)
refused by name. Saved, the model is the text model (text_model.model.* -> model.*). llama.cpp has no Kosmos-2: no
GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, Ignored, Linear, Rename
from .base import CausalLM
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .opt import OPTAttention
from .xglm import XGLMConfig, XGLMModel, accept_json_names, check_fractions, sinusoidal_positions


@dataclass(repr=False)
class Kosmos2TextConfig(XGLMConfig):
    """transformers' Kosmos2TextConfig: config.json's names embed_dim, layers, attention_heads, ffn_dim,
    activation_function and layer_norm_eps are hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, hidden_act and rms_norm_eps (attributes under both names)."""

    model_type: ClassVar[str] = "kosmos_2_text_model"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "layers",
        "num_attention_heads": "attention_heads",
        "intermediate_size": "ffn_dim",
        "hidden_act": "activation_function",
        "rms_norm_eps": "layer_norm_eps",
    }
    inner_attn_norm: ClassVar[bool] = True  # self_attn.inner_attn_ln (Kosmos-2.5 has none)
    name: ClassVar[str] = "Kosmos-2"

    vocab_size: int = 65037
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-5
    decoder_start_token_id: int | None = None  # not a Kosmos-2 setting (not written)

    def validate(self) -> None:
        PretrainedConfig.validate(self)
        if self.hidden_size < 4:
            raise ConfigError(f"{self.source}: embed_dim must be at least 4 for {self.name}'s sinusoidal "
                              f"positions, found {self.hidden_size!r}")  # fmt: skip
        if self.add_cross_attention:
            raise ConfigError(f"{self.source}: add_cross_attention: {self.name} with encoder attention is not a "
                              "causal LM autolm runs")  # fmt: skip
        check_fractions(self, ("dropout", "attention_dropout", "activation_dropout", "layerdrop"))
        p = self.pad_token_id
        if not (_is_int(p) and p >= 0):
            raise ConfigError(f"{self.source}: pad_token_id must be a non-negative integer ({self.name}'s "
                              f"position rows start at pad_token_id + 1), found {p!r}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("decoder_start_token_id") is None:
            out.pop("decoder_start_token_id", None)
        return out


accept_json_names(Kosmos2TextConfig)


class Kosmos2Config(ImageTextConfig):
    """transformers' Kosmos2Config (Kosmos-2): its language model's settings under text_config, the head tied
    where either the outer tie_word_embeddings or text_config's is (each true by default), as transformers ties
    the wrapper's head and its language model's."""

    model_type: ClassVar[str] = "kosmos-2"
    text_class: ClassVar[type] = Kosmos2TextConfig

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool:
        return bool(outer.get("tie_word_embeddings", True) or text.get("tie_word_embeddings", True))


class KosmosTextAttention(OPTAttention):
    """Multi-head attention with biases; the heads' output normed by `inner_attn_ln` before out_proj."""

    def __init__(self, config: Kosmos2TextConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h = config.hidden_size
        self.inner_attn_ln = nn.LayerNorm(h, eps=config.rms_norm_eps) if config.inner_attn_norm else None

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.inner_attn_ln is None else self.inner_attn_ln(y)


class Kosmos2TextFFN(nn.Module):
    """fc1 -> activation -> ffn_layernorm -> fc2."""

    def __init__(self, config: Kosmos2TextConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(h, f, bias=True)
        self.fc2 = Linear(f, h, bias=True)
        self.ffn_layernorm = nn.LayerNorm(f, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(self.act(self.fc1(x))))


class Kosmos2TextBlock(nn.Module):
    """Pre-norm: self_attn_layer_norm -> self_attn, final_layer_norm -> ffn, each a residual branch."""

    def __init__(self, config: Kosmos2TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = KosmosTextAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.ffn = Kosmos2TextFFN(config)
        self.final_layer_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), ctx)
        return x + self.ffn(self.final_layer_norm(x))


class Kosmos2TextTransformer(XGLMModel):
    """embed_tokens, embed_positions (a fixed table: no parameters), layers, layer_norm."""

    def __init__(self, config: Kosmos2TextConfig):
        super().__init__(config, Kosmos2TextBlock)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # scaled in scale_inputs, given inputs_embeds too

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors times embed_scale, plus the sinusoids of table row position + pad_token_id + 1."""
        pad = self.config.pad_token_id
        pos = sinusoidal_positions(position_ids + (pad - 1), x.shape[-1], pad)  # it reads 2 rows on
        return x * self.embed_scale + pos.to(x.dtype)


_TEXT_RULES = (
    Rename(r"^text_model\.model\.", "model.", r"(?!)", ""),
    Rename(r"^text_model\.lm_head\.", "lm_head.", r"(?!)", ""),
    Ignored(r"(vision_model|image_to_text_projection)\..+"),
)


class Kosmos2TextForCausalLM(CausalLM):
    """transformers' Kosmos2TextForCausalLM (Kosmos-2's language model): the head tied to embed_tokens unless the
    config unties it."""

    config_class = Kosmos2TextConfig
    checkpoint_rules = CheckpointRules([*_TEXT_RULES, *IMAGE_TEXT_RULES])
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["Kosmos2TextBlock"]

    def __init__(self, config: Kosmos2TextConfig):
        super().__init__(config, Kosmos2TextTransformer(config))
