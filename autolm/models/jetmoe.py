"""JetMoE (jetmoe/jetmoe-8b, -8b-chat, -8b-sft): pre-norm layers of a mixture of attention heads (MoA) and a
sparse mixture of experts (MoE), each routed per token by its own top-k gate (the top k of the router's logits in
fp32, the softmax over those k, cast to the input's dtype: JetMoeTopKGating).

- MoA (`self_attention`): keys and values from one `kv_proj` (rows [k | v], `num_key_value_heads` heads of
  `kv_channels`) shared by every expert; each of the token's k experts projects its own queries (`experts.
  input_linear`, (E, heads * kv_channels, h)), so the token has k * num_key_value_heads query heads, head
  (slot s, KV head j) reading KV head j (transformers repeats the KV heads per slot, it does not interleave them);
  each slot's attention output goes through its expert's `experts.output_linear` (E, h, heads * kv_channels),
  weighted by the gate, summed, plus `experts.bias`. RoPE over whole heads, scaled by kv_channels ** -0.5.
- MoE (`mlp`): GraniteMoe's experts (`input_linear` (E, 2I, h): [gate; up] rows; `output_linear` (E, h, I)),
  a SiLU-gated MLP each, weighted and summed, plus `mlp.bias`.
- The layer norms are JetMoeRMSNorm(hidden_size): epsilon 1e-6 whatever `rms_norm_eps` says (the final norm's).

config.json names the activation `activation_function` and the head size `kv_channels`; num_attention_heads is
derived (num_key_value_heads * num_experts_per_tok). The model holds the MoE's experts stacked as every autolm
mixture (`mlp.experts.gate_up_proj` / `down_proj`, which int8 / int4 quantize), read from and written as the
checkpoint's `mlp.input_linear.weight` / `mlp.output_linear.weight`; every other name is transformers' (the
routers' `router.layer`, a Linear as in transformers). The MoA's experts keep transformers' names and run through
the same grouped expert arithmetic (kernels.mixture, one call per slot), eager and in the compiled step.

llama.cpp has no JetMoE architecture: no GGUF. No tensor-parallel plan (transformers declares none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..kernels.experts import expert_linear
from ..nn import (
    ACTIVATIONS,
    Attention,
    CheckpointRules,
    Experts,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
    apply_rotary,
)
from .base import CausalLM, DecoderModel
from .mixtral import validate_experts

# JetMoeRMSNorm's default: the decoder layers' norms are built without the config's epsilon
LAYER_NORM_EPS = 1e-6


@dataclass(repr=False)
class JetMoeConfig(PretrainedConfig):
    """transformers' JetMoeConfig: its fields and defaults (JetMoE-8B's sizes); `hidden_act` is config.json's
    activation_function, `head_dim` its kv_channels; num_attention_heads is always num_key_value_heads *
    num_experts_per_tok, as transformers sets it."""

    model_type: ClassVar[str] = "jetmoe"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_act": "activation_function", "head_dim": "kv_channels"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "output_router_logits")
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)

    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int | None = 16
    head_dim: int | None = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = True
    initializer_range: float = 0.01

    def __post_init__(self) -> None:
        if _is_int(self.num_key_value_heads) and _is_int(self.num_experts_per_tok):
            self.num_attention_heads = self.num_key_value_heads * self.num_experts_per_tok
        super().__post_init__()

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' JetMoE builds a plain causal mask

    def validate(self) -> None:
        src = self.source
        if self.hidden_act not in self.activations:
            raise ConfigError(f"{src}: activation_function {self.hidden_act!r} is not supported (expected one of "
                              f"{self.activations})")  # fmt: skip
        for name in ("num_key_value_heads", "num_experts_per_tok"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {getattr(self, name)!r}")
        super().validate()
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        for name in ("aux_loss_coef", "initializer_range"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"{src}: {name} must be a number, found {getattr(self, name)!r}")


class JetMoeRouter(nn.Module):
    """transformers' JetMoeTopKGating: `layer` (a Linear, as transformers', which peft's "all-linear" adapts and
    quantization quantizes as bitsandbytes does) gives the logits; the top k of them in fp32 and the softmax over
    those k, in the input's dtype. Called as nn.Router: x (N, h) -> (expert ids, weights) (N, k)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.layer = Linear(hidden, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, ids = torch.topk(self.layer(x).float(), self.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1).to(x.dtype)


class ParallelExperts(nn.Module):
    """transformers' JetMoeParallelExperts: one linear map per expert, `weight` (E, out, in); called with rows
    and their expert (an int, or one id per row), as kernels.mixture calls an expert."""

    def __init__(self, num_experts: int, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, output_size, input_size))

    def forward(self, x: torch.Tensor, e: int | torch.Tensor) -> torch.Tensor:
        return expert_linear(x, self.weight, e)


class JetMoeMoA(nn.Module):
    """The mixture of attention heads' experts: `router`, `input_linear` (queries), `output_linear` and `bias`."""

    def __init__(self, config: JetMoeConfig):
        super().__init__()
        h, E, width = (
            config.hidden_size,
            config.num_local_experts,
            config.head_dim * config.num_key_value_heads,
        )
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.router = JetMoeRouter(h, E, self.top_k)
        self.input_linear = ParallelExperts(E, h, width)
        self.output_linear = ParallelExperts(E, width, h)
        self.bias = nn.Parameter(torch.zeros(h))

    def map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, h) -> (each slot's queries from its expert (N, k, width), expert ids, gates (N, k))."""
        ids, gates = self.router(x)
        ones = torch.ones_like(gates[:, :1])
        slots = [kernels.mixture(x, ids[:, s : s + 1], ones, self.num_experts, self.input_linear)
                 for s in range(self.top_k)]  # fmt: skip
        return torch.stack(slots, 1), ids, gates

    def reduce(self, y: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Each slot's attention output y (N, k, width) through its expert's output_linear, weighted by its gate,
        summed over the slots, plus the bias -> (N, h)."""
        out = [kernels.mixture(y[:, s], ids[:, s : s + 1], gates[:, s : s + 1], self.num_experts, self.output_linear)
               for s in range(self.top_k)]  # fmt: skip
        return torch.stack(out).sum(0) + self.bias


class JetMoeAttention(Attention):
    """Mixture of attention heads with transformers' names (`experts`, `kv_proj`): num_key_value_heads KV heads
    (the cache's), k * num_key_value_heads query heads, ordered KV head by KV head (j, slot) for autolm's grouped
    attention."""

    def __init__(self, config: JetMoeConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.layer_idx, self.top_k = layer_idx, config.num_experts_per_tok
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.sliding_window, self.rope, self.softcap, self.qk_norm = None, "default", None, None
        self.rope_interleaved, self.chunk, self.alibi = False, None, None
        self.experts = JetMoeMoA(config)
        self.kv_proj = Linear(config.hidden_size, 2 * self.num_kv_heads * self.head_dim, bias=False)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, h = x.shape
        nkv, hd, K = self.num_kv_heads, self.head_dim, self.top_k
        q, ids, gates = self.experts.map(x.reshape(-1, h))
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        q = q.view(B, T, K, nkv, hd).transpose(2, 3).reshape(B, T, nkv * K, hd).transpose(1, 2)
        k, v = (t.reshape(B, T, nkv, hd).transpose(1, 2) for t in (k, v))
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling)  # (B, T, nkv * K, hd) as (j, slot)
        kept = getattr(ctx, "attentions", None)
        if kept:  # output_attentions: the probabilities in transformers' head order (slot, j)
            kept[-1] = kept[-1].unflatten(1, (nkv, K)).transpose(1, 2).flatten(1, 2)
        y = y.reshape(B * T, nkv, K, hd).transpose(1, 2).reshape(B * T, K, nkv * hd)
        return self.experts.reduce(y, ids, gates).view(B, T, h)


class JetMoeMoE(SparseMoeBlock):
    """transformers' JetMoeMoE: the top-k router, autolm's stacked experts (GraniteMoe's layout), plus `bias`."""

    def __init__(self, config: JetMoeConfig):
        h, E = config.hidden_size, config.num_local_experts
        router = JetMoeRouter(h, E, config.num_experts_per_tok)
        super().__init__(
            router, Experts(E, h, config.intermediate_size, config.hidden_act), router_name="router"
        )
        self.bias = nn.Parameter(torch.zeros(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


class JetMoeDecoderLayer(nn.Module):
    def __init__(self, config: JetMoeConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = RMSNorm(h, LAYER_NORM_EPS)
        self.self_attention = JetMoeAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, LAYER_NORM_EPS)
        self.mlp = JetMoeMoE(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class JetMoeModel(DecoderModel):
    def __init__(self, config: JetMoeConfig):
        super().__init__(config, JetMoeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


def _renamed(checkpoint: str, model: str) -> Rename:
    """A tensor under the checkpoint's name and the model's, both ways (whole name endings only)."""
    return Rename(re.escape(checkpoint) + "$", model, re.escape(model) + "$", checkpoint)


class JetMoeForCausalLM(CausalLM):
    """transformers' JetMoeForCausalLM."""

    config_class = JetMoeConfig
    checkpoint_rules = CheckpointRules(
        [
            _renamed(".mlp.input_linear.weight", ".mlp.experts.gate_up_proj"),
            _renamed(".mlp.output_linear.weight", ".mlp.experts.down_proj"),
        ]
    )
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers
    _no_split_modules: ClassVar[list[str]] = ["JetMoeDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, JetMoeModel(config))
