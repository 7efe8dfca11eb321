"""Inkling 2 (Thinking Machines; transformers' Inkling2ForCausalLM, "inkling2_text"): Inkling's attention with
relative logits and short convolutions (models.inkling), reworked, and block attention residuals; no RoPE.

- Block attention residuals: the body carries a stack of block states beside the hidden state, one entry per
  `n_layers_per_attn_res_block` layers (a boundary layer, i % n == 0, pushes its input; its own residual restarts
  from its attention's output). A layer's inputs are learned queries attending, per token, over the stack and the
  current (partial) state, each unweighted-RMS-normed (`attention_input`: one query on sliding layers, three on
  full ones, for q / k / v; none on layer 0; `mlp_input`; the body's `final_input` before the final norm). Each
  token reads only its own stack: per-token data, carried here as one (B, T, (1 + S) * h) tensor (S: the number of
  blocks) through the layers, so the one-token and compiled steps run the same layers.
- Attention (`hybrid_sliding` / `hybrid` layers, their own `swa_*` sizes): scale head_dim ** -0.5; q and the
  relative states scaled per head (`q_l2_clip.scale`, `rel_l2_clip.scale`) and L2-clipped (qk_l2_clip_threshold,
  rel_l2_clip_threshold), k clipped; values unweighted-RMS-normed; a per-token sink logit per head (`sink_proj`); the
  output gated by sigmoid(`gate_proj`); on full layers queries and relative states times 1 + alpha *
  log(max(1, (position + 1) / log_scaling_n_floor)), and dynamic short convolutions of keys and values: taps
  `static_weight` + `weight_proj`(k / v input) per KV head, (x + conv) / sqrt(2K + 1). The other short convolutions
  (sliding keys / values, after attention, after the MLP) give (x + conv(x)) / sqrt(K + 1); states in the cache.
- MoE on every layer: DeepSeek-V4's router in fp32 (score function, correction bias, renormalised, route_scale),
  experts gate_softcap(g) * sigmoid(g) * up_softcap(u) (softcap: c * tanh(x / c)), summed in fp32.
- Embeddings RMS-normed; logits soft-capped at final_logit_softcapping, cut to unpadded_vocab_size; never tied.
  transformers writes the original layout (`model.llm.*`, interleaved expert gate/up rows, `attn_res.*` queries):
  read here (models.inkling2_layout); saved under transformers' module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import RMSNorm, Rotary
from ..nn.moe import SparseMoeBlock
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig
from .inkling import LAYER_KINDS, InklingNormedEmbedding, WholeAttentionTP, check_sizes
from .inkling2_layers import (
    BlockAttentionResidual,
    Inkling2Attention,
    Inkling2Experts,
    Inkling2Router,
    Inkling2ShortConvolution,
    softcap,
)
from .inkling2_layout import Inkling2LayoutRules


@dataclass(repr=False)
class Inkling2TextConfig(PretrainedConfig):
    """transformers' Inkling2TextConfig: `sliding_window_size` is autolm's sliding_window; config.json's
    `sconv_kernel_size` / `model_max_length` / `num_local_experts` / `routed_scaling_factor` read as transformers
    reads them."""

    model_type: ClassVar[str] = "inkling2_text"
    attribute_map: ClassVar[dict[str, str]] = {"sliding_window": "sliding_window_size"}
    layer_kinds: ClassVar[tuple[str, ...]] = LAYER_KINDS
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    absent_keys: ClassVar[tuple[str, ...]] = ("tie_word_embeddings", "intermediate_size")
    original_names: ClassVar[dict[str, str]] = {
        "sconv_kernel_size": "conv_kernel_size",
        "model_max_length": "max_position_embeddings",
        "num_local_experts": "n_routed_experts",
        "routed_scaling_factor": "route_scale",
    }

    vocab_size: int = 201024
    unpadded_vocab_size: int | None = 200058
    hidden_size: int = 4608
    num_hidden_layers: int = 48
    num_attention_heads: int = 48
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    swa_num_attention_heads: int = 48
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 128
    sliding_window: int | None = 1024
    d_rel: int = 16
    rel_extent: int = 1024
    log_scaling_n_floor: int | None = 128000
    log_scaling_alpha: float = 0.1
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    conv_kernel_size: int = 4
    moe_intermediate_size: int = 2304
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    route_scale: float = 8.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 200006
    qk_l2_clip_threshold: float = 22.627416997969522
    rel_l2_clip_threshold: float = 8.0
    n_layers_per_attn_res_block: int = 6
    mlp_gate_softcap: float = 4.0
    mlp_up_softcap: float = 25.0
    final_logit_softcapping: float = 30.0
    scoring_func: str = "sigmoid"

    def __post_init__(self) -> None:
        for theirs, ours in self.original_names.items():
            if theirs in self.extra:
                setattr(self, ours, self.extra.pop(theirs))
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:
            self.layer_types = [LAYER_KINDS[bool((i + 1) % 6)] for i in range(n)]
        super().__post_init__()

    sliding_window_size = property(lambda self: self.sliding_window)  # transformers' names
    routed_scaling_factor = property(lambda self: self.route_scale)
    num_blocks = property(lambda self: -(-self.num_hidden_layers // self.n_layers_per_attn_res_block))

    def is_sliding(self, i: int) -> bool:
        return self.layer_types[i] == "hybrid_sliding"

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.is_sliding(i) else None

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # relative logits, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("rope_parameters", "rope_theta", "rope_scaling"):
            out.pop(key, None)
        return out

    def validate(self) -> None:
        super().validate()
        src = self.source
        check_sizes(self, ("n_layers_per_attn_res_block",))
        if self.scoring_func not in ("sigmoid", "sqrtsoftplus"):
            raise ConfigError(
                f"{src}: scoring_func must be 'sigmoid' or 'sqrtsoftplus', found {self.scoring_func!r}"
            )
        for name in ("route_scale", "log_scaling_alpha", "qk_l2_clip_threshold", "rel_l2_clip_threshold",
                     "mlp_gate_softcap", "mlp_up_softcap", "final_logit_softcapping"):  # fmt: skip
            v = getattr(self, name)
            if not _is_number(v) or (v <= 0 and name != "log_scaling_alpha"):
                raise ConfigError(f"{src}: {name} must be a positive number, found {v!r}")
        for name, top in (("log_scaling_n_floor", None), ("unpadded_vocab_size", self.vocab_size)):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v > 0 and (top is None or (_is_int(v) and v <= top))):
                raise ConfigError(f"{src}: {name} must be null or a positive number"
                                  f"{'' if top is None else f' up to vocab_size ({top})'}, found {v!r}")  # fmt: skip


class Inkling2DecoderLayer(nn.Module):
    """transformers' Inkling2SlidingDecoderLayer / Inkling2FullDecoderLayer over the carried (B, T, (1 + S) * h)
    tensor: the hidden state, then the block stack (module docstring); four convolution states in the cache."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps, K, n = (
            config.hidden_size,
            config.rms_norm_eps,
            config.conv_kernel_size,
            config.n_layers_per_attn_res_block,
        )
        self.layer_idx, self.hidden = layer_idx, h
        self.blocks, self.boundary = -(-layer_idx // n), layer_idx % n == 0  # blocks before this layer
        self.full = not config.is_sliding(layer_idx)
        self.attention_input = BlockAttentionResidual(h, 3 if self.full else 1) if layer_idx > 0 else None
        self.mlp_input = BlockAttentionResidual(h)
        self.self_attn = Inkling2Attention(config, layer_idx)
        self.mlp = SparseMoeBlock(Inkling2Router(config), Inkling2Experts(config))
        norms = (
            ("q_input_layernorm", "k_input_layernorm", "v_input_layernorm")
            if self.full
            else ("input_layernorm",)
        )
        for name in (*norms, "post_attention_layernorm"):
            setattr(self, name, RMSNorm(h, eps, weight_in_fp32=True))
        self.post_attention_convolution = Inkling2ShortConvolution(h, K)
        self.post_mlp_convolution = Inkling2ShortConvolution(h, K)

    def attend(self, x: torch.Tensor, blocks: torch.Tensor, ctx, old, real):
        dtype = x.dtype
        inputs = (x,) * 3 if self.attention_input is None else self.attention_input(blocks, x)
        if not self.full:
            return self.self_attn(self.input_layernorm(inputs[0]).to(dtype), ctx, old, real)
        q, k, v = (norm(y).to(dtype) for norm, y in zip(
            (self.q_input_layernorm, self.k_input_layernorm, self.v_input_layernorm), inputs))  # fmt: skip
        return self.self_attn(q, ctx, old, real, k, v)

    def forward(self, carried: torch.Tensor, ctx) -> torch.Tensor:
        h, nb = self.hidden, self.blocks
        x, dtype = carried[..., :h], carried.dtype
        blocks = carried[..., h : h * (1 + nb)].unflatten(-1, (nb, h))
        old = ctx.state(self.layer_idx) or (None,) * 4
        real = ctx.real_tokens()
        y, kv_states = self.attend(x, blocks, ctx, old[:2], real)
        y, attn_state = self.post_attention_convolution(y, real, old[2])
        residual = y.float()
        if self.boundary:
            blocks = torch.cat([blocks, x[..., None, :]], dim=-2)
        else:
            residual = x.float() + residual
        m = self.mlp(self.post_attention_layernorm(self.mlp_input(blocks, residual)[0]).to(dtype))
        m, mlp_state = self.post_mlp_convolution(m, real, old[3])
        ctx.keep_state(self.layer_idx, (*kv_states, attn_state, mlp_state))
        rest = carried[..., h * (1 + nb) :]
        pushed = (x,) if self.boundary else ()
        return torch.cat([(residual + m).to(dtype), carried[..., h : h * (1 + nb)], *pushed,
                          rest[..., h * len(pushed) :]], dim=-1)  # fmt: skip


class LogScaling(Rotary):
    """No RoPE; the full layers' log scaling of positions as a table: "log_scaling" -> (tau, tau), tau (B, T, 1, 1)
    in fp32."""

    def __init__(self, config: Any):
        super().__init__({"log_scaling": {}}, 1, config.max_position_embeddings)
        self.floor, self.alpha = config.log_scaling_n_floor or 1.0, float(config.log_scaling_alpha)

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        ratio = ((position_ids + 1).float() / self.floor).clamp(min=1.0)
        tau = (1.0 + self.alpha * torch.log(ratio))[..., None, None]
        return {"log_scaling": (tau, tau)}


class Inkling2Model(DecoderModel):
    """Normed embeddings, the layers over the carried hidden state and block stack, `final_input`, the norm."""

    def __init__(self, config: Any):
        super().__init__(config, Inkling2DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                               weight_in_fp32=True))  # fmt: skip
        self.embed_tokens = InklingNormedEmbedding(config.vocab_size, config.hidden_size, config.rms_norm_eps)
        self.embed_tokens.embed_norm.weight_in_fp32 = True
        self.final_input = BlockAttentionResidual(config.hidden_size)
        self.rotary = LogScaling(config)

    @property
    def carried_width(self) -> int:
        return self.config.hidden_size * (1 + self.config.num_blocks)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The input vectors and an empty block stack (zeros), carried as one tensor."""
        return torch.cat([x, x.new_zeros(*x.shape[:-1], self.carried_width - x.shape[-1])], dim=-1)

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.config.hidden_size]

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        h = self.config.hidden_size
        out = self.final_input(x[..., h:].unflatten(-1, (-1, h)), x[..., :h])[0]
        return self.norm(out).to(x.dtype)


class Inkling2Config(ImageTextConfig):
    """transformers' Inkling2Config (the image-text model): its language model's."""

    model_type: ClassVar[str] = "inkling2"
    text_class: ClassVar[type] = Inkling2TextConfig


class Inkling2ForCausalLM(WholeAttentionTP, CausalLM):
    """transformers' Inkling2ForCausalLM."""

    config_class = Inkling2TextConfig
    recurrent: ClassVar[bool] = True
    checkpoint_rules = Inkling2LayoutRules()
    # transformers' plan cuts the experts only (Experts.shard: each expert's intermediate rows); here also o_proj,
    # row-parallel over the whole attention output (rowwise_split). Attention itself (its per-head clips and sinks,
    # the dynamic convolutions), the block stack, the layer's convolutions and the router stay whole on every rank
    tp_patterns: ClassVar[dict[str, str]] = {"layers.*.self_attn.o_proj": "rowwise_split"}
    _no_split_modules: ClassVar[list[str]] = ["Inkling2DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = [
        "e_score_correction_bias", "mlp.gate.weight", "post_attention_convolution", "post_mlp_convolution",
        "k_sconv.conv1d", "v_sconv.conv1d", "attention_input", "mlp_input", "final_input"]  # fmt: skip

    def __init__(self, config: Any):
        super().__init__(config, Inkling2Model(config))

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = softcap(logits.float(), self.config.final_logit_softcapping)
        n = self.config.unpadded_vocab_size
        return logits[..., :n] if n is not None and n < logits.shape[-1] else logits
