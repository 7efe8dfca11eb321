"""Phi-3.5-MoE and Phi-tiny-MoE (`phimoe`): Mixtral's layer (attention, then a sparse mixture of experts) with
Phi's differences:

- LayerNorm with bias (not RMSNorm) before attention, before the experts and at the end, epsilon `rms_norm_eps`;
- q/k/v/o biases (`attention_bias`) and a bias on the LM head (`lm_head_bias`);
- RoPE, default or LongRoPE as transformers' Phi-MoE computes it: the inverse frequencies from the short factors
  at every length, the cos/sin tables times `short_mscale`, or `long_mscale` once the sequence is longer than
  original_max_position_embeddings (transformers then drops its cache and recomputes, as for Phi-3: see
  autolm.generation.restart);
- sparsemixer routing to two experts (the router is `mlp.router`): the first is the top logit, weighted by the
  softmax over the logits within a relative distance 2 * `router_jitter_noise` of it, taken at it; the second
  the top of the other logits, weighted the same way among them. The weights are not renormalised and keep the
  logits' dtype. In training the two are drawn by Gumbel sampling and the gradient follows transformers'
  sparsemixer estimate; `input_jitter_noise` scales the block's input by uniform noise, twice (block and router).

Checkpoints on the Hub (and transformers' save_pretrained) keep Mixtral's names: `block_sparse_moe.gate` for the
router and one w1/w2/w3 tensor per expert; the model holds transformers 5's `mlp.router` and stacked
`mlp.experts.gate_up_proj` / `mlp.experts.down_proj`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    GGUFLayout,
    Linear,
    Rename,
    Router,
    SparseMoeBlock,
    Stacked,
    resize_bias,
)
from ..nn.expert_formats import GGUFExperts
from ..nn.rope import Rotary, cos_sin, inv_freq_and_scale
from .base import CausalLM, DecoderModel
from .mixtral import MOE_TP, validate_experts

ORIGINAL = "original_max_position_embeddings"
DEFAULT_JITTER = 0.01  # transformers' router_jitter_noise: the routing threshold a GGUF file cannot hold


@dataclass(repr=False)
class PhimoeConfig(PretrainedConfig):
    """transformers' PhimoeConfig. LongRoPE needs short/long factors (one per pair of head dimensions) and
    short_mscale / long_mscale; its original length is rope_parameters' (else max_position_embeddings), also
    written top-level as transformers does."""

    model_type: ClassVar[str] = "phimoe"
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", ORIGINAL)  # written only where set
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "lm_head_bias",
        "output_router_logits",
    )
    default_theta: ClassVar[float] = 1e6

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    num_experts_per_tok: int = 2
    num_local_experts: int = 16
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = DEFAULT_JITTER
    input_jitter_noise: float = 0.0
    attention_bias: bool = False
    lm_head_bias: bool = False
    original_max_position_embeddings: int | None = None
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6}
    )

    def __post_init__(self) -> None:
        rope = self.rope_parameters
        if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
            self.rope_parameters = rope = {ORIGINAL: self.max_position_embeddings, **rope}
            self.original_max_position_embeddings = rope[ORIGINAL]
        super().__post_init__()

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window  # every layer, when set

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        if self.num_experts_per_tok != 2 or self.num_local_experts < 2:
            raise ConfigError(f"{src}: Phi-MoE's sparsemixer routes every token to 2 of at least 2 experts: "
                              f"num_experts_per_tok must be 2 and num_local_experts at least 2, found "
                              f"{self.num_experts_per_tok!r} of {self.num_local_experts!r}")  # fmt: skip
        for name in ("router_jitter_noise", "input_jitter_noise"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v < 1:
                raise ConfigError(f"{src}: {name} must be a number in [0, 1), found {v!r}")
        if not _is_number(self.router_aux_loss_coef):
            raise ConfigError(
                f"{src}: router_aux_loss_coef must be a number, found {self.router_aux_loss_coef!r}"
            )
        self._validate_rope()

    def _validate_rope(self) -> None:
        src, rope = self.source, self.rope_parameters
        if rope.get("rope_type") not in ("default", "longrope"):
            raise ConfigError(
                f"{src}: Phi-MoE's RoPE type must be 'default' or 'longrope', found {rope.get('rope_type')!r}"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{src}: Phi-MoE rotates whole heads: RoPE partial_rotary_factor must be 1.0, found "
                              f"{rope['partial_rotary_factor']!r}")  # fmt: skip
        if rope["rope_type"] != "longrope":
            return
        if not _is_int(rope[ORIGINAL]) or rope[ORIGINAL] <= 0:
            raise ConfigError(f"{src}: RoPE {ORIGINAL} must be a positive integer, found {rope[ORIGINAL]!r}")
        for name in ("short_factor", "long_factor"):
            f = rope.get(name)
            if not (
                isinstance(f, list)
                and len(f) == self.head_dim // 2
                and all(_is_number(x) and x > 0 for x in f)
            ):
                raise ConfigError(f"{src}: RoPE {name} must be a list of {self.head_dim // 2} positive numbers "
                                  f"(one per pair of head dimensions), found {str(f)[:200]}")  # fmt: skip
        for name in ("short_mscale", "long_mscale"):
            if not _is_number(rope.get(name)):
                raise ConfigError(f"{src}: LongRoPE needs a number as RoPE {name}, found {rope.get(name)!r}")


class PhimoeRotary(Rotary):
    """Rotary tables as transformers' Phi-MoE makes them: LongRoPE's short factors at every length, the tables
    scaled by short_mscale, or by long_mscale for a forward whose last position is past the original length."""

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        rope = self.kinds["default"]
        if rope.get("rope_type") != "longrope":
            return super().tables(position_ids, dtype)
        key = self._seq_key(rope, position_ids)  # original + 1 past the original length, else 0
        cached = self._freqs.get("default")
        if cached is None or cached[2] != key or cached[0].device != position_ids.device:
            inv_freq, _ = inv_freq_and_scale(rope, self.head_dim, self.max_pos)  # the short factors
            scale = float(rope["long_mscale"] if key else rope["short_mscale"])
            cached = self._freqs["default"] = (inv_freq.to(position_ids.device), scale, key)
        cos, sin = cos_sin(position_ids, cached[0], cached[1], dtype)
        return {"default": (cos.unsqueeze(1), sin.unsqueeze(1))}


class _Multiplier(torch.autograd.Function):
    """transformers' PhimoeMultiplier: forward multiplier * mask_for_one; backward the sparsemixer estimate of the
    gradient with respect to the router's logits."""

    @staticmethod
    def forward(ctx, scores, multiplier, selected, masked_gates, mask_for_one):
        ctx.save_for_backward(multiplier, selected, masked_gates)
        return multiplier * mask_for_one

    @staticmethod
    def backward(ctx, grad):
        multiplier, selected, masked_gates = ctx.saved_tensors
        grad = grad * multiplier
        out = masked_gates * grad.mul(-1)
        out.scatter_add_(dim=-1, index=selected, src=grad)
        return out, None, None, None, None


class SparseMixerRouter(Router):
    """Phi-MoE's sparsemixer over the logits x @ weight.T (see the module docstring), in the logits' dtype."""

    def __init__(self, hidden: int, num_experts: int, jitter_eps: float):
        super().__init__(hidden, num_experts, 2)
        self.jitter_eps = jitter_eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (expert ids (N, 2), weights (N, 2))."""
        scores = kernels.linear(x, self.weight, self.bias)
        first, w1 = self._pick(scores, scores)
        second, w2 = self._pick(scores, torch.scatter(scores, -1, first, float("-inf")), second=True)
        return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1)

    def _pick(
        self, scores: torch.Tensor, candidates: torch.Tensor, second: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert among `candidates` (the logits, the ones already chosen at -inf) and its weight; training
        draws its random numbers as transformers does (the second pick's uniform ones twice)."""
        with torch.no_grad():
            top, ids = candidates.max(dim=-1, keepdim=True)
            factor = scores.abs().clamp(min=top)
            far = ((top - scores) / factor) > (2 * self.jitter_eps)
        gates = candidates.masked_fill(far, float("-inf"))
        if self.training:  # Gumbel sampling
            noise = torch.empty_like(gates, memory_format=torch.legacy_contiguous_format).exponential_().log()
            ids = (gates - noise).max(dim=-1)[1].unsqueeze(-1)
        gates = torch.softmax(gates, dim=-1)
        weight = gates.gather(dim=-1, index=ids)
        if not self.training:
            return ids, weight
        best = gates.max(dim=-1, keepdim=True)[1]
        uniform = torch.rand_like(weight).uniform_() if second else torch.rand_like(weight)
        mask_for_one = torch.logical_or(ids == best, uniform > 0.75)  # Heun's third-order method
        mask_for_one = torch.add(0.3333, mask_for_one, alpha=0.6667).type_as(gates)
        return ids, _Multiplier.apply(scores, weight, ids, gates, mask_for_one)

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, sparsemixer top 2, jitter {self.jitter_eps}"


class PhimoeSparseMoeBlock(SparseMoeBlock):
    """The router `router` and the experts; training scales the input by uniform noise in [1 - input_jitter_noise,
    1 + input_jitter_noise] twice, as transformers' block and router each do (in place, so the experts see both)."""

    def __init__(self, config: PhimoeConfig):
        router = SparseMixerRouter(config.hidden_size, config.num_local_experts, config.router_jitter_noise)
        experts = Experts(
            config.num_local_experts, config.hidden_size, config.intermediate_size, config.hidden_act
        )
        super().__init__(router, experts, router_name="router")
        self.input_jitter_noise = config.input_jitter_noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.input_jitter_noise > 0:
            for _ in range(2):
                x = x * torch.empty_like(x).uniform_(
                    1.0 - self.input_jitter_noise, 1.0 + self.input_jitter_noise
                )
        return super().forward(x)


class PhimoeDecoderLayer(nn.Module):
    """Pre-LayerNorm attention with biases, then the pre-LayerNorm sparse mixture of experts."""

    def __init__(self, config: PhimoeConfig, layer_idx: int):
        super().__init__()
        h, bias = config.hidden_size, config.attention_bias
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                   layer_idx, bias=bias, o_bias=bias, window=config.layer_window(layer_idx))  # fmt: skip
        self.mlp = PhimoeSparseMoeBlock(config)
        self.input_layernorm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class PhimoeModel(DecoderModel):
    def __init__(self, config: PhimoeConfig):
        super().__init__(
            config, PhimoeDecoderLayer, nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        )
        self.rotary = PhimoeRotary(config.rope_kinds(), config.head_dim, config.max_position_embeddings)


def _long_attn_factor(c: Any) -> float:
    """The attention factor llama.cpp's Phi3MiniModel converter writes: LongRoPE's default from the lengths."""
    original = c.original_max_position_embeddings
    scale = c.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's reading: factors in the file mean LongRoPE, both scales its rope.scaling.attn_factor; a window
    of 0 means none; rope.dimension_count is the head size."""
    rope = d["rope_parameters"]
    if "long_factor" in rope or "short_factor" in rope:
        rope["rope_type"] = "longrope"
        rope[ORIGINAL] = d.get(ORIGINAL)
        factor = get("rope.scaling.attn_factor")
        rope["short_mscale"] = rope["long_mscale"] = float(factor) if _is_number(factor) else 1.0
    if not d.get("sliding_window"):
        d["sliding_window"] = None


def gguf_write_config(m: dict[str, Any], c: PhimoeConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's PhiMoeModel (a Phi3MiniModel) writes it: the rotary dimensions,
    a window of 0 for none, LongRoPE's default attention factor; no vocabulary or head size. What the file cannot
    hold is refused: mscales other than that factor, and a routing threshold other than the released models'."""
    for key in ("vocab_size", "attention.key_length", "attention.value_length"):
        m.pop(key, None)
    m["rope.dimension_count"] = c.hidden_size // c.num_attention_heads
    m["attention.sliding_window"] = c.sliding_window or 0
    rope = c.rope_parameters
    if rope.get("rope_type") == "longrope":
        factor = _long_attn_factor(c)
        m["rope.scaling.attn_factor"] = factor
        if any(not math.isclose(rope[k], factor, rel_tol=1e-6) for k in ("short_mscale", "long_mscale")):
            raise ConfigError(f"phimoe: llama.cpp's converter writes the RoPE attention factor {factor} (from the "
                              f"lengths), not short_mscale / long_mscale ({rope['short_mscale']}, "
                              f"{rope['long_mscale']})")  # fmt: skip
    if not math.isclose(c.router_jitter_noise, DEFAULT_JITTER):
        raise ConfigError(f"phimoe: a GGUF file cannot hold router_jitter_noise {c.router_jitter_noise} (it is "
                          f"read back as {DEFAULT_JITTER})")  # fmt: skip


class PhimoeForCausalLM(CausalLM):
    """transformers' PhimoeForCausalLM: the LM head has a bias where `lm_head_bias`."""

    config_class = PhimoeConfig
    checkpoint_rules = CheckpointRules(
        [
            Rename(
                r"\.block_sparse_moe\.gate\.", ".mlp.router.", r"\.mlp\.router\.", ".block_sparse_moe.gate."
            ),
            Rename(r"\.block_sparse_moe\.", ".mlp.", r"\.mlp\.", ".block_sparse_moe."),
            Stacked("gate_up_proj", ("w1.weight", "w3.weight")),
            Stacked("down_proj", ("w2.weight",)),
            GGUFExperts(),
        ]
    )
    # llama.cpp's PhiMoeModel: Phi-3's metadata and LongRoPE factor tensors, Mixtral's stacked experts, every
    # bias present (its loader requires them)
    gguf = GGUFLayout(
        "phimoe",
        config=(
            ("rope.scaling.original_context_length", ORIGINAL),
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
        ),
        layer=(
            ("ffn_gate_inp", "mlp.router"),
            ("ffn_gate_exps", "mlp.experts.gate_proj"),
            ("ffn_up_exps", "mlp.experts.up_proj"),
            ("ffn_down_exps", "mlp.experts.down_proj"),
        ),
        fixed=(("attention_bias", True), ("lm_head_bias", True)),
        rope_tensors=(
            ("rope_factors_long.weight", "long_factor"),
            ("rope_factors_short.weight", "short_factor"),
        ),
        derive=gguf_config,
        write_config=gguf_write_config,
    )
    tp_patterns: ClassVar[dict[str, str]] = MOE_TP
    _no_split_modules: ClassVar[list[str]] = ["PhimoeDecoderLayer"]

    def __init__(self, config: PhimoeConfig):
        super().__init__(config, PhimoeModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """CausalLM's resizing, and the head's bias resized as transformers resizes it: added entries are the old
        entries' mean (zeros without mean_resizing)."""
        bias = self.lm_head.bias
        emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(self.lm_head, bias, emb.weight.shape[0], mean_resizing)
        return emb
