"""MiMo-V2-Flash (Xiaomi): Llama's pre-norm layers; per layer (`layer_types`, by default full attention in the first
layer and every 6th, sliding-window attention elsewhere) GQA whose sliding layers have twice `num_key_value_heads`
KV heads and gpt-oss' per-head attention sinks (`self_attn.sinks`, the checkpoint's `attention_sink_bias`). Queries
and keys have `head_dim` (192) dimensions, values `v_head_dim` (128), scaled by `attention_value_scale` after the
projection; scores are scaled by head_dim ** -0.5. RoPE is partial (the first int(head_dim * partial_rotary_factor)
dimensions of each head, rotate-half) with a table per layer type (rope_parameters by layer type: theta 5e6 for
full, 1e4 for sliding layers; partial_rotary_factor 0.334 where a type gives none, as transformers).
`sliding_window` counts the current token (config.json's `sliding_window_size` is one less, as transformers reads
it). Values are zero-padded to the query/key width so the KV cache holds one width per layer; the output takes the
first v_head_dim.

Per layer (`mlp_layer_types`, by default one dense layer then the mixture) a dense gated MLP or DeepSeek V3's
mixture of `n_routed_experts` gated MLPs (sigmoid routing steered by `mlp.gate.e_score_correction_bias`, groups,
renormalised and scaled top k) without shared experts. Checkpoints keep one tensor per expert; the Hub's
next-token-prediction block (`model.mtp.*`) is not loaded, as in transformers.

GGUF: llama.cpp's "mimo2" (its MimoV2Model converter, which reads the Hub's config.json: hybrid_layer_pattern,
swa_num_key_value_heads, swa_rope_theta, layernorm_epsilon). The converter counts its 3 next-token-prediction
blocks in block_count (nextn_predict_layers; blocks past the trunk are not loaded), writes the KV heads per block,
the window and the sliding flags, the value head size, the rotary dimensions, the value scale and the sliding
layers' RoPE base; dense or mixture is a block's ffn_gate_inp. llama.cpp's graph always renormalises the top k,
never scales them (expert_weights_scale is not read), needs an output tensor, runs SiLU without biases and rotates
layer 0's rotary dimensions in every layer: configs it would compute otherwise are refused on GGUF out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import (
    Attention,
    CheckpointRules,
    Experts,
    GatedMLP,
    GGUFLayout,
    GroupedRouter,
    Ignored,
    Linear,
    Rename,
    SelfSharded,
    SparseMoeBlock,
)
from ..nn.rope import apply_rotary
from .base import LLAMA_TP, CausalLM
from .glm4_moe import GROUPED_MOE_RULES, SIGMOID_GATING, validate_grouped_moe
from .mixtral import GGUF_EXPERTS, MixtralDecoderLayer, MixtralModel

_KINDS = ("full_attention", "sliding_attention")
_THETA = {"full_attention": 5_000_000.0, "sliding_attention": 10_000.0}
_PARTIAL = 0.334  # transformers' partial_rotary_factor where a layer type's RoPE parameters give none


@dataclass(repr=False)
class MiMoV2FlashConfig(PretrainedConfig):
    """transformers' MiMoV2FlashConfig: its fields and defaults (rope_parameters by layer type; layer_types and
    mlp_layer_types derived where absent; `num_local_experts` is transformers' alias of n_routed_experts)."""

    model_type: ClassVar[str] = "mimo_v2_flash"
    partial_rotary_default: ClassVar[bool] = True  # the default RoPE rotates only the partial dimensions
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "attention_bias",
        "norm_topk_prob",
        "output_router_logits",
    )

    vocab_size: int = 152576
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 4
    head_dim: int | None = 192
    v_head_dim: int = 128
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = None
    attention_bias: bool = False
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int = 8
    output_router_logits: bool = False
    n_routed_experts: int = 256
    routed_scaling_factor: float | None = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    sliding_window: int | None = 129
    mlp_layer_types: list[str] | None = None
    attention_value_scale: float | None = 0.707
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {
            kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": _PARTIAL}
            for kind, theta in _THETA.items()
        }
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, as transformers keeps them (its default where config.json has none)."""
        given = d.get("rope_parameters")
        if given is None:
            return cls.__dataclass_fields__["rope_parameters"].default_factory(), "v5"
        if not isinstance(given, dict) or not all(isinstance(given.get(k), dict) for k in _KINDS):
            raise ConfigError(f"{source}: rope_parameters must hold an object for each of {_KINDS}, found "
                              f"{str(given)[:100]}")  # fmt: skip
        kinds = {}
        for kind in _KINDS:
            inner = {
                "rope_parameters": given[kind],
                "max_position_embeddings": d.get("max_position_embeddings"),
            }
            kinds[kind], _ = super().read_rope(inner, source)
        return kinds, "v5"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n):
            self.layer_types = [_KINDS[i != 0 and (i + 1) % 6 != 0] for i in range(n)]
        if self.mlp_layer_types is None and _is_int(n):
            self.mlp_layer_types = ["dense"] * min(n, 1) + ["sparse"] * max(n - 1, 0)
        elif isinstance(self.mlp_layer_types, list) and _is_int(n) and 0 < n < len(self.mlp_layer_types):
            self.mlp_layer_types = self.mlp_layer_types[:n]
        if self.routed_scaling_factor is None:  # the Hub's config.json has null: transformers reads 1.0
            self.routed_scaling_factor = 1.0
        size = self.extra.get("sliding_window_size")
        if size is not None:  # the reference attends to sliding_window_size previous tokens and the query
            self.sliding_window = size + 1 if _is_int(size) else size
        super().__post_init__()

    num_local_experts = property(lambda self: self.n_routed_experts)  # transformers' alias
    first_k_dense_replace = property(lambda self: 0)  # validate_grouped_moe's; mlp_layer_types decides
    n_shared_experts = property(lambda self: 1)  # validate_grouped_moe's; there are none

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {
            k: {"partial_rotary_factor": _PARTIAL, **self.rope_parameters[k]} for k in set(self.layer_types)
        }

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["full_attention"]["rope_theta"])

    def validate(self) -> None:
        super().validate()
        src = self.source
        validate_grouped_moe(self)
        v = self.v_head_dim
        if not _is_int(v) or v < 1:
            raise ConfigError(f"{src}: v_head_dim must be a positive integer, found {v!r}")
        s = self.attention_value_scale
        if s is not None and not _is_number(s):
            raise ConfigError(f"{src}: attention_value_scale must be a number or null, found {s!r}")
        types = self.mlp_layer_types
        if (not isinstance(types, list) or len(types) != self.num_hidden_layers
                or any(t not in ("dense", "sparse") for t in types)):  # fmt: skip
            raise ConfigError(f"{src}: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                              f"{self.num_hidden_layers} layers, found {types!r}")  # fmt: skip
        for kind, rope in self.rope_kinds().items():
            rotary = (
                int(self.head_dim * rope["partial_rotary_factor"])
                if _is_number(rope["partial_rotary_factor"])
                else 0
            )
            if rotary < 2 or rotary % 2 or rotary > self.head_dim:
                raise ConfigError(f"{src}: rope_parameters[{kind!r}].partial_rotary_factor must leave a positive even "
                                  f"number of rotary dimensions of head_dim {self.head_dim}, found "
                                  f"{rope['partial_rotary_factor']!r}")  # fmt: skip


def _rotary_factor(rotary: int, head: int) -> float:
    """A partial_rotary_factor whose int(head * factor) is `rotary`."""
    factor = rotary / head
    return factor if int(head * factor) == rotary else math.nextafter(factor, 1.0)


def _kv_heads(d: dict[str, Any], sliding: list[bool]) -> None:
    """attention.head_count_kv (per block, or one count) as num_key_value_heads: the full layers' count, the
    sliding layers' twice it (MiMo-V2-Flash's; others refused)."""
    kv, n = d.get("num_key_value_heads"), len(sliding)
    if kv is None:  # llama.cpp then takes the head count: read as the config's own default
        return
    counts = kv[:n] if isinstance(kv, list) else [kv] * n
    full = {c for c, s in zip(counts, sliding, strict=True) if not s}
    swa = {c for c, s in zip(counts, sliding, strict=True) if s}
    base = next(iter(full)) if full else next(iter(swa)) // 2 if swa and _is_int(next(iter(swa))) else kv
    if len(full) > 1 or len(swa) > 1 or (swa and swa != {2 * base}):
        raise ConfigError(f"attention.head_count_kv {kv!r}: MiMo-V2-Flash's sliding layers have twice the full "
                          "layers' KV heads (num_key_value_heads), every full layer the same")  # fmt: skip
    d["num_key_value_heads"] = base


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's "mimo2" keys -> the config (module docstring): the trunk's blocks, the layer kinds by the
    sliding flags and routers, KV heads, head sizes, partial RoPE of the rotary dimensions with a base per kind
    (10000 where rope.freq_base_swa is absent, as llama.cpp), the value scale where given."""
    n = d.get("num_hidden_layers", 0) - (get("nextn_predict_layers") or 0)
    d["num_hidden_layers"] = n
    routers = set(d.pop("gguf_routers", ()))  # a mixture where the block has a router, as llama.cpp's graph
    d["mlp_layer_types"] = ["sparse" if i in routers else "dense" for i in range(n)]
    flags = get("attention.sliding_window_pattern")
    if not isinstance(flags, list) or len(flags) < n:
        raise ConfigError(f"attention.sliding_window_pattern {flags!r}: llama.cpp's mimo2 needs a flag per block "
                          "(layer_types)")  # fmt: skip
    sliding = [bool(f) for f in flags[:n]]
    d["layer_types"] = [_KINDS[s] for s in sliding]
    _kv_heads(d, sliding)
    head, value = get("attention.key_length"), get("attention.value_length")
    for key, want in (("attention.key_length_swa", head), ("attention.value_length_swa", value)):
        if get(key) is not None and get(key) != want:
            raise ConfigError(f"{key} {get(key)!r}: MiMo-V2-Flash's sliding layers have the full layers' head "
                              f"sizes (head_dim, v_head_dim: {want!r})")  # fmt: skip
    d.update(head_dim=head, v_head_dim=value)
    rope = d["rope_parameters"]
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope.scaling.type {rope['rope_type']!r}: MiMo-V2-Flash's RoPE is unscaled")
    rotary = get("rope.dimension_count", head)  # llama.cpp rotates layer 0's count in every layer
    if sliding and sliding[0]:
        rotary = get("rope.dimension_count_swa", rotary)
    factor = _rotary_factor(rotary, head) if _is_int(rotary) and _is_int(head) and head else rotary
    thetas = {"full_attention": rope["rope_theta"], "sliding_attention": get("rope.freq_base_swa", 10000.0)}
    d["rope_parameters"] = {kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}
                            for kind, theta in thetas.items()}  # fmt: skip
    d["attention_value_scale"] = get("attention.value_scale")


def _refused(c: MiMoV2FlashConfig) -> list[str]:
    """The config fields llama.cpp's mimo2 graph would compute otherwise (module docstring)."""
    kinds = c.rope_kinds()
    rotary = {int(c.head_dim * r["partial_rotary_factor"]) for r in kinds.values()}
    checks = {
        "tie_word_embeddings (llama.cpp's mimo2 needs an output tensor)": c.tie_word_embeddings,
        "norm_topk_prob false (llama.cpp renormalises the top k)": not c.norm_topk_prob,
        "routed_scaling_factor (llama.cpp's mimo2 scales no expert weights)": c.routed_scaling_factor != 1.0,
        "attention_bias (llama.cpp's mimo2 reads no biases)": c.attention_bias,
        "hidden_act (llama.cpp's mimo2 runs SiLU)": c.hidden_act != "silu",
        "rope_parameters' rope_type (llama.cpp's mimo2 scales no RoPE)": any(
            r.get("rope_type", "default") != "default" for r in kinds.values()
        ),
        "rope_parameters' partial_rotary_factor (llama.cpp rotates layer 0's dimensions in every layer)": (
            len(rotary) > 1
        ),
        "sliding_window null (llama.cpp's mimo2 needs a window)": c.sliding_window is None,
    }
    return [field for field, bad in checks.items() if bad]


def _gguf_write_config(m: dict[str, Any], c: MiMoV2FlashConfig) -> None:
    """_gguf_derive's inverse, as the converter writes it (without next-token-prediction blocks, which autolm holds
    none of: its --no-mtp file): KV heads per block, the window and sliding flags, the head sizes, the rotary
    dimensions, the value scale where set, the sigmoid gating (the Hub's scoring_func). Configs llama.cpp's
    graph computes otherwise are a ConfigError naming the fields."""
    refused = _refused(c)
    if refused:
        raise ConfigError(
            f"llama.cpp's 'mimo2' format cannot hold this 'mimo_v2_flash' model: {'; '.join(refused)}"
        )
    sliding = [t == "sliding_attention" for t in c.layer_types]
    m["attention.head_count_kv"] = [c.num_key_value_heads * (2 if s else 1) for s in sliding]
    m["attention.sliding_window"] = c.sliding_window
    m["attention.sliding_window_pattern"] = [int(s) for s in sliding]  # the converter's hybrid_layer_pattern
    m["attention.key_length"], m["attention.value_length"] = c.head_dim, c.v_head_dim
    rope = c.rope_kinds()[c.layer_types[0]]
    m["rope.dimension_count"] = int(c.head_dim * rope["partial_rotary_factor"])
    if c.attention_value_scale is not None:
        m["attention.value_scale"] = float(c.attention_value_scale)
    m["expert_gating_func"] = SIGMOID_GATING  # the Hub's scoring_func (llama.cpp's graph takes it anyway)


class MiMoV2FlashAttention(SelfSharded, Attention):
    """GQA with v_head_dim-wide values (scaled by attention_value_scale, zero-padded to the cache's width), partial
    RoPE from the layer type's table; sliding layers: twice the KV heads, a window and attention sinks (one per
    query head: cut with the heads under tensor parallelism)."""

    tp_dims: ClassVar[dict[str, int]] = {"sinks": 0}

    def __init__(self, config: MiMoV2FlashConfig, layer_idx: int):
        swa = config.layer_types[layer_idx] == "sliding_attention"
        nkv = config.num_key_value_heads * (2 if swa else 1)
        self.v_dim, self.qk_dim = config.v_head_dim, config.head_dim  # read by make_projections
        super().__init__(config.hidden_size, config.num_attention_heads, nkv, config.head_dim, layer_idx,
                         bias=config.attention_bias, o_bias=False, window=config.layer_window(layer_idx),
                         rope=config.layer_rope(layer_idx), sinks=swa)  # fmt: skip
        self.head_dim = max(self.qk_dim, self.v_dim)  # the KV cache's width (the scaling stays qk's)
        scale = config.attention_value_scale
        self.v_scale = 1.0 if scale is None else float(scale)
        if not swa:
            self.tp_dims = {}  # full layers have no sinks

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd, vd = self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim
        self.q_proj = Linear(hidden, nh * hd, bias=bias)
        self.k_proj = Linear(hidden, nkv * hd, bias=bias)
        self.v_proj = Linear(hidden, nkv * vd, bias=bias)
        self.o_proj = Linear(nh * vd, hidden, bias=o_bias)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, qd, vd, width = self.num_heads, self.num_kv_heads, self.qk_dim, self.v_dim, self.head_dim
        q, k, v = self.project(x)
        q = q.view(B, T, nh, qd).transpose(1, 2)
        k = k.view(B, T, nkv, qd).transpose(1, 2)
        v = (v * self.v_scale).view(B, T, nkv, vd).transpose(1, 2)
        cos, sin = ctx.rope[self.rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if width > qd:
            q, k = F.pad(q, (0, width - qd)), F.pad(k, (0, width - qd))
        if width > vd:
            v = F.pad(v, (0, width - vd))
        sinks = getattr(self, "sinks", None)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling, None, sinks)
        return self.o_proj(y[..., :vd].reshape(B, T, nh * vd))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.qk_dim}, v_head_dim={self.v_dim}"


class MiMoV2FlashDecoderLayer(MixtralDecoderLayer):
    """Pre-norm attention, then a pre-norm dense MLP or mixture without shared experts (`mlp_layer_types`)."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return MiMoV2FlashAttention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        h, act = config.hidden_size, config.hidden_act
        if config.mlp_layer_types[layer_idx] == "dense":
            return GatedMLP(h, config.intermediate_size, act)
        router = GroupedRouter(h, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                               topk_group=config.topk_group, normalize=config.norm_topk_prob,
                               scaling=float(config.routed_scaling_factor))  # fmt: skip
        return SparseMoeBlock(router, Experts(config.n_routed_experts, h, config.moe_intermediate_size, act))


class MiMoV2FlashForCausalLM(CausalLM):
    """transformers' MiMoV2FlashForCausalLM."""

    config_class = MiMoV2FlashConfig
    checkpoint_rules = CheckpointRules(
        [
            Rename(
                r"\.self_attn\.attention_sink_bias$",
                ".self_attn.sinks",
                r"\.self_attn\.sinks$",
                ".self_attn.attention_sink_bias",
            ),
            Rename(r"\.self_attn\.sinks\.weight$", ".self_attn.sinks", r"(?!)", ""),  # GGUF's name
            *GROUPED_MOE_RULES.rules,
            Ignored(r"model\.mtp\..+"),  # the Hub's next-token-prediction block, not run
        ]
    )
    # llama.cpp's MimoV2Model converter: gguf-py's names (attention_sink_bias as attn_sinks), the experts stacked,
    # the router's correction bias as exp_probs_b.bias; no q/k permutation (NeoX RoPE)
    gguf = GGUFLayout(
        "mimo2",
        config=(("expert_count", "n_routed_experts"), ("expert_used_count", "num_experts_per_tok"),
                ("expert_feed_forward_length", "moe_intermediate_size"), ("expert_group_count", "n_group"),
                ("expert_group_used_count", "topk_group")),
        layer=(*GGUF_EXPERTS, ("exp_probs_b", "mlp.gate.e_score_correction"), ("attn_sinks", "self_attn.sinks")),
        fixed=(("norm_topk_prob", True), ("routed_scaling_factor", 1.0), ("attention_bias", False),
               ("hidden_act", "silu")),
        present=(("blk.{}.ffn_gate_inp.weight", "gguf_routers"),),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )  # fmt: skip
    # transformers' plan: q/k/v (the sliding layers' doubled KV heads alike) and the dense MLP's gate/up
    # column-parallel, o/down row-parallel, the sinks cut by head (SelfSharded), each expert's intermediate rows
    # cut (Experts.shard); the router whole
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["MiMoV2FlashDecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: MiMoV2FlashConfig):
        super().__init__(config, MixtralModel(config, MiMoV2FlashDecoderLayer))
        # blocks past the trunk (a GGUF's next-token-prediction blocks, counted in block_count) are not loaded
        trunk = "|".join(str(i) for i in range(config.num_hidden_layers))
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules(
            [*rules, Ignored(rf"model\.layers\.(?!(?:{trunk})\.)\d+\..+")]
        )
