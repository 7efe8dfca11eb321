"""AFMoE (Arcee's Trinity: Trinity-Nano, Trinity-Mini, Trinity-Large): local sliding-window and global layers as
`layer_types` says (by default every `global_attn_every_n_layers`-th layer global); the local layers rotate their
queries and keys (RoPE), the global ones use none. Attention has GQA, per-head RMSNorms on queries and keys
(`q_norm`, `k_norm`, before RoPE), optional biases on q/k/v/o (`attention_bias`) and an output gate: the heads'
output times sigmoid(x @ `gate_proj`) (one gate per output element, no bias) before `o_proj`.

Each layer normalises its sublayers on both sides: `input_layernorm` before attention, `post_attention_layernorm`
on its output, `pre_mlp_layernorm` before the feed-forward block, `post_mlp_layernorm` on its output, each added
to the residual stream. Every norm multiplies by its weight in fp32, then casts back. With `mup_enabled` the input
embeddings are multiplied by sqrt(hidden_size) (given `inputs_embeds` too).

The first `num_dense_layers` layers have a dense SiLU-gated MLP (`intermediate_size`); the others a mixture of
`num_experts` gated MLPs (`moe_intermediate_size`) with token-choice sigmoid routing: the router (`mlp.router`,
its weight `mlp.router.gate.weight`) scores every expert with sigmoid(logits) in fp32, the top
`num_experts_per_tok` of the scores plus the block's `expert_bias` (a parameter the checkpoint holds, not trained)
are chosen, and their plain scores, renormalised to sum 1 (+ 1e-20) and times `route_scale`, weight the experts'
outputs (fp32 weights); plus `mlp.shared_experts`, one ungated gated MLP of moe_intermediate_size *
`num_shared_experts` that every token passes. Checkpoints keep one tensor per expert, as Qwen 2 MoE's do.

The released config.json also holds `route_norm`, `score_func`, `n_group` / `topk_group` and a few training keys
that transformers ignores (it always computes as above); so does autolm, keeping them as read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    Linear,
    Rename,
    RMSNorm,
    SparseMoeBlock,
)
from .base import CausalLM, DecoderModel
from .glm4_moe import GROUPED_MOE_TP, SIGMOID_GATING
from .mixtral import validate_experts
from .qwen2_moe import QWEN_MOE_RULES


@dataclass(repr=False)
class AfmoeConfig(PretrainedConfig):
    """transformers' AfmoeConfig: its fields and defaults (head_dim 128 whatever the hidden size; no BOS / EOS /
    padding ids; layer_types derived from global_attn_every_n_layers where config.json gives none)."""

    model_type: ClassVar[str] = "afmoe"
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "mup_enabled",
        "output_router_logits",
    )

    vocab_size: int = 200192
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 32
    num_dense_layers: int = 1
    num_attention_heads: int = 16
    head_dim: int | None = 128
    max_position_embeddings: int = 16384
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 6
    num_shared_experts: int = 2
    route_scale: float = 1.0
    output_router_logits: bool = False
    global_attn_every_n_layers: int = 4
    sliding_window: int | None = 1024
    mup_enabled: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        n, every = self.num_hidden_layers, self.global_attn_every_n_layers
        if self.layer_types is None and _is_int(n) and n > 0 and _is_int(every) and every > 0:
            self.layer_types = [
                "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)
            ]
        super().__post_init__()

    def layer_rope(self, i: int) -> str | None:
        """The RoPE table layer i reads: the local layers rotate, the global ones do not."""
        return "default" if self.layer_types[i] == "sliding_attention" else None

    def sparse(self, i: int) -> bool:
        """Whether layer i has the mixture of experts (else the dense MLP)."""
        return i >= self.num_dense_layers

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_experts, self.num_experts_per_tok)
        for name, low in (("moe_intermediate_size", 1), ("num_shared_experts", 1), ("num_dense_layers", 0),
                          ("global_attn_every_n_layers", 1)):  # fmt: skip
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigError(f"{src}: {name} must be an integer >= {low}, found {v!r}")
        s = self.route_scale
        if not _is_number(s) or not s > 0:
            raise ConfigError(f"{src}: route_scale must be a positive number, found {s!r}")


class AfmoeAttention(Attention):
    """Per-head q/k RMSNorms, RoPE on the local layers only, and the output gated by sigmoid(x @ gate_proj)."""

    def __init__(self, config: AfmoeConfig, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, bias=config.attention_bias,
                         window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx), qk_norm="head",
                         norm=lambda dim: _norm(config, dim))  # fmt: skip
        self.gate_proj = Linear(config.hidden_size, nh * hd, bias=False)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The heads' output y (B, T, heads * head_dim) gated by the layer's input x."""
        return y * torch.sigmoid(self.gate_proj(x))


def _norm(config: AfmoeConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, config.rms_norm_eps, weight_in_fp32=True)


class AfmoeRouterWeight(nn.Module):
    """The router's (experts, hidden) weight under transformers' name `gate` (not a Linear: quantization and
    adapters leave it alone, as they leave other families' routers)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))


class AfmoeTokenChoiceRouter(nn.Module):
    """transformers' AfmoeTokenChoiceRouter: the logits (x @ gate.weight.T, in the weight's dtype), sigmoid in fp32;
    the top k of the scores plus the block's expert_bias chosen, their plain scores renormalised and scaled by
    route_scale (fp32 weights)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, route_scale: float):
        super().__init__()
        self.gate = AfmoeRouterWeight(hidden, num_experts)
        self.num_experts, self.top_k, self.route_scale = num_experts, top_k, route_scale

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (expert ids (N, k), routing weights (N, k))."""
        scores = kernels.linear(x, self.gate.weight).float().sigmoid()  # (N, E)
        ids = torch.topk(scores + expert_bias.float(), self.top_k, dim=-1)[1]
        top = scores.gather(1, ids)
        return ids, top / (top.sum(dim=-1, keepdim=True) + 1e-20) * self.route_scale

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, scale {self.route_scale}"


class AfmoeSparseMoeBlock(SparseMoeBlock):
    """Router (`router`) + stacked experts + the shared experts; the block holds the routing's `expert_bias`."""

    def __init__(self, config: AfmoeConfig):
        h, n, act = config.hidden_size, config.num_experts, config.hidden_act
        router = AfmoeTokenChoiceRouter(h, n, config.num_experts_per_tok, float(config.route_scale))
        experts = Experts(n, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.num_shared_experts, act)
        super().__init__(router, experts, router_name="router", shared_experts=shared)
        self.expert_bias = nn.Parameter(torch.zeros(n), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.router(flat, self.expert_bias)
        return (self.shared_experts(flat) + self.experts(flat, ids, weights)).view(B, T, h)


class AfmoeDecoderLayer(nn.Module):
    """Attention and the feed-forward block, each between a norm of its input and a norm of its output."""

    def __init__(self, config: AfmoeConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.self_attn = AfmoeAttention(config, layer_idx)
        self.input_layernorm = _norm(config, h)
        self.post_attention_layernorm = _norm(config, h)
        self.pre_mlp_layernorm = _norm(config, h)
        self.post_mlp_layernorm = _norm(config, h)
        if config.sparse(layer_idx):
            self.mlp = AfmoeSparseMoeBlock(config)
        else:
            self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x)))


class AfmoeModel(DecoderModel):
    def __init__(self, config: AfmoeConfig):
        super().__init__(config, AfmoeDecoderLayer, _norm(config, config.hidden_size))

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """muP: the input vectors times sqrt(hidden_size) where mup_enabled."""
        return x * (self.config.hidden_size**0.5) if self.config.mup_enabled else x


@dataclass(frozen=True)
class ExpertBiasOut:
    """Checkpoint rule for GGUF out: llama.cpp's converter writes the block's `expert_bias` as the bias of
    `expert_bias` (blk.N.exp_probs_b.bias); reading, a Rename takes it back."""

    def piece(self, name: str) -> None:
        return None  # nothing to assemble while loading

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".mlp.expert_bias"):
            return None
        return [(name.removesuffix("_bias") + ".bias", t)]


# per-expert tensors stacked (Qwen MoE's rules, llama.cpp's stacked experts); llama.cpp's exp_probs_b back
AFMOE_RULES = CheckpointRules(
    [*QWEN_MOE_RULES.rules, Rename(r"\.mlp\.expert\.bias$", ".mlp.expert_bias", r"(?!)", ""), ExpertBiasOut()]
)
_SCORE_KEYS = (
    "score_function",
    "scoring_func",
    "score_func",
)  # where the converter finds the gating function


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's afmoe: a window only where the file gives one (then the local layers every 4th but one, its
    fixed pattern); the routing it runs must be transformers' (sigmoid, renormalised), else the file is refused."""
    d["sliding_window"] = get("attention.sliding_window")
    gating = get("expert_gating_func")
    if gating is not None and gating != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {gating!r}: AFMoE routes with the sigmoid ({SIGMOID_GATING})")
    if not get("expert_weights_norm"):
        raise ConfigError(
            "expert_weights_norm is false or absent: llama.cpp would not renormalise the top k's weights, which "
            "AFMoE always does"
        )


def _gguf_write_config(m: dict[str, Any], c: AfmoeConfig) -> None:
    """As llama.cpp's AfmoeModel converter writes it (LlamaModel's keys, then its own): the renormalisation (which
    the model always does; the converter copies route_norm), route_scale as a float, the gating function and
    groups where config.json names them (TextModel reads them; llama.cpp's afmoe runs neither)."""
    m["expert_weights_norm"] = True
    m["expert_weights_scale"] = float(c.route_scale)
    score = next((c.extra[k] for k in _SCORE_KEYS if c.extra.get(k) is not None), None)
    if score == "sigmoid":
        m["expert_gating_func"] = SIGMOID_GATING
    for key, name in (("expert_group_count", "n_group"), ("expert_group_used_count", "topk_group")):
        if c.extra.get(name) is not None:
            m[key] = c.extra[name]


class AfmoeForCausalLM(CausalLM):
    """transformers' AfmoeForCausalLM."""

    config_class = AfmoeConfig
    checkpoint_rules = AFMOE_RULES
    # llama.cpp's AfmoeModel converter (a LlamaModel whose tensors are not permuted: NeoX RoPE): tensors by
    # gguf-py's map, the experts stacked, expert_bias as exp_probs_b.bias. Its afmoe graph always scales the
    # embeddings by sqrt(hidden), makes every 4th layer global (no RoPE) and reads no attention biases
    gguf = GGUFLayout(
        "afmoe",
        config=(
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_count", "num_shared_experts"),
            ("leading_dense_block_count", "num_dense_layers"),
            ("expert_weights_scale", "route_scale"),
        ),
        layer=(
            ("attn_gate", "self_attn.gate_proj"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_mlp_layernorm"),
            ("post_ffw_norm", "post_mlp_layernorm"),
            ("ffn_gate_inp", "mlp.router.gate"),
            ("exp_probs_b", "mlp.expert"),
            ("ffn_gate_exps", "mlp.experts.gate_proj"),
            ("ffn_up_exps", "mlp.experts.up_proj"),
            ("ffn_down_exps", "mlp.experts.down_proj"),
            ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
            ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
        ),
        fixed=(("mup_enabled", True), ("global_attn_every_n_layers", 4), ("attention_bias", False)),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    # transformers' plan for the experts; attention (the gate as q_proj) and the dense / shared MLPs as Llama's
    tp_patterns: ClassVar[dict[str, str]] = {**GROUPED_MOE_TP, "layers.*.self_attn.gate_proj": "colwise"}
    _no_split_modules: ClassVar[list[str]] = ["AfmoeDecoderLayer"]

    def __init__(self, config: AfmoeConfig):
        super().__init__(config, AfmoeModel(config))
