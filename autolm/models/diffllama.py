"""DiffLlama (kajuma/DiffLlama-*): Llama's pre-norm layer whose attention is the Differential Transformer's
(arXiv 2410.05258), as transformers computes it:

- q, k, v and RoPE as Llama's (grouped KV heads, `attention_bias` on q/k/v/o); the values split by KV head into
  two halves V1 (heads 0 .. n_kv/2 - 1) and V2 (the rest), each repeated to n_kv heads, and every query head
  attends over both: head i gives [P_i V1 | P_i V2] (two head_dim-wide halves), P_i its softmax map;
- the heads' first half minus lambda times the second (query head i with head i + num_heads / 2), lambda =
  exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, lambda_init = 0.8 - 0.6 exp(-0.3 layer);
- a weightless RMSNorm over each of the num_heads / 2 results (2 head_dim wide: the paper's GroupNorm), times
  (1 - lambda_init), then o_proj.

transformers' DiffLlamaForCausalLM derives from Gemma's CausalLM class, which is Llama's (an LM head over the final
norm, nothing scaled or capped): the body is Llama's (embeddings unscaled, RMSNorms with the weight after the cast).

The attention is one call of autolm's attention over a cache of n_kv / 2 heads twice head_dim wide, head j
holding [K_j | K_(j + n_kv/2)] and [V_j | V_(j + n_kv/2)] (the same memory as n_kv heads): a query head reading
K_j is padded to [q | 0], one reading K_(j + n_kv/2) to [0 | q], so its scores are its own and its output is
exactly [P_i V1 | P_i V2]. The forward, the one-token step and the compiled step all run this one definition.

llama.cpp has no DiffLlama architecture: no GGUF. No tensor-parallel plan (transformers declares none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_number
from ..errors import ConfigError
from ..nn import Attention, GatedMLP, RMSNorm, apply_rotary
from .base import CausalLM, DecoderModel
from .llama import LlamaConfig


@dataclass(repr=False)
class DiffLlamaConfig(LlamaConfig):
    """transformers' DiffLlamaConfig: Llama's fields without mlp_bias (the MLP never has biases, as in
    transformers), with lambda_std_dev (the initialisation's spread of the lambda vectors) and transformers'
    defaults."""

    model_type: ClassVar[str] = "diffllama"
    absent_keys: ClassVar[tuple[str, ...]] = (*LlamaConfig.absent_keys, "mlp_bias")

    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    rms_norm_eps: float = 1e-5
    lambda_std_dev: float | None = 0.1

    def layer_window(self, i: int) -> int | None:
        return None  # transformers' DiffLlama builds a plain causal mask

    def validate(self) -> None:
        super().validate()
        src = self.source
        if self.num_key_value_heads % 2 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{src}: num_key_value_heads must be even and divide num_attention_heads ({self.num_attention_heads})"
                f": DiffLlama splits the values into two halves by KV head, found {self.num_key_value_heads!r}"
            )
        if not _is_number(self.attention_dropout) or self.attention_dropout != 0:
            raise ConfigError(f"{src}: attention_dropout must be 0 (DiffLlama defines no dropout of its two maps), "
                              f"found {self.attention_dropout!r}")  # fmt: skip
        if self.lambda_std_dev is not None and not _is_number(self.lambda_std_dev):
            raise ConfigError(f"{src}: lambda_std_dev must be a number, found {self.lambda_std_dev!r}")


def lambda_init(layer_idx: int) -> float:
    """The Differential Transformer's lambda_init for a layer: 0.8 - 0.6 exp(-0.3 layer_idx)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffLlamaAttention(Attention):
    """Differential attention with transformers' names: Llama's q/k/v/o_proj, lambda_q1, lambda_k1, lambda_q2,
    lambda_k2 (head_dim each) and a weightless `groupnorm`. `num_kv_heads` and `head_dim` are the cache's: n_kv / 2
    heads of 2 head_dim (see the module docstring); `dim` is the projections' head_dim."""

    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        c, hd = config, config.head_dim
        super().__init__(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, hd, layer_idx,
                         bias=c.attention_bias)  # fmt: skip
        self.dim, self.num_kv_heads, self.head_dim = hd, c.num_key_value_heads // 2, 2 * hd
        self.lambda_init = lambda_init(layer_idx)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(hd)))
        self.groupnorm = nn.RMSNorm(2 * hd, eps=c.rms_norm_eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hd, half = self.num_heads, self.dim, self.num_kv_heads
        q, k, v = self.project(x)
        q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # the cache's heads [K_j | K_(j + half)], [V_j | V_(j + half)]; query heads grouped under them (j, side, r)
        k, v = (torch.cat(t.unflatten(1, (2, half)).unbind(1), dim=-1) for t in (k, v))
        q1, q2 = q.unflatten(1, (2, half, -1)).unbind(1)  # (B, half, group, T, hd) each
        q = torch.stack((F.pad(q1, (0, hd)), F.pad(q2, (hd, 0))), dim=2).flatten(1, 3)
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling)  # (B, T, nh, 2 hd) as (half, side, group)
        self._heads_in_order(ctx, half)
        first, second = y.unflatten(2, (half, 2, -1)).unbind(3)  # query heads i and i + nh / 2
        lq1, lk1, lq2, lk2 = self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2
        lambda_1 = torch.exp(torch.sum(lq1 * lk1, dim=-1, dtype=torch.float32)).to(y.dtype)
        lambda_2 = torch.exp(torch.sum(lq2 * lk2, dim=-1, dtype=torch.float32)).to(y.dtype)
        y = first - (lambda_1 - lambda_2 + self.lambda_init) * second
        y = (1 - self.lambda_init) * self.groupnorm(y.reshape(B, T, nh // 2, 2 * hd))
        return self.o_proj(y.reshape(B, T, nh * hd))

    @staticmethod
    def _heads_in_order(ctx, half: int) -> None:
        """The attention probabilities a forward collects (output_attentions), back in the query heads' order."""
        kept = getattr(ctx, "attentions", None)
        if kept:
            p = kept[-1]  # (B, nh, T, S) as (half, side, group)
            kept[-1] = p.unflatten(1, (half, 2, -1)).transpose(1, 2).flatten(1, 3)


class DiffLlamaDecoderLayer(nn.Module):
    def __init__(self, config: DiffLlamaConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = DiffLlamaAttention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DiffLlamaModel(DecoderModel):
    def __init__(self, config: DiffLlamaConfig):
        super().__init__(config, DiffLlamaDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class DiffLlamaForCausalLM(CausalLM):
    """transformers' DiffLlamaForCausalLM."""

    config_class = DiffLlamaConfig
    # none, as in transformers (the cache pairs KV heads across ranks)
    tp_patterns: ClassVar[dict[str, str]] = {}
    _no_split_modules: ClassVar[list[str]] = ["DiffLlamaDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, DiffLlamaModel(config))
