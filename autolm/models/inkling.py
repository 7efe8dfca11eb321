"""Inkling (Thinking Machines' Inkling; transformers' InklingForCausalLM, "inkling_text"): pre-norm layers of
attention with relative logits, short convolutions and a mixture of experts; no RoPE.

- Attention: full ("hybrid") or sliding-window ("hybrid_sliding", their own head counts and width `swa_*`) layers,
  as `layer_types` says (else `local_layer_ids`, else every layer but each sixth slides). q/k are RMS-normed per
  head and scaled by 1 / head_dim. Keys and values first pass a short convolution each (`k_sconv`, `v_sconv`);
  `r_proj` gives every query head `d_rel` relative states, mixed by `rel_logits_proj.proj` (d_rel, extent) into a
  bias per backward distance 0 .. extent - 1 (extent: `rel_extent`, the window on sliding layers), zero beyond,
  added to the scores. Distances count cache slots, as transformers counts them (padding included); with
  `log_scaling_n_floor`, full layers' queries and biases grow by 1 + alpha * log(max(1, (slot + 1) / floor)).
- Short convolution (`InklingShortConvolution`: `conv1d`, a depthwise causal conv of `conv_kernel_size` taps, no
  bias) adds its input back (x + conv(x)), in fp32, padding's inputs zeroed; four per layer (keys, values, the
  attention's output, the MLP's output), their last K - 1 inputs kept in the cache as the layer's state.
- MLP (`mlp_layer_types`: "dense" or "sparse"): a gated MLP times `global_scale`; or a sigmoid router over the
  routed and shared experts (`gate.weight` (E + S, h)), top-k routed by score + `e_score_correction_bias`, the
  chosen and shared experts' sigmoids normalised together, times route_scale and `gate.global_scale`; the shared
  experts (stacked `shared_experts.{gate,up,down}_proj`) weighted by their share.
- Embeddings RMS-normed (`embed_tokens.embed_norm`); the head reads the final hidden states divided by
  `logits_mup_width_multiplier`, its logits cut to `unpadded_vocab_size` when set; never tied. Multi-token-prediction
  layers (`model.mtp.*`) are skipped, as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import Attention, Experts, GatedMLP, Linear, OneToken, RMSNorm, Router
from ..nn.causal_conv import causal_conv1d
from ..nn.moe import SparseMoeBlock
from .base import LLAMA_TP, CausalLM, DecoderModel
from .image_text import ImageTextConfig
from .inkling_layers import InklingNormedEmbedding, InklingSharedExperts
from .inkling_layout import OriginalLayoutRules

LAYER_KINDS = ("hybrid", "hybrid_sliding")
_NOT_SAVED = ("rope_parameters", "rope_theta", "rope_scaling")


def check_sizes(config: Any, extra: tuple[str, ...]) -> None:
    """Inkling's (and Inkling 2's) sizes: positive integers (with `extra`), the sliding heads grouped evenly, the
    routed experts at least num_experts_per_tok."""
    src = config.source
    positive_ints(config, ("swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "head_dim", "d_rel",
                           "rel_extent", "conv_kernel_size", "moe_intermediate_size", "n_routed_experts",
                           "num_experts_per_tok", "sliding_window", *extra), 1 << 20)  # fmt: skip
    if config.swa_num_attention_heads % config.swa_num_key_value_heads:
        raise ConfigError(f"{src}: swa_num_key_value_heads ({config.swa_num_key_value_heads}) must divide "
                          f"swa_num_attention_heads ({config.swa_num_attention_heads})")  # fmt: skip
    if config.num_experts_per_tok > config.n_routed_experts:
        raise ConfigError(f"{src}: num_experts_per_tok ({config.num_experts_per_tok}) exceeds n_routed_experts "
                          f"({config.n_routed_experts})")  # fmt: skip


@dataclass(repr=False)
class InklingTextConfig(PretrainedConfig):
    """transformers' InklingTextConfig: `sliding_window_size` is autolm's sliding_window (an attribute under both
    names); config.json's `sconv_kernel_size` and `model_max_length` (the checkpoints' names) are read as
    conv_kernel_size and max_position_embeddings, `dense_mlp_idx` (dense first layers) and
    `dense_intermediate_size` (then intermediate_size is the experts' width) as transformers reads them."""

    model_type: ClassVar[str] = "inkling_text"
    attribute_map: ClassVar[dict[str, str]] = {"sliding_window": "sliding_window_size"}
    layer_kinds: ClassVar[tuple[str, ...]] = LAYER_KINDS
    absent_keys: ClassVar[tuple[str, ...]] = ("tie_word_embeddings", "use_cache")
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "shared_expert_sink",
        "chain_hidden_post_norm",
        "mtp_hidden_states_first",
    )
    original_names: ClassVar[dict[str, str]] = {
        "sconv_kernel_size": "conv_kernel_size",
        "model_max_length": "max_position_embeddings",
    }

    vocab_size: int = 201024
    unpadded_vocab_size: int | None = None
    hidden_size: int = 6144
    num_hidden_layers: int = 66
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 16
    swa_head_dim: int = 128
    sliding_window: int | None = 512
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: int | None = None
    log_scaling_alpha: float = 0.1
    local_layer_ids: list[int] | None = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    conv_kernel_size: int = 4
    mlp_layer_types: list[str] | None = None
    intermediate_size: int = 24576
    moe_intermediate_size: int = 3072
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    shared_expert_sink: bool = True
    route_scale: float = 8.0
    logits_mup_width_multiplier: float = 24.0
    rms_norm_eps_moe_gate: float = 1e-6
    initializer_range: float = 0.02
    num_mtp_layers: int | None = None
    chain_hidden_post_norm: bool = False
    mtp_hidden_states_first: bool = True
    mtp_local_layer_ids: list[int] | None = None

    def __post_init__(self) -> None:
        for theirs, ours in self.original_names.items():
            if theirs in self.extra:
                setattr(self, ours, self.extra.pop(theirs))
        n, local = self.num_hidden_layers, self.local_layer_ids
        if self.layer_types is None and _is_int(n) and n > 0:
            ids = set(local) if isinstance(local, list) else {i for i in range(n) if (i + 1) % 6}
            self.layer_types = [LAYER_KINDS[i in ids] for i in range(n)]
        if self.mlp_layer_types is None and _is_int(n) and n > 0:
            dense = self.extra.pop("dense_mlp_idx", 0)
            self.mlp_layer_types = ["dense" if _is_int(dense) and i < dense else "sparse" for i in range(n)]
        if self.extra.get("dense_intermediate_size") is not None:
            self.moe_intermediate_size = self.intermediate_size
            self.intermediate_size = self.extra.pop("dense_intermediate_size")
        self.extra.setdefault("number_of_conv_states", 4)  # as transformers writes it
        super().__post_init__()

    sliding_window_size = property(lambda self: self.sliding_window)  # transformers' name

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "hybrid_sliding"

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.is_sliding(i) else None

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # relative logits, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_SAVED:
            out.pop(key, None)
        return out

    def validate(self) -> None:
        super().validate()
        src = self.source
        check_sizes(self, ("n_shared_experts",))
        kinds, n = self.mlp_layer_types, self.num_hidden_layers
        if not (isinstance(kinds, list) and len(kinds) == n and set(kinds) <= {"dense", "sparse"}):
            raise ConfigError(f"{src}: mlp_layer_types must list {self.num_hidden_layers} entries of 'dense' or "
                              f"'sparse', found {str(kinds)[:200]}")  # fmt: skip
        for name in ("route_scale", "logits_mup_width_multiplier", "log_scaling_alpha"):
            v = getattr(self, name)
            if not _is_number(v) or (v == 0 and name != "log_scaling_alpha"):
                raise ConfigError(f"{src}: {name} must be a (non-zero) number, found {v!r}")
        for name, top in (("log_scaling_n_floor", None), ("unpadded_vocab_size", self.vocab_size)):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v > 0 and (top is None or (_is_int(v) and v <= top))):
                raise ConfigError(f"{src}: {name} must be null or a positive number"
                                  f"{'' if top is None else f' up to vocab_size ({top})'}, found {v!r}")  # fmt: skip


class InklingShortConvolution(nn.Module):
    """x + a causal depthwise convolution of x (`conv1d`, (C, 1, K), no bias), in fp32, padding's inputs zeroed;
    (x (B, T, C), real tokens (B, T) or None, the state (B, C, K - 1) or None) -> (y, the next state)."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.conv1d = nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=False)

    def forward(self, x: torch.Tensor, real, state) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.float()
        masked = h if real is None else h * real[:, :, None]
        y, state = causal_conv1d(masked.transpose(1, 2), self.conv1d.weight.float(), None, state)
        return (y.transpose(1, 2) + h).to(x.dtype), state


def relative_bias(rel, proj, q_pos, k_pos) -> torch.Tensor:
    """transformers' InklingRelativeLogits: rel (B, T, nh, d_rel) @ proj (d_rel, E) read at each query-key
    distance, zero outside 0 .. E - 1 -> (B, nh, T, S)."""
    logits = (rel @ proj).transpose(1, 2)  # (B, nh, T, E)
    distance = q_pos[:, None] - k_pos[None, :]  # (T, S)
    index = distance.clamp(0, proj.shape[1] - 1).expand(*logits.shape[:2], -1, -1)
    return logits.gather(-1, index).masked_fill((distance < 0) | (distance >= proj.shape[1]), 0.0)


def history(ctx, layer_idx: int, k, v, window: int | None):
    """The new keys and values written to the cache -> (every key and value attended over, the queries' slots
    (T,), the keys' slots (S,), the boolean mask (B, 1, T, S) or None)."""
    if isinstance(ctx, OneToken):
        one = not isinstance(ctx.keys, list)  # one layer's buffers, in its compiled graph
        keys, values = (ctx.keys, ctx.values) if one else (ctx.keys[layer_idx], ctx.values[layer_idx])
        seen = ctx.seen
        keys.narrow(2, seen - 1, 1).copy_(k)
        values.narrow(2, seen - 1, 1).copy_(v)
        span = seen if ctx.span is None else ctx.span  # a recurrent layer's graph: every slot, windowed here
        span = span if window is None else torch.sym_min(window, span)
        k_pos = torch.arange(seen - span, seen, device=k.device)
        starts = ctx.starts
        mask = None if starts is None else (k_pos[None, :] >= starts[:, None].to(k.device))[:, None, None]
        return keys.narrow(2, seen - span, span), values.narrow(2, seen - span, span), k_pos[-1:], k_pos, mask
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer_idx, k, v, ctx.cache_position, ctx.kv_length)
    q_pos, k_pos = ctx.cache_position, torch.arange(k.shape[2], device=k.device)
    if (mask := ctx.mask(window)) is None:
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
    return k, v, q_pos, k_pos, mask


class InklingAttention(Attention):
    """transformers' InklingAttention (see the module docstring): q/k/v/o and r_proj, the key and value short
    convolutions, per-head q/k norms, the relative logits; forward(x, ctx, states, real) -> (out, (k, v states))."""

    def __init__(self, config: Any, layer_idx: int):
        sliding = config.is_sliding(layer_idx)
        swa = "swa_" if sliding else ""
        hd = getattr(config, f"{swa}head_dim")
        nh, nkv = getattr(config, f"{swa}num_attention_heads"), getattr(config, f"{swa}num_key_value_heads")
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, scale=1.0 / hd, rope=None, qk_norm="head",
                         norm=lambda d: RMSNorm(d, config.rms_norm_eps),
                         window=config.sliding_window if sliding else None)  # fmt: skip
        self.r_proj = Linear(config.hidden_size, nh * config.d_rel, bias=False)
        self.k_sconv = InklingShortConvolution(nkv * hd, config.conv_kernel_size)
        self.v_sconv = InklingShortConvolution(nkv * hd, config.conv_kernel_size)
        self.rel_logits_proj = nn.Module()
        extent = config.sliding_window if sliding else config.rel_extent
        self.rel_logits_proj.proj = nn.Parameter(torch.empty(config.d_rel, extent))
        floor = None if sliding else config.log_scaling_n_floor
        self.log_scaling = None if floor is None else (float(floor), float(config.log_scaling_alpha))

    def forward(self, x: torch.Tensor, ctx, states=(None, None), real=None):
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        k, k_state = self.k_sconv(k, real, states[0])
        v, v_state = self.v_sconv(v, real, states[1])
        q = self.q_norm(q.view(B, T, nh, hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, nkv, hd)).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        k, v, q_pos, k_pos, mask = history(ctx, self.layer_idx, k, v, self.sliding_window)
        k, v = k.to(q.dtype), v.to(q.dtype)
        bias = relative_bias(self.r_proj(x).view(B, T, nh, -1), self.rel_logits_proj.proj, q_pos, k_pos)
        if self.log_scaling is not None:
            floor, alpha = self.log_scaling
            tau = (1.0 + alpha * torch.log(((q_pos + 1).float() / floor).clamp(min=1.0))).view(1, 1, -1, 1)
            q, bias = (q.float() * tau).to(q.dtype), (bias.float() * tau).to(bias.dtype)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + bias
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if getattr(ctx, "attentions", None) is not None:
            ctx.attentions.append(probs)
        y = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)
        return self.o_proj(y), (k_state, v_state)


class InklingMLP(GatedMLP):
    """The dense MLP: down(silu(gate(x)) * up(x)) times `global_scale` (1,)."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__(hidden, intermediate, act)
        self.global_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.global_scale


class InklingRouter(Router):
    """transformers' InklingTopkRouter: (x (N, h)) -> (routed ids (N, k), their weights, the shared experts'
    weights (N, S)); see the module docstring. In fp32, the weights cast to x's dtype."""

    def __init__(self, config: Any):
        routed, shared = config.n_routed_experts, config.n_shared_experts
        super().__init__(config.hidden_size, routed + shared, config.num_experts_per_tok)
        self.num_experts, self.n_shared, self.route_scale = routed, shared, config.route_scale
        self.global_scale = nn.Parameter(torch.ones(1))
        self.register_buffer("e_score_correction_bias", torch.zeros(routed, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        routed, shared = logits[:, : self.num_experts], logits[:, self.num_experts :]
        ids = torch.topk(routed.sigmoid() + self.e_score_correction_bias.float(), self.top_k, dim=-1)[1]
        log_probs = F.logsigmoid(torch.cat([routed.gather(-1, ids), shared], dim=-1))
        weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
        weights = (weights * self.route_scale * self.global_scale.float()).to(x.dtype)
        return ids, weights[:, : self.top_k], weights[:, self.top_k :]


class InklingMoE(SparseMoeBlock):
    """The router, the routed experts (gate_up_proj (E, 2I, h), down_proj (E, h, I)) and the shared experts."""

    def __init__(self, config: Any):
        h, i, act = config.hidden_size, config.moe_intermediate_size, config.hidden_act
        super().__init__(InklingRouter(config), Experts(config.n_routed_experts, h, i, act),
                         shared_experts=InklingSharedExperts(config.n_shared_experts, h, i, act))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        ids, weights, shared = self.gate(flat := x.reshape(-1, h))
        return (self.experts(flat, ids, weights) + self.shared_experts(flat, shared)).view(B, T, h)


class InklingDecoderLayer(nn.Module):
    """x + attn_sconv(self_attn(input_layernorm(x))), then + mlp_sconv(mlp(post_attention_layernorm(x))); the four
    convolutions' states kept together as the layer's recurrent state."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, K = config.hidden_size, config.rms_norm_eps, config.conv_kernel_size
        self.layer_idx = layer_idx
        self.self_attn = InklingAttention(config, layer_idx)
        dense = config.mlp_layer_types[layer_idx] == "dense"
        self.mlp = InklingMLP(h, config.intermediate_size, config.hidden_act) if dense else InklingMoE(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.attn_sconv = InklingShortConvolution(h, K)
        self.mlp_sconv = InklingShortConvolution(h, K)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        old = ctx.state(self.layer_idx) or (None,) * 4
        real = ctx.real_tokens()
        y, kv_states = self.self_attn(self.input_layernorm(x), ctx, old[:2], real)
        y, attn_state = self.attn_sconv(y, real, old[2])
        x = x + y
        y, mlp_state = self.mlp_sconv(self.mlp(self.post_attention_layernorm(x)), real, old[3])
        ctx.keep_state(self.layer_idx, (*kv_states, attn_state, mlp_state))
        return x + y


class InklingModel(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, InklingDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.embed_tokens = InklingNormedEmbedding(config.vocab_size, config.hidden_size, config.rms_norm_eps)


class InklingConfig(ImageTextConfig):
    """transformers' InklingConfig (the image-text model): its language model's, read from the original layout
    transformers writes it in (models.inkling_layout)."""

    model_type: ClassVar[str] = "inkling_mm_model"
    text_class: ClassVar[type] = InklingTextConfig


class WholeAttentionTP:
    """Both Inklings' tensor parallelism and tying: every rank runs every head, the normed embeddings cut their own
    rows (InklingNormedEmbedding.shard), the head never tied to them (separate `embed` and `unembed` tensors)."""

    def shard_heads(self, world: int) -> None:
        """Every rank runs every head (attention kept whole): nothing to shard."""

    def tp_plan(self) -> dict[str, str]:
        """The plan without the embeddings: they cut their own rows."""
        return {m: s for m, s in super().tp_plan().items() if m != self.embeddings_name}

    def tie_weights(self) -> None:
        """Never tied, as transformers' Inklings."""


class InklingForCausalLM(WholeAttentionTP, CausalLM):
    """transformers' InklingForCausalLM."""

    config_class = InklingTextConfig
    recurrent: ClassVar[bool] = True
    checkpoint_rules = OriginalLayoutRules()  # and the image-text model's original layout
    # transformers' plan: the dense MLP split (gate/up column-, down row-parallel), the routed and shared experts'
    # intermediate rows cut (Experts, InklingSharedExperts); attention (its short convolutions, relative logits),
    # the layer's convolutions and the router whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {k: v for k, v in LLAMA_TP.items() if ".mlp." in k}
    _no_split_modules: ClassVar[list[str]] = ["InklingDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["attn_sconv", "mlp_sconv", "k_sconv", "v_sconv",
                                                         "e_score_correction_bias", "gate.global_scale"]  # fmt: skip

    def __init__(self, config: Any):
        super().__init__(config, InklingModel(config))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h / self.config.logits_mup_width_multiplier)
        n = self.config.unpadded_vocab_size
        return logits[..., :n] if n is not None and n < logits.shape[-1] else logits
