"""Kosmos-2.5 (microsoft/kosmos-2.5, a document-reading image-text model): its language model
(`kosmos_2_5_text_model`, transformers' Kosmos2_5TextForCausalLM) is Kosmos-2's (autolm.models.kosmos2) without the
attention's inner LayerNorm and with segment embeddings: scaled embeddings, sinusoidal positions from row
pad_token_id + 1 on plus `segment_emb`'s text row (row 1 marks image embeddings, which autolm never has), pre-norm layers
whose MLP norms the activated fc1 output (`ffn.ffn_layernorm`) before fc2, a final `layer_norm`, a tied head.
Positions follow the attention mask as in Kosmos-2 (see there for where transformers' own numbering differs).

The image-text model (`kosmos-2.5`, Kosmos2_5ForConditionalGeneration) is read as its language model: the vision
tower and the image-to-text projection skipped, image inputs (flattened_patches, image_embeds,
image_embeds_position_mask) refused by name. llama.cpp has no Kosmos-2.5: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..nn import embedding
from .base import CausalLM
from .kosmos2 import (
    Kosmos2Config,
    Kosmos2TextConfig,
    Kosmos2TextForCausalLM,
    Kosmos2TextTransformer,
    accept_json_names,
)
from .xglm import sinusoidal_positions


@dataclass(repr=False)
class Kosmos2_5TextConfig(Kosmos2TextConfig):
    """transformers' Kosmos2_5TextConfig: Kosmos2TextConfig's names, Kosmos-2.5's defaults; it has no
    add_cross_attention (none written; true refused)."""

    model_type: ClassVar[str] = "kosmos_2_5_text_model"
    inner_attn_norm: ClassVar[bool] = False
    name: ClassVar[str] = "Kosmos-2.5"

    vocab_size: int = 108481
    max_position_embeddings: int = 4096
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    attention_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out.get("add_cross_attention"):
            out.pop("add_cross_attention", None)
        return out


accept_json_names(Kosmos2_5TextConfig)


class Kosmos2_5Config(Kosmos2Config):
    """transformers' Kosmos2_5Config (Kosmos-2.5): text_config read by Kosmos2_5TextConfig, the head tied as
    Kosmos-2's."""

    model_type: ClassVar[str] = "kosmos-2.5"
    text_class: ClassVar[type] = Kosmos2_5TextConfig


class Kosmos2_5TextTransformer(Kosmos2TextTransformer):
    """Kosmos-2's body with `segment_emb`: two rows, a text token's (0) and an image embedding's (1), added to
    each token's position embedding; on text every token adds row 0."""

    def __init__(self, config: Kosmos2_5TextConfig):
        super().__init__(config)
        self.segment_emb = embedding(2, config.hidden_size)
        order = ("embed_tokens", "segment_emb", "layers", "layer_norm")  # forward's order
        self._modules = {k: self._modules[k] for k in order}

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Input vectors times embed_scale, plus the sinusoids of their table rows and the text segment's row."""
        pad = self.config.pad_token_id
        pos = sinusoidal_positions(position_ids + (pad - 1), x.shape[-1], pad).to(x.dtype)
        return x * self.embed_scale + (pos + self.segment_emb.weight[0].to(x.dtype))


class Kosmos2_5TextForCausalLM(Kosmos2TextForCausalLM):
    """transformers' Kosmos2_5TextForCausalLM (Kosmos-2.5's language model)."""

    config_class = Kosmos2_5TextConfig

    def __init__(self, config: Kosmos2_5TextConfig):
        CausalLM.__init__(self, config, Kosmos2_5TextTransformer(config))
