"""Hunyuan MoE (Tencent's Hunyuan-A13B): the Hunyuan dense decoder layer (grouped-query attention with an RMSNorm
over each query head and each key head applied AFTER RoPE, biases on q/k/v/o where `attention_bias`, NTK-alpha
RoPE; see models.hunyuan_v1_dense) whose MLP is, in every layer, a mixture of `num_experts` SiLU-gated experts plus
one shared MLP that every token passes (`mlp.shared_mlp`, ungated, added to the experts' sum).

The router (`mlp.gate.wg`, its weight kept in fp32 as transformers creates it) takes the softmax over all experts
in fp32, the top `moe_topk` (one number, or one per layer as the released config.json lists them) and always
renormalises them; the weights stay fp32 where the router's weight is. Both the experts and the shared MLP are
`intermediate_size` wide: transformers reads neither `moe_intermediate_size` nor `num_shared_expert`, which the
released configs list per layer (a width other than intermediate_size, or a shared-expert count other than one,
is refused by name, as are the original code's switches transformers does not implement: cross-layer attention,
MLA, no q/k norms, no shared MLP).

Checkpoints on the Hub and transformers' save_pretrained keep one gate/up/down tensor per expert
(`mlp.experts.3.gate_proj.weight`); the model stacks them (transformers 5's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import Experts, GatedMLP, GGUFLayout, RMSNorm, Router, SparseMoeBlock
from .base import CausalLM, DecoderModel
from .hunyuan_v1_dense import (
    HunYuanDenseV1Attention,
    HunYuanDenseV1Config,
    HunYuanDenseV1DecoderLayer,
    ntk_alpha_theta,
)
from .mixtral import MOE_TP
from .qwen2_moe import QWEN_MOE_RULES

# llama.cpp's converter (HunYuanMoEModel) for dynamic RoPE: the alpha it takes where the config gives none
CONVERTER_ALPHA = 1000
# the original code's switches (config.json keys transformers ignores) and the value transformers' model implements
_SWITCHES = (("use_cla", False), ("use_mla", False), ("use_qk_norm", True), ("use_mixed_mlp_moe", True))


@dataclass(repr=False)
class HunYuanMoEV1Config(HunYuanDenseV1Config):
    """transformers' HunYuanMoEV1Config: the dense Hunyuan fields, `sep_token_id`, and the experts: `num_experts`
    (one number for every layer) and `moe_topk` (one number, or a list with one entry per layer)."""

    model_type: ClassVar[str] = "hunyuan_v1_moe"
    bool_fields: ClassVar[tuple[str, ...]] = (*HunYuanDenseV1Config.bool_fields, "output_router_logits")
    num_experts: int = 1
    moe_topk: int | list[int] = 1
    sep_token_id: int | None = 4
    output_router_logits: bool = False

    def layer_topk(self, i: int) -> int:
        """The number of experts each token uses in layer i."""
        return self.moe_topk if _is_int(self.moe_topk) else self.moe_topk[i]

    # transformers' attribute_map (read-only here)
    num_experts_per_tok = property(lambda self: self.moe_topk)
    num_local_experts = property(lambda self: self.num_experts)

    def validate(self) -> None:
        super().validate()
        n, topk, layers = self.num_experts, self.moe_topk, self.num_hidden_layers
        if isinstance(n, list):
            raise ConfigError(f"{self.source}: num_experts must be one number for every layer (transformers "
                              f"builds every layer's experts alike), found a list {n!r}")  # fmt: skip
        if not _is_int(n) or not 0 < n <= 4096:
            raise ConfigError(f"{self.source}: num_experts must be a positive integer, found {n!r}")
        if isinstance(topk, list) and len(topk) < layers:
            raise ConfigError(f"{self.source}: moe_topk must be an integer or a list of one per layer "
                              f"({layers}), found {topk!r}")  # fmt: skip
        for k in topk if isinstance(topk, list) else [topk]:
            if not _is_int(k) or not 0 < k <= n:
                raise ConfigError(f"{self.source}: moe_topk must hold integers in [1, num_experts = {n}], "
                                  f"found {topk!r}")  # fmt: skip
        self._validate_released_keys()

    def _validate_released_keys(self) -> None:
        """The released config.json's keys transformers ignores: refused where they say something else than what
        transformers builds."""
        width = self.extra.get("moe_intermediate_size")
        if width is not None and any(w != self.intermediate_size for w in _per_layer(width)):
            raise ConfigError(f"{self.source}: moe_intermediate_size must equal intermediate_size "
                              f"({self.intermediate_size}; transformers builds the experts that wide), "
                              f"found {width!r}")  # fmt: skip
        shared = self.extra.get("num_shared_expert")
        if shared is not None and any(s != 1 for s in _per_layer(shared)):
            raise ConfigError(f"{self.source}: num_shared_expert must be 1 in every layer (transformers builds "
                              f"one shared MLP), found {shared!r}")  # fmt: skip
        for key, value in _SWITCHES:
            if key in self.extra and self.extra[key] is not value:
                raise ConfigError(f"{self.source}: {key} must be {str(value).lower()} (the only setting "
                                  f"transformers implements), found {self.extra[key]!r}")  # fmt: skip


def _per_layer(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class HunYuanMoEV1Gate(Router):
    """transformers' HunYuanMoEV1Gate: the logits x @ wg.weight.T in fp32 where the weight is fp32 (as it is
    created and loaded), the softmax over all experts in fp32, the top k renormalised, in the logits' dtype."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__(hidden, num_experts, top_k)
        del self.weight
        self.wg = HunYuanMoEV1GateWeight(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.wg.weight
        logits = torch.nn.functional.linear(x.float() if w.dtype == torch.float32 else x.to(w.dtype), w)
        top, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        return ids, (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype)


class HunYuanMoEV1GateWeight(nn.Module):
    """The router's (experts, hidden) weight under transformers' name `wg` (not a Linear: quantization and
    adapters leave it alone, as they leave other families' routers)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))


class HunYuanMoEV1Moe(SparseMoeBlock):
    """The experts' weighted sum plus the shared MLP (`shared_mlp`, ungated)."""

    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        h, n, inter, act = config.hidden_size, config.num_experts, config.intermediate_size, config.hidden_act
        super().__init__(HunYuanMoEV1Gate(h, n, config.layer_topk(layer_idx)), Experts(n, h, inter, act))
        self.shared_mlp = GatedMLP(h, inter, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.gate(flat)
        return (self.experts(flat, ids, weights) + self.shared_mlp(flat)).view(B, T, h)


class HunYuanMoEV1DecoderLayer(HunYuanDenseV1DecoderLayer):
    """Hunyuan dense's layer (pre-norm attention with per-head q/k norms after RoPE) with the mixture as its MLP."""

    def __init__(self, config: HunYuanMoEV1Config, layer_idx: int):
        nn.Module.__init__(self)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = HunYuanDenseV1Attention(config, layer_idx)
        self.mlp = HunYuanMoEV1Moe(config, layer_idx)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)


class HunYuanMoEV1Model(DecoderModel):
    def __init__(self, config: HunYuanMoEV1Config):
        norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        super().__init__(config, HunYuanMoEV1DecoderLayer, norm)


# ---- GGUF: llama.cpp's HunYuanMoEModel converter (arch "hunyuan-moe") ----------------------------------------------


def _uniform(key: str, values: list[Any]) -> Any:
    """The one value of a per-layer list (llama.cpp's converter asserts they are all equal)."""
    if any(v != values[0] for v in values):
        raise ConfigError(f"{key} {values!r}: llama.cpp's hunyuan-moe holds one value for every layer")
    return values[0]


def _gguf_write_config(meta: dict[str, Any], c: HunYuanMoEV1Config) -> None:
    """As llama.cpp's HunYuanMoEModel writes it: TextModel's keys (no vocabulary size, no RoPE dimension count),
    then the expert lengths (both intermediate_size: the released moe_intermediate_size, the shared MLP's), the
    experts used (moe_topk's one value) and one shared expert; for dynamic RoPE the NTK-alpha base over
    hidden_size / num_attention_heads (alpha 1000 where the config gives none) and no scaling. The converter
    writes 256k as the context length and the original one; the model's own length is written instead, which
    llama.cpp reads alike and which reads back as the model's config."""
    meta.pop("vocab_size", None)
    meta.pop("rope.dimension_count", None)
    meta["expert_shared_feed_forward_length"] = c.intermediate_size
    meta["expert_feed_forward_length"] = c.intermediate_size
    if _is_int(c.moe_topk):
        raise ConfigError(f"moe_topk {c.moe_topk!r}: llama.cpp's converter reads it as a list of one value per "
                          "layer, as the released config.json gives it (and a file read back gives it so)")  # fmt: skip
    meta["expert_used_count"] = _uniform("moe_topk", c.moe_topk[: c.num_hidden_layers])
    meta["expert_shared_count"] = 1
    rope = c.rope_parameters
    if rope.get("rope_type") == "dynamic":
        dim = c.hidden_size // c.num_attention_heads
        meta["rope.freq_base"] = ntk_alpha_theta(rope, dim, rope.get("alpha") or CONVERTER_ALPHA)
        meta["rope.scaling.type"] = "none"
        meta["rope.scaling.factor"] = 1.0
        meta["rope.scaling.original_context_length"] = c.max_position_embeddings


def _gguf_config(d: dict[str, Any], get) -> None:
    """The per-layer lists the converter needs in config.json (as the released one gives them), from the file's
    single values."""
    n = d["num_hidden_layers"]
    d["moe_topk"] = [get("expert_used_count")] * n
    d["moe_intermediate_size"] = [get("expert_feed_forward_length", d.get("intermediate_size"))] * n
    d["num_shared_expert"] = [get("expert_shared_count", 1)] * n


class HunYuanMoEV1ForCausalLM(CausalLM):
    """transformers' HunYuanMoEV1ForCausalLM."""

    config_class = HunYuanMoEV1Config
    checkpoint_rules = QWEN_MOE_RULES  # per-expert tensors on disk, stacked in the model
    # llama.cpp's converter (HunYuanMoEModel, TextModel's keys): q/k rows not permuted (NeoX RoPE), the per-head
    # norms as attn_q_norm / attn_k_norm (after RoPE there too), the experts stacked, the shared MLP as *_shexp,
    # NTK-alpha RoPE as a plain base. llama.cpp's hunyuan-moe reads no attention biases and always renormalises
    # the top k, as transformers does; the converter needs moe_topk as a per-layer list (a model whose config
    # gives one number reads back with a list, and is refused naming moe_topk)
    gguf = GGUFLayout(
        "hunyuan-moe",
        config=(("attention.key_length", "head_dim"), ("expert_count", "num_experts")),
        layer=(
            ("attn_q_norm", "self_attn.query_layernorm"),
            ("attn_k_norm", "self_attn.key_layernorm"),
            ("ffn_gate_inp", "mlp.gate.wg"),
            ("ffn_gate_exps", "mlp.experts.gate_proj"),
            ("ffn_up_exps", "mlp.experts.up_proj"),
            ("ffn_down_exps", "mlp.experts.down_proj"),
            ("ffn_gate_shexp", "mlp.shared_mlp.gate_proj"),
            ("ffn_up_shexp", "mlp.shared_mlp.up_proj"),
            ("ffn_down_shexp", "mlp.shared_mlp.down_proj"),
        ),
        fixed=(("attention_bias", False),),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )
    # transformers' base_model_tp_plan holds only the experts (nn.Experts cuts its own intermediate rows):
    # attention and the shared MLP split as Llama's
    tp_patterns: ClassVar[dict[str, str]] = {
        **MOE_TP,
        "layers.*.mlp.shared_mlp.gate_proj": "colwise",
        "layers.*.mlp.shared_mlp.up_proj": "colwise",
        "layers.*.mlp.shared_mlp.down_proj": "rowwise",
    }
    _no_split_modules: ClassVar[list[str]] = ["HunYuanMoEV1DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["mlp.gate.wg"]  # created in fp32 by transformers

    def __init__(self, config: Any):
        super().__init__(config, HunYuanMoEV1Model(config))
