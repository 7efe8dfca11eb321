"""Mistral 4 (Mistral Small 4, text model_type mistral4): DeepSeek-V3's layers (models.deepseek_v3: Multi-head
Latent Attention, a dense MLP below `first_k_dense_replace`, then routed experts plus `shared_experts`) with three
differences.

Llama 4's attention temperature, as Ministral 3 (models.ministral3): after RoPE, each query (its nope and rope parts)
is multiplied by 1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings)), both read
from rope_parameters. The scale travels with the RoPE tables (ministral3.Llama4ScaledRotary) and is applied to the
queries as DeepSeek-V3's attention hands them to the cache (`_ScaledQueries`).

The router (`mlp.gate`, no correction bias) takes a softmax over the experts (in the activations' dtype), keeps the
`topk_group` of `n_group` groups whose two best probabilities sum highest, the top `num_experts_per_tok`
probabilities among them, renormalised (+ 1e-20) when norm_topk_prob, times routed_scaling_factor.

transformers keeps the experts stacked on disk (`mlp.experts.gate_up_proj` (E, 2I, h), `mlp.experts.down_proj`) and
writes head_dim as qk_nope_head_dim + qk_rope_head_dim with rope_parameters' partial_rotary_factor the rope share of
it: the same RoPE tables as DeepSeek-V3's over qk_rope_head_dim.

The released checkpoints are image-text (model_type mistral3 with text_config's model_type mistral4): autolm runs
their language model (models.ministral3.Mistral3Config picks this family by text_config's model_type).

GGUF: llama.cpp's converter (conversion/mistral3.py, Mistral4Model: its DeepseekV2Model) writes "mistral4", which
llama.cpp runs as deepseek2: DeepSeek-V3's keys and names (kv_b_proj split into attn_k_b / attn_v_b), the stacked
experts as ffn_gate_up_exps / ffn_down_exps, no gating function (llama.cpp's softmax). The converter writes no
attention temperature (llama.cpp then scales no query: a file without it reads with llama_4_scaling_beta 0); GGUF out
writes it as llama.cpp's attention.temperature_scale / temperature_length, which its deepseek2 graph applies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, Rename, Router, SparseMoeBlock
from .base import CausalLM
from .deepseek_v2 import SOFTMAX_GATING
from .deepseek_v3 import SIGMOID_GATING, DeepseekV3Attention, DeepseekV3Config, DeepseekV3ForCausalLM, GGUFMla
from .deepseek_v3 import _gguf_config as _v3_gguf_config
from .deepseek_v3 import _gguf_write_config as _v3_gguf_write_config
from .image_text import IMAGE_TEXT_RULES
from .ministral3 import _BETA, _ORIGINAL, SCALE, Llama4ScaledRotary, rope_as_given
from .mixtral import MixtralDecoderLayer, MixtralModel

_PARTIAL = "partial_rotary_factor"


def _default_rope(max_position_embeddings: int) -> dict[str, Any]:
    """transformers' Mistral4Config RoPE where the config gives none (Mistral Small 4's settings)."""
    return {"type": "yarn", "rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, _ORIGINAL: 8192,
            "max_position_embeddings": max_position_embeddings, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale_all_dim": 1.0, "mscale": 1.0, _BETA: 0.1}  # fmt: skip


@dataclass(repr=False)
class Mistral4Config(DeepseekV3Config):
    """transformers' Mistral4Config: its fields and defaults (Mistral Small 4's sizes). As for DeepSeek-V3,
    `head_dim` holds qk_rope_head_dim (the RoPE tables' width); config.json's head_dim is qk_head_dim, as
    transformers writes it."""

    model_type: ClassVar[str] = "mistral4"

    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 256
    q_lora_rank: int | None = 1024
    v_head_dim: int = 128
    qk_nope_head_dim: int = 64
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 0
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 11
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_parameters: dict[str, Any] = field(default_factory=lambda: _default_rope(1048576))

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        base = super().read_rope
        return rope_as_given(d, cls.max_position_embeddings, _default_rope, lambda: base(d, source))

    def __post_init__(self) -> None:
        super().__post_init__()
        rope = self.rope_parameters
        if isinstance(rope, dict) and _is_number(self.qk_rope_head_dim) and _is_number(self.qk_nope_head_dim):
            rope.setdefault(_PARTIAL, self.qk_rope_head_dim / (self.qk_nope_head_dim + self.qk_rope_head_dim))

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        """The tables over qk_rope_head_dim (head_dim here): partial_rotary_factor, of qk_head_dim, already taken."""
        return {"default": {k: v for k, v in self.rope_parameters.items() if k != _PARTIAL}}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["head_dim"] = self.qk_head_dim
        if "num_nextn_predict_layers" not in self.extra:
            out.pop("num_nextn_predict_layers")  # DeepSeek-V3's, not transformers' Mistral 4's
        return out

    def validate(self) -> None:
        super().validate()
        rope = self.rope_parameters
        for key, positive in ((_BETA, False), (_ORIGINAL, True)):
            value = rope.get(key)
            if not _is_number(value) or value < 0 or (positive and value <= 0):
                raise ConfigError(f"{self.source}: rope_parameters[{key!r}] must be a "
                                  f"{'positive' if positive else 'non-negative'} number (Mistral 4's attention "
                                  f"temperature), found {value!r}")  # fmt: skip


class Mistral4TopkRouter(Router):
    """transformers' Mistral4TopkRouter (see the module docstring); no bias, no correction bias."""

    def __init__(self, config: Mistral4Config):
        c = config
        super().__init__(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, normalize=c.norm_topk_prob)
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scaling = float(c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = kernels.linear(x, self.weight, None).softmax(dim=-1)  # (N, E)
        choice = probs
        if self.n_group > 1:
            grouped = probs.view(-1, self.n_group, self.num_experts // self.n_group)
            best = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, groups)
            keep = torch.zeros_like(best).scatter_(1, best.topk(self.topk_group, dim=-1)[1], 1.0)
            choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, 0.0).view(-1, self.num_experts)
        ids = torch.topk(choice, self.top_k, dim=-1)[1]
        top = probs.gather(1, ids)
        if self.normalize:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, top * self.scaling

    def extra_repr(self) -> str:
        return f"{self.num_experts} experts, top {self.top_k}, groups {self.topk_group} of {self.n_group}"


class _ScaledQueries:
    """The forward's context, but for `attend`, which takes the queries times the position's temperature."""

    def __init__(self, ctx):
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def attend(self, layer_idx: int, q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._ctx.attend(layer_idx, q * self._ctx.rope[SCALE][0], *args, **kwargs)


class Mistral4Attention(DeepseekV3Attention):
    """DeepSeek-V3's latent attention with the queries scaled by position after RoPE."""

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return super().forward(x, _ScaledQueries(ctx))


class Mistral4DecoderLayer(MixtralDecoderLayer):
    """Pre-norm MLA, then a pre-norm dense MLP (layers below first_k_dense_replace) or mixture of experts."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return Mistral4Attention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if layer_idx < config.first_k_dense_replace:
            return GatedMLP(h, config.intermediate_size, act)
        experts = Experts(config.n_routed_experts, h, config.moe_intermediate_size, act)
        shared = GatedMLP(h, config.moe_intermediate_size * config.n_shared_experts, act)
        return SparseMoeBlock(Mistral4TopkRouter(config), experts, shared_experts=shared)


class Mistral4Model(MixtralModel):
    def __init__(self, config: Mistral4Config):
        super().__init__(config, Mistral4DecoderLayer)
        self.rotary = Llama4ScaledRotary(config)


# ---- GGUF: llama.cpp's Mistral4Model converter (arch "mistral4", DeepSeek-V3's layout) ---------------------------


def _gguf_config(d: dict[str, Any], get) -> None:
    """DeepSeek-V3's reading (models.deepseek_v3._gguf_config) of a softmax-routed file (no gating function, or the
    softmax's); the temperature's beta from attention.temperature_scale (none: 0, as llama.cpp scales no query) over
    attention.temperature_length, which must be YaRN's original context length where both are given."""
    gating = get("expert_gating_func")
    if gating not in (None, SOFTMAX_GATING):
        raise ConfigError(
            f"expert_gating_func {gating!r}: Mistral 4 routes with the softmax ({SOFTMAX_GATING})"
        )
    _v3_gguf_config(d, lambda key, *a: SIGMOID_GATING if key == "expert_gating_func" else get(key, *a))
    rope = d["rope_parameters"]
    beta, length = get("attention.temperature_scale"), get("attention.temperature_length")
    rope[_BETA] = float(beta) if _is_number(beta) else 0.0
    if rope[_BETA] and length is not None and rope.setdefault(_ORIGINAL, length) != length:
        raise ConfigError(f"attention.temperature_length {length} differs from rope.scaling.original_context_length "
                          f"{rope[_ORIGINAL]}: Mistral 4 reads both as original_max_position_embeddings")  # fmt: skip
    if rope.get(_ORIGINAL) is None:
        rope[_ORIGINAL] = length if length is not None else d.get("max_position_embeddings")


def _gguf_write_config(m: dict[str, Any], c: Mistral4Config) -> None:
    """DeepSeek-V3's keys (models.deepseek_v3._gguf_write_config) and the attention temperature as llama.cpp's
    deepseek2 graph reads it (none where the beta is 0)."""
    _v3_gguf_write_config(m, c)
    rope = c.rope_parameters
    if rope[_BETA]:
        m["attention.temperature_scale"] = float(rope[_BETA])
        m["attention.temperature_length"] = int(rope[_ORIGINAL])


def _gguf_layout():
    """DeepSeek-V3's layout under "mistral4": the experts stacked as transformers keeps them (ffn_gate_up_exps), no
    router correction bias."""
    v3 = DeepseekV3ForCausalLM.gguf
    experts = (("ffn_gate_up_exps", "mlp.experts.gate_up_proj"), ("ffn_down_exps", "mlp.experts.down_proj"))
    skip = ("exp_probs_b", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    return dataclasses.replace(
        v3,
        arch="mistral4",
        layer=(*(kv for kv in v3.layer if kv[0] not in skip), *experts),
        derive=_gguf_config,
        write_config=_gguf_write_config,
        claim=None,
    )


def _whole(name: str) -> Rename:
    """llama.cpp's stacked experts (blk.N.ffn_*_exps.weight) read as the parameter itself."""
    return Rename(rf"\.mlp\.experts\.{name}\.weight$", f".mlp.experts.{name}", r"(?!)", "")


class Mistral4ForCausalLM(CausalLM):
    """transformers' Mistral4ForCausalLM."""

    config_class = Mistral4Config
    # the image-text checkpoints' language model; llama.cpp's stacked experts and attn_k_b / attn_v_b (GGUFMla)
    checkpoint_rules = CheckpointRules(
        [*IMAGE_TEXT_RULES, _whole("gate_up_proj"), _whole("down_proj"), GGUFMla()]
    )
    gguf = _gguf_layout()
    # transformers' plan, as DeepSeek-V3's (models.deepseek_v3)
    tp_patterns: ClassVar[dict[str, str]] = DeepseekV3ForCausalLM.tp_patterns
    _no_split_modules: ClassVar[list[str]] = ["Mistral4DecoderLayer"]

    def __init__(self, config: Mistral4Config):
        super().__init__(config, Mistral4Model(config))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
