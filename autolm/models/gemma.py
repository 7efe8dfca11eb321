"""Gemma (1): Gemma 2B / 7B, Gemma 1.1, CodeGemma. Llama's pre-norm layer with Gemma's arithmetic:

- RMSNorm times (1 + w), in fp32 (Gemma 2's norm, two per layer as in Llama);
- GeLU (tanh) gate, read from `hidden_act` as transformers 5 reads it (its legacy "gelu" means the tanh form);
- token embeddings times sqrt(hidden_size) in the embeddings' dtype (Gemma 2's embedding, so `inputs_embeds` a
  user passes are taken as they are);
- full causal attention on every layer, scaled by head_dim ** -0.5 (head_dim 256, not hidden / heads), no
  soft-capping; tied LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM
from .gemma2 import Gemma2Model
from .image_text import ImageTextConfig


@dataclass(repr=False)
class GemmaConfig(PretrainedConfig):
    """transformers' GemmaConfig (its field names and defaults: gemma-7b's sizes)."""

    model_type: ClassVar[str] = "gemma"
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")

    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_bidirectional_attention: bool | None = None

    def __post_init__(self) -> None:
        # "gelu" is the official releases' legacy value, meant as the tanh form (transformers converts it too)
        if self.hidden_act == "gelu":
            self.hidden_act = "gelu_pytorch_tanh"
        super().__post_init__()

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' Gemma builds a plain causal mask whatever the config says

    def validate(self) -> None:
        super().validate()
        if self.use_bidirectional_attention:
            raise ConfigError(
                f"{self.source}: use_bidirectional_attention is true (an encoder); autolm runs causal language "
                "models only"
            )


class GemmaDecoderLayer(nn.Module):
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
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(Gemma2Model):
    """Gemma 2's body (scaled embeddings, (1 + w) final norm) over Gemma's layers."""

    def __init__(self, config: Any):
        super().__init__(config, GemmaDecoderLayer)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's head size where the file gives no attention.key_length: hidden / heads (GemmaConfig's default
    is 256)."""
    hidden, heads = d.get("hidden_size"), d.get("num_attention_heads")
    if _is_int(hidden) and _is_int(heads) and heads > 0:
        d.setdefault("head_dim", hidden // heads)


class PaliGemmaConfig(ImageTextConfig):
    """transformers' PaliGemmaConfig (PaliGemma, PaliGemma 2): its language model's, a Gemma unless text_config names
    another family (PaliGemma 2's Gemma 2); the head tied by default; positions (1-based in transformers) rotate as
    autolm's. Its attention, as transformers' PaliGemma runs it (see image_text's prefix, not saved with the model):

    - token_type_ids, in forward and generate: the tokens of type 0 form a prefix attended both ways (in the
      prompt's forward; later tokens attend causally), `prefix_token_type`;
    - without them: causal, except a Gemma whose use_bidirectional_attention is unset or true (PaliGemma 1's
      files; transformers sets it true where unset): an unpadded batch's prompt then attends both ways (SDPA's
      non-causal attention where transformers leaves its mask out), a padded one causally, `bidirectional_prompt`.
      A Gemma 2 (PaliGemma 2) runs transformers' eager attention, whose mask is always causal.

    The text model's config says use_bidirectional_attention false: saved, it is the causal text model."""

    model_type: ClassVar[str] = "paligemma"
    text_class: ClassVar[type] = GemmaConfig
    tie_default: ClassVar[bool | None] = True

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        text = d.get("text_config") if isinstance(d, dict) else None
        both = isinstance(text, dict) and text.get("use_bidirectional_attention") is not False
        config = super().from_dict(d, source, **overrides)
        config.prefix_token_type = 0
        config.bidirectional_prompt = both and config.model_type == "gemma"
        return config

    @classmethod
    def adapt(cls, text: dict[str, Any]) -> None:
        text["use_bidirectional_attention"] = False  # the text model's own (GemmaConfig refuses an encoder)


class GemmaForCausalLM(CausalLM):
    """transformers' GemmaForCausalLM."""

    config_class = GemmaConfig
    # llama.cpp's converter (GemmaModel): Llama's tensor names (ffn_norm is post_attention_layernorm), no q/k
    # permutation (NeoX RoPE), 1 added to every norm weight, the head size as attention.key_length, no lm_head
    gguf = GGUFLayout(
        "gemma", config=(("attention.key_length", "head_dim"),), norm_shift=1.0, derive=_gguf_derive
    )
    _no_split_modules: ClassVar[list[str]] = ["GemmaDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, GemmaModel(config))
