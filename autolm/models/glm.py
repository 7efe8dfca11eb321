"""GLM (GLM-4-9B-Chat-HF, GLM-4-9B-HF, GLM-Edge): a Llama-like pre-norm layer (two RMSNorms, no post norms: GLM-4-0414's
glm4 adds those) with q/k/v biases (`attention_bias`, none on o_proj), gate and up packed into one `gate_up_proj`
(rows [gate | up], as Phi-3), an untied head, and partial RoPE (`partial_rotary_factor`, 0.5 by default) over
interleaved pairs: the first head_dim * factor dimensions of each head rotate as (x0, x1), (x2, x3), ..., the rest
pass through. The config is GLM-4-0414's field for field (the same defaults, the same v4 spelling with the factor
at the top level, as glm-4-9b-chat-hf ships it).

GGUF: llama.cpp's converter writes GlmForCausalLM as "chatglm" (its ChatGLMModel class, shared with the older
remote-code ChatGLM layout): q/k/v separate and not permuted (llama.cpp's chatglm graph rotates interleaved
pairs, as the checkpoint does), gate_up_proj whole as ffn_up (split [gate | up] by the graph's SwiGLU), no head
size (llama.cpp takes hidden / heads: another head_dim is refused on GGUF out, naming it) and the rotary
dimensions as int(hidden / heads * factor); no vocabulary size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..nn import Attention, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel
from .glm4 import Glm4Config
from .glm4 import gguf_config as _gguf_config
from .phi3 import Phi3MLP


@dataclass(repr=False)
class GlmConfig(Glm4Config):
    """transformers' GlmConfig: GLM-4-0414's Glm4Config under another model type (head_dim 128 whatever the hidden
    size, 2 KV heads, partial_rotary_factor 0.5, three EOS ids, rms_norm_eps 1.5625e-7, biases on q/k/v)."""

    model_type: ClassVar[str] = "glm"


class GlmDecoderLayer(nn.Module):
    """x + attn(input_norm(x)), then + mlp(post_attention_norm(x))."""

    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=config.attention_bias, o_bias=False,
                                   rope_interleaved=True)  # fmt: skip
        self.mlp = Phi3MLP(h, config.intermediate_size, config.hidden_act)  # gate_up_proj: rows [gate | up]
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class GlmModel(DecoderModel):
    def __init__(self, config: GlmConfig):
        super().__init__(config, GlmDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def gguf_write_config(m: dict[str, Any], c: GlmConfig) -> None:
    """What ChatGLMModel.set_gguf_parameters writes besides the sizes, head counts, RMS epsilon and RoPE base: no
    head size (llama.cpp's chatglm takes hidden / heads), the rotary dimensions of that head size, no vocabulary
    size. (The converter reads no context length, epsilon nor RoPE base off a GlmForCausalLM config.json: it
    writes the hidden size, 1e-5 and 10000; these are written as the model has them, which llama.cpp honours.)"""
    for key in ("vocab_size", "attention.key_length", "attention.value_length"):
        m.pop(key, None)
    head = c.hidden_size // c.num_attention_heads
    m["rope.dimension_count"] = int(head * c.rope_parameters["partial_rotary_factor"])


class GlmForCausalLM(CausalLM):
    config_class = GlmConfig
    # llama.cpp's chatglm: tensors renamed one to one by gguf-py's map (gate_up_proj whole as ffn_up); the head size
    # hidden / heads, the rotary share from rope.dimension_count (glm4's derive, no key_length); biases and the tied
    # head read off the tensors present
    gguf = GGUFLayout(
        "chatglm",
        layer=(("ffn_up", "mlp.gate_up_proj"),),
        fixed=(("attention_bias", False),),
        present=(("blk.0.attn_q.bias", "attention_bias"),),
        derive=_gguf_config,
        write_config=gguf_write_config,
    )
    # transformers' base_model_tp_plan for GLM: heads split as in Llama; the packed gate_up output is gathered whole
    # on every rank before the chunk into gate and up, and down_proj splits its input again
    tp_patterns: ClassVar[dict[str, str]] = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_up_proj": "colwise_gather",
        "layers.*.mlp.down_proj": "rowwise_split",
    }
    _no_split_modules: ClassVar[list[str]] = ["GlmDecoderLayer"]

    def __init__(self, config: GlmConfig):
        super().__init__(config, GlmModel(config))
