"""DeepSeek-V3 (DeepSeek-V3, DeepSeek-R1, Kimi K2, Moonlight): Llama's pre-norm layers with Multi-head Latent
Attention (MLA) and, from layer `first_k_dense_replace` on, a mixture of experts with a shared expert.

MLA: the query is q_b_proj(q_a_layernorm(q_a_proj(x))) (a low-rank `q_lora_rank` bottleneck; a plain q_proj
where q_lora_rank is null), each head's query [nope | rope] of qk_nope_head_dim + qk_rope_head_dim.
kv_a_proj_with_mqa(x) gives a compressed latent (kv_lora_rank) and one rotary key part k_pe (qk_rope_head_dim)
that every head shares; kv_b_proj(kv_a_layernorm(latent)) gives each head's k_nope and v (v_head_dim). RoPE turns
only the rope parts, over interleaved pairs where `rope_interleave` (transformers de-interleaves them into
rotate-half order first: (x0, x2, ...) then (x1, x3, ...), the same for q and k, so scores are unchanged). The
score scale is qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) squared under a scaled RoPE (YaRN), on top
of YaRN's own factor on the cos/sin tables. The two low-rank norms keep RMSNorm's default epsilon 1e-6, whatever
rms_norm_eps says.

autolm runs MLA as plain multi-head attention over the expanded keys and values, as vLLM does for flash attention:
k = [k_nope | k_pe] per head, v zero-padded up to the key width (the padding's output is sliced away before
o_proj), so the KV cache holds num_attention_heads heads of max(qk_head_dim, v_head_dim) and the general forward
and the one-token steps need nothing of their own.

The mixture: sigmoid routing with the `e_score_correction_bias` buffer choosing among the best `topk_group` of
`n_group` groups (nn.GroupedRouter), the top `num_experts_per_tok` scores renormalised with norm_topk_prob and
scaled by routed_scaling_factor, plus `shared_experts` (a gated MLP of moe_intermediate_size * n_shared_experts)
that every token passes, unweighted. Checkpoints keep one gate/up/down tensor per expert.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import positive_ints
from ..errors import CheckpointError, ConfigError
from ..nn import Attention, CheckpointRules, GGUFLayout, Ignored, Linear, RMSNorm, apply_rotary
from .base import CausalLM
from .glm4_moe import GGUF_GROUPED_LAYER, GROUPED_MOE_RULES, grouped_moe_mlp
from .image_text import IMAGE_TEXT_RULES, ImageTextConfig
from .mixtral import MixtralDecoderLayer, MixtralModel, validate_experts

LORA_NORM_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's epsilon (transformers' RMSNorm default)


@dataclass(repr=False)
class DeepseekV3Config(PretrainedConfig):
    """transformers' DeepseekV3Config: its fields and defaults (DeepSeek-V3's sizes). `head_dim` is always
    qk_rope_head_dim (the RoPE tables' width) and `qk_head_dim` qk_nope_head_dim + qk_rope_head_dim, as
    transformers sets and writes them; `num_nextn_predict_layers` (its num_mtp_layers) counts the multi-token
    prediction layers some checkpoints carry after the last decoder layer, which the model does not run."""

    model_type: ClassVar[str] = "deepseek_v3"
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "norm_topk_prob",
                                              "rope_interleave", "output_router_logits")  # fmt: skip

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    output_router_logits: bool = False
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    rope_interleave: bool = True
    attention_bias: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )

    def __post_init__(self) -> None:
        self.head_dim = self.qk_rope_head_dim  # transformers' too, whatever config.json says
        self.extra.pop("qk_head_dim", None)  # derived: written back from the parts
        super().__post_init__()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_local_experts(self) -> int:
        return self.n_routed_experts

    @property
    def num_experts(self) -> int:
        return self.n_routed_experts

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["qk_head_dim"] = self.qk_head_dim
        out.setdefault("num_nextn_predict_layers", 1)  # transformers' default (kept in `extra` where given)
        return out

    def attention_scale(self) -> float:
        """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) squared under a scaled RoPE (transformers'
        yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        rope = self.rope_parameters
        if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
            factor = rope["factor"]
            m = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
            scale = scale * m * m
        return scale

    def validate(self) -> None:
        src = self.source
        positive_ints(self, ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank",
                             "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group"), 1 << 17)  # fmt: skip
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"{src}: qk_rope_head_dim must be even (RoPE turns pairs), found {self.qk_rope_head_dim}"
            )
        q = self.q_lora_rank
        if q is not None and not (_is_int(q) and 0 < q <= 1 << 17):
            raise ConfigError(f"{src}: q_lora_rank must be a positive integer or null, found {q!r}")
        super().validate()
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(f"{src}: num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                              f"({self.num_attention_heads}): MLA gives every head its own keys and values")  # fmt: skip
        validate_experts(self, self.n_routed_experts, self.num_experts_per_tok)
        per_group = self.n_routed_experts // self.n_group
        if self.n_routed_experts % self.n_group or per_group < 2:
            raise ConfigError(f"{src}: n_group ({self.n_group}) must divide n_routed_experts "
                              f"({self.n_routed_experts}) into groups of at least 2 experts")  # fmt: skip
        if self.topk_group > self.n_group or self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(f"{src}: topk_group ({self.topk_group}) must be at most n_group ({self.n_group}) and "
                              f"its groups hold num_experts_per_tok ({self.num_experts_per_tok}) experts")  # fmt: skip
        for name in ("first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name, 0)
            if not _is_int(v) or v < 0:
                raise ConfigError(f"{src}: {name} must be a non-negative integer, found {v!r}")
        r = self.routed_scaling_factor
        if not _is_number(r) or r <= 0:
            raise ConfigError(f"{src}: routed_scaling_factor must be a positive number, found {r!r}")


class Kimi_K25Config(ImageTextConfig):
    """transformers' Kimi_K25Config (Kimi K2.5 / K2.6, image-text): its language model's, DeepSeek-V3's (text_config's
    model_type deepseek_v3 or the Hub's "kimi_k2"); the head tied unless the outer config says otherwise."""

    model_type: ClassVar[str] = "kimi_k25"
    text_class: ClassVar[type] = DeepseekV3Config
    text_classes: ClassVar[dict[str, type]] = {"kimi_k2": DeepseekV3Config}
    tie_default: ClassVar[bool | None] = True


class DeepseekV3Attention(Attention):
    """Multi-head Latent Attention with transformers' module names, run as multi-head attention over keys
    [k_nope | k_pe] and values zero-padded to the key width (see the module docstring). `num_kv_heads` equals
    `num_heads` and `head_dim` is the padded width: what the KV cache holds per head."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        nn.Module.__init__(self)
        c, h, nh = config, config.hidden_size, config.num_attention_heads
        self.nope, self.rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_dim, self.kv_rank = c.v_head_dim, c.kv_lora_rank
        self.qk_dim = c.qk_head_dim
        self.layer_idx, self.num_heads, self.num_kv_heads = layer_idx, nh, nh
        self.head_dim = max(self.qk_dim, self.v_dim)
        self.scaling = c.attention_scale()
        self.sliding_window, self.rope, self.softcap, self.qk_norm = None, "default", None, None
        self.rope_interleaved = c.rope_interleave
        bias = c.attention_bias
        self.q_lora_rank = c.q_lora_rank
        if c.q_lora_rank is None:
            self.q_proj = Linear(h, nh * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(h, c.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(c.q_lora_rank, nh * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(h, c.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LORA_NORM_EPS)
        self.kv_b_proj = Linear(c.kv_lora_rank, nh * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(nh * self.v_dim, h, bias=bias)

    def turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE over the rope part (..., qk_rope_head_dim); interleaved pairs de-interleaved first, as
        transformers' apply_rotary_pos_emb_interleave."""
        if self.rope_interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rotary(x, cos, sin)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.o_proj(self.gate(x, self.heads(x, self.query(x), ctx)))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The queries (B, T, heads * qk_head_dim): q_proj(x), or through the low rank."""
        low = self.q_lora_rank is not None
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if low else self.q_proj(x)

    def heads(self, x: torch.Tensor, q: torch.Tensor, ctx) -> torch.Tensor:
        """The heads' output (B, T, heads * v_head_dim) for queries q, the keys and values from x."""
        B, T, _ = x.shape
        nh, hd = self.num_heads, self.head_dim
        q_nope, q_pe = q.view(B, T, nh, self.qk_dim).transpose(1, 2).split((self.nope, self.rope_dim), dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.rope_dim), dim=-1)
        kv = (
            self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, nh, self.nope + self.v_dim).transpose(1, 2)
        )
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        cos, sin = ctx.rope[self.rope]
        q_pe, k_pe = self.turn(q_pe, cos, sin), self.turn(k_pe.view(B, 1, T, self.rope_dim), cos, sin)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(B, nh, T, self.rope_dim)), dim=-1)
        if hd > self.qk_dim:
            q, k = F.pad(q, (0, hd - self.qk_dim)), F.pad(k, (0, hd - self.qk_dim))
        if hd > self.v_dim:
            v = F.pad(v, (0, hd - self.v_dim))
        sinks = getattr(self, "sinks", None)  # Hy v4's (models.hy_v4)
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling, None, sinks)  # (B, T, nh, hd)
        return y[..., : self.v_dim].reshape(B, T, nh * self.v_dim)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, qk_head_dim={self.qk_dim}, v_head_dim={self.v_dim}"


class DeepseekV3DecoderLayer(MixtralDecoderLayer):
    """Pre-norm MLA, then a pre-norm dense MLP (layers below first_k_dense_replace) or mixture of experts."""

    def make_attention(self, config: Any, layer_idx: int) -> Attention:
        return DeepseekV3Attention(config, layer_idx)

    def make_mlp(self, config: Any, layer_idx: int) -> nn.Module:
        return grouped_moe_mlp(config, layer_idx)  # GLM-4.5's mixture, which is DeepSeek-V3's


# ---- GGUF: llama.cpp's DeepseekV2Model converter (arch "deepseek2") -------------------------------------------------


@dataclass(frozen=True)
class GGUFMla:
    """Checkpoint rule for llama.cpp's files: its converter splits kv_b_proj per head into attn_k_b (heads,
    kv_lora_rank, qk_nope_head_dim: each head's k rows transposed, for absorbing them into the query) and attn_v_b
    (heads, v_head_dim, kv_lora_rank), which the GGUF reader names self_attn.{k,v}_b_proj.weight. `split` (GGUF
    out) needs the heads and qk_nope_head_dim, which the model's own instance of the rule holds."""

    heads: int = 0
    nope: int = 0

    def piece(self, name: str) -> tuple[str, str] | None:
        m = re.fullmatch(r"(.+\.self_attn)\.(k|v)_b_proj\.weight", name)
        return None if m is None else (f"{m.group(1)}.kv_b_proj.weight", m.group(2))

    def pieces(self, name: str) -> int:
        return 2

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        k, v = got["k"], got["v"]
        if k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0] or k.shape[1] != v.shape[2]:
            raise CheckpointError(f"{source}: attn_k_b {tuple(k.shape)} and attn_v_b {tuple(v.shape)} of {name!r} "
                                  "are not one layer's per-head MLA projections")  # fmt: skip
        t = torch.cat([k.transpose(1, 2), v], 1).reshape(-1, k.shape[1])
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source}: {name!r} made of llama.cpp's tensors is {tuple(t.shape)}; the model "
                                  f"expects {tuple(shape)}")  # fmt: skip
        return t.contiguous()

    def split(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        if not name.endswith(".self_attn.kv_b_proj.weight"):
            return None
        kv = t.reshape(self.heads, -1, t.shape[-1])
        k, v = kv[:, : self.nope], kv[:, self.nope :]
        stem = name.removesuffix(".kv_b_proj.weight")
        return [(f"{stem}.k_b_proj.weight", k.transpose(1, 2).contiguous()), (f"{stem}.v_b_proj.weight", v)]


SIGMOID_GATING = (
    2  # llama.cpp's expert_gating_func for sigmoid routing (its default for deepseek2 is softmax)
)


def _q_lora_rank(d: dict[str, Any], get) -> int | None:
    """llama.cpp's deepseek2 reads attention.q_lora_rank by the layer count: never in its "lite" models (26 or 27
    layers, or 48 with a vocabulary of 128256: DeepSeek-V2-Lite, Moonlight, GigaChat3), always in the others."""
    n = d.get("num_hidden_layers")
    if n in (26, 27) or (n == 48 and d.get("vocab_size") == 128256):
        return None
    if get("attention.q_lora_rank") is None:
        raise ConfigError(
            f"llama.cpp's deepseek2 needs attention.q_lora_rank in a model of {n} layers (only its 26, 27 and "
            "48-layer 'lite' models project q without it): q_lora_rank"
        )
    return get("attention.q_lora_rank")


def _gguf_config(d: dict[str, Any], get) -> None:
    """What llama.cpp's deepseek2 metadata says in its own terms: MLA as MQA (head_count_kv 1, key/value lengths
    of the latent), the head sizes in key_length_mla / value_length_mla, the expert settings by their presence
    (no expert_weights_norm: not renormalised; no scale: 1), YaRN's mscale_all_dim as 0.1 * it."""
    rope = d.get("head_dim")
    d["qk_rope_head_dim"] = rope
    d["num_key_value_heads"] = d.get("num_attention_heads")
    key = get("attention.key_length_mla")
    d["qk_nope_head_dim"] = key - rope if _is_int(key) and _is_int(rope) else key
    d["q_lora_rank"] = _q_lora_rank(d, get)
    d["norm_topk_prob"] = bool(get("expert_weights_norm", False))
    d.setdefault("routed_scaling_factor", 1.0)
    d.setdefault("n_group", 1)
    d.setdefault("topk_group", 1)
    if get("expert_gating_func") != SIGMOID_GATING:
        raise ConfigError(f"expert_gating_func {get('expert_gating_func')!r}: only sigmoid routing "
                          f"({SIGMOID_GATING}) is DeepSeek-V3's; llama.cpp runs a file without it with softmax")  # fmt: skip
    rope_parameters = d["rope_parameters"]
    if rope_parameters.get("rope_type") == "yarn":
        log_mul = get("rope.scaling.yarn_log_multiplier")
        if not _is_number(log_mul):
            raise ConfigError(
                "YaRN without rope.scaling.yarn_log_multiplier (mscale_all_dim) is not supported"
            )
        rope_parameters["mscale"] = rope_parameters["mscale_all_dim"] = (
            log_mul / 0.1
        )  # llama.cpp: tables unscaled


def _gguf_write_config(m: dict[str, Any], c: DeepseekV3Config) -> None:
    """The inverse of _gguf_config, as the converter writes it; the gating function only where config.json names
    it (scoring_func), as the converter. llama.cpp's deepseek2 turns interleaved pairs only."""
    if not c.rope_interleave:
        raise ConfigError("rope_interleave is false: llama.cpp's deepseek2 turns interleaved pairs only")
    m["attention.head_count_kv"] = 1
    m["attention.key_length"] = c.kv_lora_rank + c.qk_rope_head_dim
    m["attention.value_length"] = c.kv_lora_rank
    m["attention.key_length_mla"] = c.qk_head_dim
    if c.q_lora_rank is not None:
        m["attention.q_lora_rank"] = c.q_lora_rank
    if c.norm_topk_prob:
        m["expert_weights_norm"] = True
    if c.extra.get("scoring_func") == "sigmoid":
        m["expert_gating_func"] = SIGMOID_GATING
    mscale_all_dim = c.rope_parameters.get("mscale_all_dim")
    if mscale_all_dim is not None:
        m["rope.scaling.yarn_log_multiplier"] = 0.1 * mscale_all_dim


class DeepseekV3ForCausalLM(CausalLM):
    """transformers' DeepseekV3ForCausalLM."""

    config_class = DeepseekV3Config
    # per-expert tensors on disk (GLM-4.5's rules), also in Kimi K2.5's image-text files; DeepSeek-V3's own files
    # carry its multi-token prediction layer as layer 61, which transformers skips on load, as here
    checkpoint_rules = CheckpointRules(
        [*IMAGE_TEXT_RULES, *GROUPED_MOE_RULES.rules, Ignored(r"model\.layers\.61\..*"), GGUFMla()]
    )
    # llama.cpp's DeepseekV2Model converter: the names below, kv_b_proj split (GGUFMla), experts stacked; its
    # deepseek2 turns interleaved pairs and has no attention biases
    gguf = GGUFLayout(
        "deepseek2",
        config=(("leading_dense_block_count", "first_k_dense_replace"), ("attention.kv_lora_rank", "kv_lora_rank"),
                ("attention.value_length_mla", "v_head_dim"), ("expert_feed_forward_length", "moe_intermediate_size"),
                ("expert_count", "n_routed_experts"), ("expert_used_count", "num_experts_per_tok"),
                ("expert_shared_count", "n_shared_experts"), ("expert_group_count", "n_group"),
                ("expert_group_used_count", "topk_group"), ("expert_weights_scale", "routed_scaling_factor")),
        layer=(("attn_q_a", "self_attn.q_a_proj"), ("attn_q_a_norm", "self_attn.q_a_layernorm"),
               ("attn_q_b", "self_attn.q_b_proj"), ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
               ("attn_kv_a_norm", "self_attn.kv_a_layernorm"), ("attn_k_b", "self_attn.k_b_proj"),
               ("attn_v_b", "self_attn.v_b_proj"), *GGUF_GROUPED_LAYER),
        fixed=(("rope_interleave", True), ("attention_bias", False)),
        derive=_gguf_config,
        write_config=_gguf_write_config,
        # DeepSeek-V2's files (deepseek2 too) carry no sigmoid gating function: see models.deepseek_v2
        claim=("expert_gating_func", SIGMOID_GATING),
    )  # fmt: skip
    # Heads split across ranks: q_proj / q_b_proj and kv_b_proj give each rank its heads' rows (the low-rank
    # q_a / kv_a projections and their norms stay whole on every rank), o_proj takes their slice of its input;
    # dense MLPs and the shared experts as Llama's MLP; the experts cut their own intermediate rows
    tp_patterns: ClassVar[dict[str, str]] = {
        **{f"layers.*.self_attn.{p}": "colwise" for p in ("q_proj", "q_b_proj", "kv_b_proj")},
        "layers.*.self_attn.o_proj": "rowwise",
        **{f"layers.*.mlp.{m}{p}": s for m in ("", "shared_experts.")
           for p, s in (("gate_proj", "colwise"), ("up_proj", "colwise"), ("down_proj", "rowwise"))},
    }  # fmt: skip
    _no_split_modules: ClassVar[list[str]] = ["DeepseekV3DecoderLayer"]
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["e_score_correction_bias"]  # as transformers

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config, MixtralModel(config, DeepseekV3DecoderLayer))
        mla = GGUFMla(config.num_attention_heads, config.qk_nope_head_dim)  # this model's heads, for GGUF out
        rules = type(self).checkpoint_rules.rules
        self.checkpoint_rules = CheckpointRules([mla if isinstance(r, GGUFMla) else r for r in rules])
