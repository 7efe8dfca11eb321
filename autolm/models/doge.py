"""Doge (SmallDoge's Doge-20M ... Doge-320M, transformers' doge): pre-norm decoder layers whose residuals are
scaled by learned vectors, attention under a dynamic mask, and a gated MLP or a cross-domain mixture of experts.

- Attention: grouped-query attention with RoPE and per-head RMSNorm on queries and keys (q_norm, k_norm). The dynamic
  mask: every key slot s gets, per KV head, dt = exp(A * softplus(dt_proj(v_s))) from the values of all KV heads at
  s (the cached ones too); the scores of a query are biased by its keys' dt, and of the keys it may see (causal, not
  padding, within `sliding_window` where set) it keeps the `keep_window_size` with the largest dt, nothing else.
  As transformers' eager attention, a query that may see no key (a left-padding token) attends evenly to every
  slot (its additive mask is the float minimum throughout), and the masked scores are the minimum, not -inf.
- Residuals: x = input_residual * x + attn(norm(x)); x = post_attention_residual * x + mlp(norm(x)) (vectors of
  hidden_size), each branch through dropout of `hidden_dropout` while training.
- `is_moe`: transformers' DogeCDMoE: the gated MLP (shared) plus product-key experts: the router gives two sets of
  floor(sqrt(num_experts)) scores; expert i * num_keys + j scores x_i + y_j; the best `num_experts_per_tok` are
  weighted by the softmax of their scores, each expert e adding act(down_embed[e] . x) * weight * up_embed[e].
  transformers reads the two score sets by `router_gate(x).view(2, batch * length, num_keys)`, which splits the
  flattened (batch, length, 2 * num_keys) output in halves: in a forward of several tokens a token's two score sets
  come from other tokens of the batch (its own only for one token in one row: the one-token step of one sequence).
  The checkpoints were trained that way and transformers keeps it so that they give the same outputs; autolm
  computes the same, so a mixture model's logits depend on the whole batch (and its padding) exactly as there.

Tensor parallelism as transformers' plan: q/k/v and gate/up column-parallel, o_proj and down_proj row-parallel;
dt_proj row-parallel too (each rank's slice of the KV heads' values, the partial sums added across ranks: every rank
has every head's dt and keeps its own heads', with its slice of A); the mixture's router whole and its expert
embeddings cut by rows (each rank looks up its experts, the rows summed across ranks). llama.cpp has no Doge
architecture: no GGUF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig
from ..config_fields import _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, Linear, OneToken, RMSNorm, SelfSharded
from .base import LLAMA_TP, CausalLM, DecoderModel


@dataclass(repr=False)
class DogeConfig(PretrainedConfig):
    """transformers' DogeConfig: its fields and defaults (Doge-320M's sizes)."""

    model_type: ClassVar[str] = "doge"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim",)  # not in transformers' config: written when set
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "mlp_bias",
                                              "is_moe", "norm_topk_prob", "output_router_logits")  # fmt: skip

    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_dropout: float = 0.0
    max_position_embeddings: int = 2048
    num_attention_heads: int = 8
    attention_bias: bool = False
    mlp_bias: bool = False
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )

    @property
    def num_keys(self) -> int:
        """The product-key router's scores per set: floor(sqrt(num_experts))."""
        return math.isqrt(self.num_experts)

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_int(self.keep_window_size) or self.keep_window_size < 1:
            raise ConfigError(
                f"{src}: keep_window_size must be a positive integer, found {self.keep_window_size!r}"
            )
        if not _is_number(self.hidden_dropout) or not 0 <= self.hidden_dropout <= 1:
            raise ConfigError(
                f"{src}: hidden_dropout must be a number in [0, 1], found {self.hidden_dropout!r}"
            )
        if not _is_int(self.num_experts) or not 0 < self.num_experts <= 1 << 24:
            raise ConfigError(f"{src}: num_experts must be a positive integer, found {self.num_experts!r}")
        k, pairs = self.num_experts_per_tok, self.num_keys**2
        if self.is_moe and (not _is_int(k) or not 0 < k <= pairs):
            raise ConfigError(f"{src}: num_experts_per_tok must be a positive integer of at most "
                              f"floor(sqrt(num_experts)) ** 2 = {pairs}, found {k!r}")  # fmt: skip

    def layer_window(self, i: int) -> int | None:
        return (
            self.sliding_window
        )  # transformers' Doge: every layer's mask is the sliding one where it is set


def keep_top(allowed: torch.Tensor, dt: torch.Tensor, keep: int) -> torch.Tensor:
    """Of the allowed keys (B, n, T, S) keep the `keep` with the largest dt (B, n, 1, S) per query: transformers'
    prepare_dynamic_mask, whose top-k runs over every slot (the disallowed ones at the minimum: they stay out) and
    only where there are more than `keep` slots. Its top-k is called on the same tensor, so that keys of equal dt
    (the same token's values) are chosen as there: torch's top-k breaks such ties its own way, which depends on the
    row's length (the per-layer compiled graphs, exported over a dynamic length, could not branch on it, and a top-k
    padded to fit would break ties otherwise: they do not serve Doge)."""
    S = allowed.shape[-1]
    if keep >= S:
        return allowed
    scores = dt.expand(allowed.shape).masked_fill(~allowed, torch.finfo(dt.dtype).min)
    top = scores.topk(keep, dim=-1, largest=True, sorted=False).indices
    return allowed & torch.zeros_like(allowed).scatter(-1, top, True)


class DynamicMaskContext:
    """A forward context (Forward or OneToken) whose attention runs under the layer's dynamic mask; the cache written
    as the context writes it."""

    def __init__(self, ctx, attn: DogeAttention):
        self.ctx, self.attn = ctx, attn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)

    def history(self, layer_idx: int, k, v, window):
        """(every key slot's keys and values (B, n_kv, S, hd), the allowed mask (B, 1, T, S))."""
        ctx = self.ctx
        if isinstance(ctx, OneToken):
            keys, values = (ctx.keys[layer_idx], ctx.values[layer_idx]) if isinstance(ctx.keys, list) else (
                ctx.keys, ctx.values)  # fmt: skip
            keys.narrow(2, ctx.seen - 1, 1).copy_(k)
            values.narrow(2, ctx.seen - 1, 1).copy_(v)
            span, starts = ctx._span(window, None)
            first = ctx.seen - span
            k, v = keys.narrow(2, first, span), values.narrow(2, first, span)
            allowed = torch.ones(k.shape[0], 1, 1, span, dtype=torch.bool, device=k.device)
            if starts is not None:
                slots = torch.arange(span, device=k.device) + first
                allowed = (slots[None, :] >= starts[:, None].to(k.device))[:, None, None, :]
            return k, v, allowed
        if ctx.cache is not None:
            k, v = ctx.cache.update(layer_idx, k, v, ctx.cache_position, ctx.kv_length)
        S, T = k.shape[2], ctx.cache_position.shape[0]
        mask = ctx.mask(window)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]
        if ctx.attention_mask is not None:  # no key for a padding query (build_mask lets it see itself)
            mask = mask & ctx.attention_mask[:, None, None, :S].bool().to(k.device)
        past = int(ctx.cache_position[0])
        if window is not None and past > 0:
            # after a prompt, the slots transformers' sliding cache keeps (the one-token step's): ties fall as there
            first = max(0, past - window + 1)
            k, v, mask = k[:, :, first:], v[:, :, first:], mask[..., first:]
        return k, v, mask

    def attend(self, layer_idx: int, q, k, v, window=None, scale=None, *args, **kwargs) -> torch.Tensor:
        attn = self.attn
        k, v, allowed = self.history(layer_idx, k, v, window)
        k, v = k.to(q.dtype), v.to(q.dtype)
        B, n_kv, S, hd = v.shape
        dt = attn.dt_proj(v.transpose(1, 2).reshape(B, S, n_kv * hd))  # every KV head's (summed across ranks)
        if attn.tp is not None:  # this rank's heads
            dt = dt.chunk(attn.tp[1], dim=-1)[attn.tp[0]]
        dt = torch.exp(attn.A * F.softplus(dt)).transpose(1, 2)[:, :, None, :]  # (B, n_kv, 1, S)
        allowed = allowed.expand(B, n_kv, q.shape[2], S)
        kept = keep_top(allowed, dt, attn.keep_window_size)  # (B, n_kv, T, S)
        group = q.shape[1] // n_kv
        k, v, dt, kept = (t.repeat_interleave(group, dim=1) for t in (k, v, dt, kept))
        scores = (q @ k.transpose(-1, -2)) * scale + dt
        scores = scores.masked_fill(~kept, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        attentions = getattr(self.ctx, "attentions", None)
        if attentions is not None:
            attentions.append(probs)
        return (probs @ v).transpose(1, 2)


class DogeAttention(SelfSharded, Attention):
    """transformers' DogeAttention: Attention with per-head q/k RMSNorm, A and dt_proj for the dynamic mask. Under
    tensor parallelism A keeps this rank's KV heads (SelfSharded)."""

    tp_dims: ClassVar[dict[str, int]] = {"A": 0}

    def __init__(self, config: DogeConfig, layer_idx: int):
        nkv, hd, eps = config.num_key_value_heads, config.head_dim, config.rms_norm_eps
        super().__init__(config.hidden_size, config.num_attention_heads, nkv, hd, layer_idx,
                         bias=config.attention_bias, window=config.layer_window(layer_idx), qk_norm="head",
                         norm=lambda dim: RMSNorm(dim, eps))  # fmt: skip
        self.keep_window_size = config.keep_window_size
        self.A = nn.Parameter(torch.zeros(nkv))
        self.dt_proj = Linear(nkv * hd, nkv, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return super().forward(x, DynamicMaskContext(ctx, self))


class ExpertEmbedding(SelfSharded, nn.Embedding):
    """The mixture's per-expert vectors (down_embed, up_embed). Under tensor parallelism, where the experts divide
    evenly, each rank keeps a slice of the rows and looks up its own experts (zeros for the others), the rows summed
    across ranks: every rank gets every chosen expert's row, exactly."""

    tp_dims: ClassVar[dict[str, int]] = {"weight": 0}

    def __init__(self, num: int, dim: int):
        meta = torch.get_default_device().type == "meta"  # weights from the checkpoint: no init on meta
        super().__init__(num, dim, _weight=torch.empty(num, dim) if meta else None)

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        return super().shard(rank, world) if self.num_embeddings % world == 0 else {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return super().forward(ids)
        rows = self.weight.shape[0]
        local = ids - self.tp[0] * rows
        inside = (local >= 0) & (local < rows)
        x = F.embedding(local.clamp(0, rows - 1), self.weight) * inside[..., None].to(self.weight.dtype)
        torch.distributed.all_reduce(x)
        return x


class DogeCDMoE(GatedMLP):
    """transformers' DogeCDMoE: the gated MLP plus product-key experts (see the module docstring)."""

    def __init__(self, config: DogeConfig):
        h = config.hidden_size
        super().__init__(h, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.num_keys, self.top_k, self.norm_topk_prob = (
            config.num_keys,
            config.num_experts_per_tok,
            config.norm_topk_prob,
        )
        self.router_gate = Linear(h, 2 * self.num_keys, bias=False)
        # a token's routing reads other tokens of the batch (the module docstring): served rows run alone (serve.rows)
        self.rows_apart = True
        self.down_embed = ExpertEmbedding(config.num_experts, h)
        self.up_embed = ExpertEmbedding(config.num_experts, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        n = self.num_keys
        logits = self.router_gate(x).view(2, B * T, n)  # transformers' split (the module docstring)
        (sx, sy), (ix, iy) = logits.topk(n, dim=-1)
        pairs = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).view(B * T, n * n)
        experts = (ix.unsqueeze(-1) * n + iy.unsqueeze(-2)).view(B * T, n * n)
        scores, at = pairs.topk(self.top_k, dim=-1)
        chosen = experts.gather(-1, at)  # (B * T, k)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        down, up = self.down_embed(chosen), self.up_embed(chosen)  # (B * T, k, h)
        gates = (down @ x.reshape(B * T, h, 1)).view(B * T, -1)
        gates = self.act_fn(gates) * weights
        routed = (gates.view(B * T, 1, -1) @ up).view(B, T, h)
        return super().forward(x) + routed


class DogeDecoderLayer(nn.Module):
    """Pre-norm attention and MLP (or mixture), each residual scaled by its learned vector."""

    def __init__(self, config: DogeConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = DogeAttention(config, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(h))
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = DogeCDMoE(config) if config.is_moe else GatedMLP(h, config.intermediate_size, config.hidden_act,
                                                                     bias=config.mlp_bias)  # fmt: skip
        self.post_attention_residual = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        y = F.dropout(self.self_attn(self.input_layernorm(x), ctx), self.hidden_dropout, self.training)
        x = self.input_residual * x + y
        y = F.dropout(self.mlp(self.post_attention_layernorm(x)), self.hidden_dropout, self.training)
        return self.post_attention_residual * x + y


class DogeModel(DecoderModel):
    def __init__(self, config: DogeConfig):
        super().__init__(config, DogeDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))


class DogeForCausalLM(CausalLM):
    """transformers' DogeForCausalLM."""

    config_class = DogeConfig
    # transformers' base_model_tp_plan: Llama's, and dt_proj row-parallel (it reads every KV head's values); the
    # router whole, the expert embeddings cut by rows (ExpertEmbedding)
    tp_patterns: ClassVar[dict[str, str]] = {**LLAMA_TP, "layers.*.self_attn.dt_proj": "rowwise"}
    compiled_graphs: ClassVar[bool] = False  # the top-k over the cache's length: the eager step (keep_top)
    _no_split_modules: ClassVar[list[str]] = ["DogeDecoderLayer"]

    def __init__(self, config: DogeConfig):
        super().__init__(config, DogeModel(config))
