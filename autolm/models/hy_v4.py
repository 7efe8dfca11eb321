"""Tencent Hy v4 (transformers' hy_v4): GLM-5's layers (models.glm_moe_dsa: Multi-head Latent Attention over the keys a
lightning indexer keeps, layers "full" or "shared" by `indexer_types`, dense layers by `mlp_layer_types`, the
sigmoid-routed experts with shared experts) with these changes:

- RoPE turns the two halves (not interleaved pairs), in the attention and in the indexer; the indexer turns the
  LAST qk_rope_head_dim features of its queries and keys (DeepSeek-V3.2's the first), its key LayerNorm has
  rms_norm_eps;
- the attention's output is gated per head by sigmoid(gate_proj(x)) (x the attention's input) before o_proj, and its
  softmax has gpt-oss' per-head learned sinks (`sinks`);
- the routed experts clamp their SwiGLU: silu(min(gate, swiglu_limit)) * clamp(up, +-swiglu_limit) (no clamp where
  swiglu_limit <= 0);
- hyper-connections: the residual is `hc_mult` streams (the embeddings repeated; carried here as one (B, T,
  hc_mult * h) tensor). Around each block (`attn_hc`, `ffn_hc`): mixes = fn(flat streams) / rms(flat streams),
  pre = sigmoid(mixes[:n] * scale[0] + base[:n]) + hc_eps weighs the streams into the block's input, and the
  block's output y goes to each stream i scaled by post_i = hc_magnitude * sigmoid(mixes[n:] * scale[1] +
  base[n:]) + hc_eps; at the end `hc_head` weighs the streams the same way (its own hc_fn / hc_scale / hc_base) into
  one, then the final norm. All of it in float32, as transformers.

The defaults: one dense layer then sparse ones, layer 0 and every fourth from layer 1 "full", the rest "shared".
The indexers' keys are kept in the cache as DeepSeek-V3.2's (models.deepseek_v32): the one-token step runs eagerly.
GGUF as llama.cpp's "hy_v4" (models.hy_v4_gguf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _is_int
from ..config_fields import positive_ints
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    Ignored,
    Linear,
    Rename,
    apply_rotary,
)
from ..nn.expert_formats import GGUFExperts
from . import hy_v4_gguf
from .deepseek_v3 import DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v32 import DSAIndexer, IndexedCausalLM
from .glm4_moe import GROUPED_MOE_RULES, ExpProbsBias, grouped_moe_mlp
from .glm_moe_dsa import GlmMoeDsaAttention, GlmMoeDsaConfig, GlmMoeDsaDecoderLayer
from .mixtral import MixtralModel


@dataclass(repr=False)
class HYV4Config(GlmMoeDsaConfig):
    """transformers' HYV4Config: its fields and defaults (Hy4-preview's sizes); head_dim is qk_rope_head_dim."""

    model_type: ClassVar[str] = "hy_v4"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window", "rope_interleave", "first_k_dense_replace",
                                              "mlp_bias")  # fmt: skip

    vocab_size: int = 120832
    hidden_size: int = 2816
    intermediate_size: int = 6912
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 262144
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 120002
    bos_token_id: int | None = 120000
    eos_token_id: int | list[int] | None = 120025
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    first_k_dense_replace: int = 0
    rope_interleave: bool = False  # not transformers' field: Hy v4 turns the two halves
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 16
    hc_mult: int = 4
    hc_magnitude: float = 2.0
    hc_eps: float = 1e-6
    learnable_sink_init: float = 0.0
    swiglu_limit: float = 10.0

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if _is_int(n):
            if self.mlp_layer_types is None:
                self.mlp_layer_types = ["dense"] * min(1, n) + ["sparse"] * max(n - 1, 0)
            if self.indexer_types is None:
                self.indexer_types = ["full" if i == 0 or (i - 1) % 4 == 0 else "shared" for i in range(n)]
        self.num_key_value_heads = self.num_attention_heads  # as transformers
        super().__post_init__()
        self.rope_interleave = False  # transformers' Hy v4 turns the two halves

    def validate(self) -> None:
        super().validate()
        positive_ints(self, ("hc_mult",))
        for name in ("hc_magnitude", "hc_eps", "swiglu_limit", "learnable_sink_init"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{self.source}: {name} must be a number, found {v!r}")


class HYV4Indexer(DSAIndexer):
    """DeepSeek-V3.2's indexer with RoPE on the last qk_rope_head_dim features and a key norm of rms_norm_eps."""

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.rms_norm_eps)

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        keep = self.head_dim - self.rope_dim
        return torch.cat((x[..., :keep], apply_rotary(x[..., keep:], cos, sin)), dim=-1)


class HYV4Attention(GlmMoeDsaAttention):
    """GLM-5's indexed (or sharing) latent attention with sinks and a sigmoid gate per head on its output."""

    indexer_class: ClassVar[type[DSAIndexer]] = HYV4Indexer

    def __init__(self, config: Any, layer_idx: int, slot: int):
        super().__init__(config, layer_idx, slot)
        self.gate_proj = Linear(config.hidden_size, self.num_heads * self.v_dim, bias=False)
        self.sinks = nn.Parameter(torch.full((self.num_heads,), float(config.learnable_sink_init)))

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * torch.sigmoid(self.gate_proj(x))


class HYV4Experts(Experts):
    """Routed experts whose SwiGLU clamps the gate before the activation: silu(min(gate, limit)) * clamp(up)."""

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return self.act_fn(gate) * up
        return self.act_fn(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)


def _mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """fn(x) / rms(x) in float32, x the flat streams (B, T, n * h)."""
    flat = x.float()
    return F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps)


def _weigh(pre: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """The streams of x (B, T, n * h) summed, weighted by pre (B, T, n): (B, T, h) in x's dtype."""
    B, T, _ = x.shape
    return (pre.unsqueeze(-1) * x.view(B, T, n, -1)).sum(2).to(x.dtype)


class HYV4HyperConnection(nn.Module):
    """One block's hyper-connection (module docstring): forward(x, block) with x the flat streams."""

    def __init__(self, config: Any):
        super().__init__()
        n = self.hc_mult = config.hc_mult
        self.hc_eps, self.norm_eps, self.magnitude = config.hc_eps, config.rms_norm_eps, config.hc_magnitude
        self.fn = nn.Parameter(torch.empty(2 * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty(2 * n))
        self.scale = nn.Parameter(torch.empty(2))

    def forward(self, x: torch.Tensor, block) -> torch.Tensor:
        n, (B, T, _) = self.hc_mult, x.shape
        pre_logits, post_logits = _mixes(x, self.fn, self.norm_eps).split(n, dim=-1)
        pre_b, post_b = self.base.float().split(n)
        scale = self.scale.float()
        pre = torch.sigmoid(pre_logits * scale[0] + pre_b) + self.hc_eps
        post = self.magnitude * torch.sigmoid(post_logits * scale[1] + post_b) + self.hc_eps
        y = block(_weigh(pre, x, n))
        out = post.unsqueeze(-1) * y.float().unsqueeze(-2) + x.view(B, T, n, -1).float()
        return out.to(x.dtype).reshape(B, T, -1)


class HYV4HyperHead(nn.Module):
    """The streams' last weighing into one (B, T, h)."""

    def __init__(self, config: Any):
        super().__init__()
        n = self.hc_mult = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = _mixes(x, self.hc_fn, self.norm_eps)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return _weigh(pre, x, self.hc_mult)


class HYV4DecoderLayer(GlmMoeDsaDecoderLayer):
    """Pre-norm indexed (or sharing) gated MLA with sinks, then a pre-norm dense MLP or the clamped mixture, each
    inside its hyper-connection."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_hc = HYV4HyperConnection(config)
        self.ffn_hc = HYV4HyperConnection(config)

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return HYV4Attention(config, layer_idx, config.num_hidden_layers + layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        block = grouped_moe_mlp(
            config, max(config.num_hidden_layers, config.first_k_dense_replace)
        )  # the mixture
        limit = config.swiglu_limit if config.swiglu_limit > 0 else None
        block.experts = HYV4Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                    config.hidden_act, limit=limit)  # fmt: skip
        return block

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.attn_hc(x, lambda y: self.self_attn(self.input_layernorm(y), ctx))
        return self.ffn_hc(x, lambda y: self.mlp(self.post_attention_layernorm(y)))


class HyperStreams:
    """A body whose residual is `hc_mult` streams, carried as one (B, T, hc_mult * h) tensor: the embeddings
    repeated into them; each layer's input shown in hidden_states as transformers' (B, T, hc_mult, h)."""

    def run(self, x: torch.Tensor, ctx, hidden_states: list | None = None) -> torch.Tensor:
        return super().run(x.repeat(1, 1, self.config.hc_mult), ctx, hidden_states)

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.config.hc_mult, -1))


class HYV4Model(HyperStreams, MixtralModel):
    """The embeddings repeated into hc_mult streams, the layers, `hc_head`, the final norm."""

    def __init__(self, config: Any):
        super().__init__(config, HYV4DecoderLayer)
        self.hc_head = HYV4HyperHead(config)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(x))


# transformers' conversion mapping for hy_v4, in its order: the "hc_pre" level dropped wherever it sits (the released
# files' `hc_attn_layer.hc_pre.hc_fn`, transformers' own `hc_pre.hc_attn_layer.hc_fn`), then the names; saved as
# transformers saves them
RENAMES = [
    Rename(r"\.hc_pre\.hc_", ".hc_", r"(?!)", ""),
    *(Rename(rf"\.hc_{disk}_layer\.hc_(fn|base|scale)$", rf".{ours}_hc.\1", rf"\.{ours}_hc\.(fn|base|scale)$",
             rf".hc_pre.hc_{disk}_layer.hc_\1") for disk, ours in (("attn", "attn"), ("mlp", "ffn"))),
    Rename(r"\.hc_head\.hc_head_(fn|base|scale)$", r".hc_head.hc_\1", r"^model\.hc_head\.hc_(fn|base|scale)$",
           r"model.hc_pre.hc_head.hc_head_\1"),
    Rename(r"\.self_attn\.learnable_sink_param$", ".self_attn.sinks", r"\.self_attn\.sinks$",
           ".self_attn.learnable_sink_param"),
    Rename(r"\.linear_gate\.", ".gate_proj.", r"\.gate_proj\.", ".linear_gate."),
]  # fmt: skip


class HYV4ForCausalLM(IndexedCausalLM):
    """transformers' HYV4ForCausalLM."""

    config_class = HYV4Config
    # the checkpoint's names (transformers' conversion mapping for hy_v4), experts stacked as transformers writes
    # them; the multi-token prediction layers skipped, as transformers; llama.cpp's tensors: the whole parameters
    # under ".weight", the experts, exp_probs_b and attn_k_b / attn_v_b assembled (GGUFExperts, GGUFMla)
    checkpoint_rules = CheckpointRules(
        [*RENAMES, Ignored(r"model\.mtp_layers\..*"), *hy_v4_gguf.GGUF_WHOLE, GGUFExperts(),
         *(r for r in GROUPED_MOE_RULES.rules if isinstance(r, (Rename, ExpProbsBias))), GGUFMla()]
    )  # fmt: skip
    # llama.cpp's HYV4Model converter: DeepSeek-V3.2's layout with the gate, sinks and hyper-connections (hy_v4_gguf)
    gguf = GGUFLayout(
        "hy_v4",
        config=DeepseekV3ForCausalLM.gguf.config + hy_v4_gguf.GGUF_CONFIG,
        layer=DeepseekV3ForCausalLM.gguf.layer + hy_v4_gguf.GGUF_LAYER,
        top=hy_v4_gguf.GGUF_TOP,
        fixed=(("attention_bias", False),),
        row_order=hy_v4_gguf.row_order,  # RoPE's rows as llama.cpp's pairs
        derive=hy_v4_gguf.derive,
        write_config=hy_v4_gguf.write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["HYV4DecoderLayer"]
    # as transformers keeps them (the hyper-connections, sinks, correction biases; not the indexer's projections)
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias", "attn_hc", "ffn_hc", "hc_head",
                                                         "sinks"]  # fmt: skip

    def __init__(self, config: HYV4Config):
        super().__init__(config, HYV4Model(config))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
        full = None
        for layer in self.model.layers:
            attn = layer.self_attn
            if attn.indexer is None:
                attn.source.append(full)
            else:
                full = attn
