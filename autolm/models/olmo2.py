"""OLMo 2 (AI2): no norm before the sublayers but one on each sublayer's output before its residual add
(`post_attention_layernorm`, `post_feedforward_layernorm`), RMSNorm on queries and keys over the whole
projection (all heads at once), and OLMo's RMSNorm arithmetic: the weight multiplies in fp32 before the cast
back. Full causal attention on every layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn import Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import LLAMA_TP, CausalLM, DecoderModel
from .llama import LlamaConfig


@dataclass(repr=False)
class Olmo2Config(LlamaConfig):
    """transformers' Olmo2Config (OLMo's fields and defaults, rms_norm_eps 1e-5)."""

    model_type: ClassVar[str] = "olmo2"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "head_dim",
        "max_window_layers",
        "mlp_bias",
        "sliding_window",
        "use_sliding_window",
    )  # not in transformers' config: written when set

    vocab_size: int = 50304
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 50279

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' OLMo 2 builds a plain causal mask whatever the config says

    def layer_rope(self, i: int) -> str:
        return "default"  # one RoPE table (OLMo 3's layer types read their own)


def _norm(config: Any):
    return lambda dim: RMSNorm(dim, config.rms_norm_eps, weight_in_fp32=True)


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, norm = config.hidden_size, _norm(config)
        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            window=config.layer_window(layer_idx),
            rope=config.layer_rope(layer_idx),
            qk_norm="full",
            norm=norm,
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.post_attention_layernorm = norm(h)
        self.post_feedforward_layernorm = norm(h)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(x, ctx))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, Olmo2DecoderLayer, _norm(config)(config.hidden_size))


# what llama.cpp's olmo2 and olmoe graphs cannot run: biases (they load q/k/v biases but no attn_output.bias, so a
# converted model with attention_bias does not load), a tied head (output.weight is required)
GGUF_FIXED = (("attention_bias", False), ("tie_word_embeddings", False))


def gguf_write_text_model(m: dict[str, Any], c: Any) -> None:
    """TextModel.set_gguf_parameters' keys, as llama.cpp's Olmo2Model and OlmoeModel converters write them: no
    vocabulary size (the token list gives it), no rotary dimensions and no head size (config.json has no head_dim;
    llama.cpp's graphs take hidden_size / heads: a model with another head_dim reads back with that, and is
    refused)."""
    for key in ("vocab_size", "rope.dimension_count", "attention.key_length", "attention.value_length"):
        m.pop(key, None)


class Olmo2ForCausalLM(CausalLM):
    config_class = Olmo2Config
    # llama.cpp's Olmo2Model converter: TextModel's keys, tensors by gguf-py's map (no q/k permutation: NeoX RoPE),
    # the post-sublayer norms as post_attention_norm / post_ffw_norm
    gguf = GGUFLayout(
        "olmo2",
        layer=(
            ("post_attention_norm", "post_attention_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ),
        fixed=GGUF_FIXED,
        write_config=gguf_write_text_model,
    )
    # As transformers: the q/k norms span all heads, so q/k/v outputs are gathered whole on every rank (each
    # rank runs every head) and o_proj splits its input again; the MLP is split as in Llama.
    tp_patterns: ClassVar[dict[str, str]] = {
        **{f"layers.*.self_attn.{p}_proj": "colwise_gather" for p in "qkv"},
        "layers.*.self_attn.o_proj": "rowwise_split",
        **{k: v for k, v in LLAMA_TP.items() if ".mlp." in k},
    }
    _no_split_modules: ClassVar[list[str]] = ["Olmo2DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Olmo2Model(config))

    def shard_heads(self, world: int) -> None:
        """Every rank runs all heads (q/k/v are gathered for the whole-projection norms): nothing to shard."""
