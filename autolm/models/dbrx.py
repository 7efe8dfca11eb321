"""DBRX (Databricks' dbrx-base and dbrx-instruct): pre-norm layers with LayerNorm without bias, q/k/v as one
`Wqkv` (rows [q | k | v], grouped KV heads) whose output is clamped to [-clip_qkv, clip_qkv], RoPE over whole
heads (rotate-half), and a sparse mixture of experts in every layer: the softmax of the router's logits (in their
dtype), the top k, divided by their p-norm with p = `moe_normalize_expert_weights` (1: renormalised to sum 1;
null: left as they are); each expert a SiLU-gated MLP.

config.json nests its settings: `attn_config` (kv_n_heads, clip_qkv, rope_theta, attn_pdrop) and `ffn_config`
(ffn_hidden_size, ffn_act_fn {"name": ...}, moe_num_experts, moe_top_k, moe_normalize_expert_weights,
moe_jitter_eps); the top level names d_model, n_heads, n_layers and max_seq_len. The config reads them into the
common fields (num_key_value_heads, intermediate_size, num_local_experts, ...) and writes them back nested.
transformers 5 reads RoPE's base from the top-level rope_parameters only (10000 when absent; attn_config's
rope_theta is ignored): so does autolm, except for a config.json with no top-level RoPE key (the original
Databricks files), where attn_config's rope_theta is the base, as in transformers 4 and llama.cpp.

transformers' names: the body is `transformer` (wte, blocks, norm_f); each block is `norm_attn_norm` (norm_1,
attn, norm_2) and `ffn` (router.layer, experts). The checkpoint holds the experts as three (E * I, h) matrices,
`ffn.experts.mlp.w1` (gate), `v1` (up) and `w2` (down, transposed: x @ w2 per expert); the model holds them
stacked as every autolm mixture does, gate_up_proj (E, 2I, h) and down_proj (E, h, I) (`DbrxExpertWeights`
converts while loading, `checkpoint_experts` back in save_pretrained, of the base model too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import ROPE_KEYS
from ..errors import CheckpointError, ConfigError
from ..nn import ACTIVATIONS, Attention, CheckpointRules, Experts, GGUFLayout, Linear, SparseMoeBlock
from ..nn.expert_formats import GGUFExperts
from ..saving import unique_state_dict
from .base import CausalLM, DecoderModel

# the common field -> (sub-config, its key there)
NESTED = {
    "num_key_value_heads": ("attn_config", "kv_n_heads"),
    "clip_qkv": ("attn_config", "clip_qkv"),
    "intermediate_size": ("ffn_config", "ffn_hidden_size"),
    "num_local_experts": ("ffn_config", "moe_num_experts"),
    "num_experts_per_tok": ("ffn_config", "moe_top_k"),
    "moe_normalize_expert_weights": ("ffn_config", "moe_normalize_expert_weights"),
}
# config.json's name for each field, in error messages
_KEY_NAMES = {
    "hidden_size": "d_model",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "max_position_embeddings": "max_seq_len",
    "hidden_act": "ffn_config.ffn_act_fn",
    "moe_jitter_eps": "ffn_config.moe_jitter_eps",
    **{field: f"{sub}.{key}" for field, (sub, key) in NESTED.items()},
}
# fields of the common config that DBRX's config.json does not have at its top level
_NOT_WRITTEN = ("intermediate_size", "hidden_act", "rms_norm_eps", "head_dim", "attention_dropout", "sliding_window",
                "clip_qkv", "num_local_experts", "num_experts_per_tok", "moe_normalize_expert_weights")  # fmt: skip


@dataclass(repr=False)
class DbrxConfig(PretrainedConfig):
    """transformers' DbrxConfig and its defaults, the nested attn_config / ffn_config read into fields (see the
    module docstring); unknown keys of the sub-configs are kept and written back. LayerNorm's epsilon is
    transformers' fixed 1e-5 (rms_norm_eps here)."""

    model_type: ClassVar[str] = "dbrx"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 3584
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 1
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    clip_qkv: float | None = None
    num_local_experts: int = 4
    num_experts_per_tok: int = 1
    moe_normalize_expert_weights: float | None = 1.0

    def __post_init__(self) -> None:
        for sub in ("attn_config", "ffn_config"):
            if self.extra.get(sub) is None:
                self.extra.pop(sub, None)
            elif not isinstance(self.extra[sub], dict):
                raise ConfigError(f"{self.source}: {sub} must be an object, found {self.extra[sub]!r}")
        for field, (sub, key) in NESTED.items():
            if key in self.extra.get(sub, {}):
                setattr(self, field, self.extra[sub][key])
        act = self.extra.get("ffn_config", {}).get("ffn_act_fn")
        if act is not None:
            if not isinstance(act, dict):
                raise ConfigError(f"{self.source}: ffn_config.ffn_act_fn must be an object such as "
                                  f'{{"name": "silu"}}, found {act!r}')  # fmt: skip
            self.hidden_act = act.get("name", "silu")
        self.head_dim = None  # d_model / n_heads
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = rf"(?<![.\w])({'|'.join(_KEY_NAMES)})\b"
            raise ConfigError(re.sub(names, lambda m: _KEY_NAMES[m[1]], str(e))) from None

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """The top-level RoPE keys, as transformers 5; without any, attn_config's rope_theta (the original files)."""
        attn = d.get("attn_config")
        if isinstance(attn, dict) and "rope_theta" in attn and not any(k in d for k in ROPE_KEYS):
            rope, _ = super().read_rope({**d, "rope_theta": attn["rope_theta"]}, source)
            return rope, "v5"
        return super().read_rope(d, source)

    @property
    def moe_jitter_eps(self) -> float | None:
        """Training's multiplicative noise on the experts' input (ffn_config.moe_jitter_eps)."""
        return self.extra.get("ffn_config", {}).get("moe_jitter_eps")

    def validate(self) -> None:
        super().validate()
        clip, p, jitter = self.clip_qkv, self.moe_normalize_expert_weights, self.moe_jitter_eps
        E, k = self.num_local_experts, self.num_experts_per_tok
        for key, value, ok, want in (
            ("clip_qkv", clip, clip is None or (_is_number(clip) and clip > 0), "a positive number or null"),
            ("num_local_experts", E, _is_int(E) and 0 < E <= 4096, "a positive integer"),
            ("num_experts_per_tok", k, _is_int(E) and _is_int(k) and 0 < k <= E, f"an integer in [1, {E}]"),
            ("moe_normalize_expert_weights", p, p is None or (_is_number(p) and p > 0),
             "a positive number (the p of the p-norm dividing the top-k weights) or null"),
            ("moe_jitter_eps", jitter, jitter is None or (_is_number(jitter) and 0 <= jitter < 1),
             "a number in [0, 1) or null"),
            ("tie_word_embeddings", self.tie_word_embeddings, not self.tie_word_embeddings,
             "false (DBRX's LM head is its own, as in transformers)"),
        ):  # fmt: skip
            if not ok:
                raise ConfigError(f"{self.source}: {key} must be {want}, found {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """config.json: the fields in attn_config / ffn_config (with the sub-configs' other keys as read)."""
        out = super().to_dict()
        subs = {sub: dict(self.extra.get(sub, {})) for sub in ("attn_config", "ffn_config")}
        for field, (sub, key) in NESTED.items():
            subs[sub][key] = getattr(self, field)
        subs["attn_config"].setdefault("rope_theta", self.rope_theta)
        act = subs["ffn_config"].get("ffn_act_fn")
        subs["ffn_config"]["ffn_act_fn"] = {**(act or {}), "name": self.hidden_act}
        subs["ffn_config"]["hidden_size"] = self.hidden_size  # as transformers: the experts' width is d_model
        for key in _NOT_WRITTEN:
            out.pop(key, None)
        return {**out, **subs}


_dataclass_init = DbrxConfig.__init__


def _init(self, **kwargs: Any) -> None:
    """DbrxConfig(d_model=..., n_heads=..., attn_config={...}, ffn_config={...}, ...) as in transformers: keys
    that are no field (the sub-configs, the dropouts) kept as config.json's unknown keys are."""
    theirs = {v: k for k, v in DbrxConfig.attribute_map.items()}
    kwargs = {theirs.get(k, k): v for k, v in kwargs.items()}
    names = set(DbrxConfig.__dataclass_fields__)
    extra = {**kwargs.pop("extra", {}), **{k: kwargs.pop(k) for k in list(kwargs) if k not in names}}
    attn = extra.get("attn_config")
    if "rope_parameters" not in kwargs and isinstance(attn, dict) and "rope_theta" in attn:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": attn["rope_theta"]}
    _dataclass_init(self, **kwargs, extra=extra)


DbrxConfig.__init__ = _init


class DbrxAttention(Attention):
    """`Wqkv` (rows [q | k | v]) clamped to [-clip_qkv, clip_qkv] when set, and `out_proj`; no biases."""

    def __init__(self, config: DbrxConfig, layer_idx: int):
        h, n = config.hidden_size, config.num_attention_heads
        super().__init__(h, n, config.num_key_value_heads, config.head_dim, layer_idx)
        self.clip_qkv = config.clip_qkv

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.Wqkv = Linear(hidden, (nh + 2 * nkv) * hd, bias=False)
        self.out_proj = Linear(nh * hd, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return q, k, v

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: DBRX calls it out_proj."""
        return self.out_proj


class DbrxRouterLayer(nn.Module):
    """The router's weight (experts, hidden) under transformers' name `router.layer` (no Linear: quantization
    leaves routers in floating point, as it does every family's)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))


class DbrxRouter(nn.Module):
    """Softmax over the experts' logits in their dtype, the top k, divided by their p-norm (p None: not)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, p: float | None):
        super().__init__()
        self.layer = DbrxRouterLayer(hidden, num_experts)
        self.num_experts, self.top_k, self.p = num_experts, top_k, p

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (expert ids (N, k), routing weights (N, k))."""
        logits = kernels.linear(x, self.layer.weight)
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.p is not None:
            top = top / torch.norm(top, p=self.p, dim=-1, keepdim=True)
        return ids, top


class DbrxNormAttentionNorm(nn.Module):
    """transformers' grouping: the attention's norm, the attention, and the experts' norm."""

    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.norm_1 = nn.LayerNorm(h, eps=eps, bias=False)
        self.attn = DbrxAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(h, eps=eps, bias=False)


class DbrxBlock(nn.Module):
    """x += attn(norm_1(x)); x += ffn(norm_2(x))."""

    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.norm_attn_norm = DbrxNormAttentionNorm(config, layer_idx)
        E, k = config.num_local_experts, config.num_experts_per_tok
        router = DbrxRouter(config.hidden_size, E, k, config.moe_normalize_expert_weights)
        experts = Experts(E, config.hidden_size, config.intermediate_size, config.hidden_act)
        jitter = config.moe_jitter_eps or 0.0  # in training, as transformers
        self.ffn = SparseMoeBlock(router, experts, router_name="router", jitter_noise=jitter)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        n = self.norm_attn_norm
        x = n.attn(n.norm_1(x), ctx) + x
        return x + self.ffn(n.norm_2(x))


class DbrxModel(DecoderModel):
    """wte, blocks, norm_f; `embed_tokens`, `layers` and `norm` name them (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "wte", "layers": "blocks", "norm": "norm_f"}

    def __init__(self, config: DbrxConfig):
        norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=False)
        super().__init__(config, DbrxBlock, norm)


@dataclass(frozen=True)
class DbrxExpertWeights:
    """Checkpoint rule: `<...>.experts.mlp.{w1,v1,w2}`, (E * I, h) each, -> the model's `<...>.experts.gate_up_proj`
    (w1 and v1 per expert, (E, 2I, h)) and `down_proj` (w2 per expert transposed, (E, h, I))."""

    def piece(self, name: str) -> tuple[str, str] | None:
        """(model name, "w1" | "v1" | "w2") for a piece of DBRX's experts, else None."""
        m = re.fullmatch(r"(.+\.experts)\.mlp\.(w1|v1|w2)", name)
        if m is None:
            return None
        return f"{m.group(1)}.{'down_proj' if m.group(2) == 'w2' else 'gate_up_proj'}", m.group(2)

    def pieces(self, name: str) -> int:
        return 1 if name.endswith(".down_proj") else 2

    def assemble(self, got: dict, shape: tuple[int, ...], name: str, source: str) -> torch.Tensor:
        down = name.endswith(".down_proj")
        E, rows, cols = shape
        inner, h = (cols, rows) if down else (rows // 2, cols)
        bad = {k: tuple(t.shape) for k, t in got.items() if tuple(t.shape) != (E * inner, h)}
        if bad:
            raise CheckpointError(f"{source}: DBRX's experts {bad} for {name!r}: the model's {E} experts of "
                                  f"{inner} rows need ({E * inner}, {h}) each")  # fmt: skip
        if down:
            return got["w2"].reshape(E, inner, h).transpose(1, 2).contiguous()
        return torch.cat([got["w1"].reshape(E, inner, h), got["v1"].reshape(E, inner, h)], 1).contiguous()


def checkpoint_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the stacked experts back as the checkpoint's w1 / v1 / w2 (E * I, h) (copies: the
    checkpoint's rows are no view of the stacked parameters)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        stem, _, last = name.rpartition(".")
        if stem.endswith(".experts") and last == "gate_up_proj":
            E, rows, h = t.shape
            gate, up = t.chunk(2, 1)
            out[f"{stem}.mlp.w1"] = gate.reshape(E * rows // 2, h)
            out[f"{stem}.mlp.v1"] = up.reshape(E * rows // 2, h)
        elif stem.endswith(".experts") and last == "down_proj":
            E, h, inner = t.shape
            out[f"{stem}.mlp.w2"] = t.transpose(1, 2).reshape(E * inner, h)
        else:
            out[name] = t
    return out


def _gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp clamps only with a positive clamp_kqv: 0 (what GGUF out writes for no clamp) is none."""
    if not d.get("clip_qkv"):
        d["clip_qkv"] = None


def _gguf_write_config(m: dict[str, Any], c: DbrxConfig) -> None:
    """As llama.cpp's DbrxModel converter: no vocabulary size, head size, rotary dimensions or RMS epsilon; the
    clamp always (0 where the model has none, which llama.cpp reads as no clamp; the converter itself needs one)."""
    for key in ("vocab_size", "rope.dimension_count", "attention.key_length", "attention.value_length",
                "attention.layer_norm_rms_epsilon"):  # fmt: skip
        m.pop(key, None)
    m["attention.clamp_kqv"] = float(c.clip_qkv or 0.0)


class DbrxForCausalLM(CausalLM):
    """transformers' DbrxForCausalLM (an untied head)."""

    config_class = DbrxConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.blocks"
    embeddings_name = "transformer.wte"
    checkpoint_rules = CheckpointRules([DbrxExpertWeights(), GGUFExperts()])
    # llama.cpp's dbrx graph: LayerNorm (its epsilon as written), the fused q/k/v clamped, NeoX RoPE, the top k of
    # the softmax renormalised to sum 1 (p = 1), SiLU experts
    gguf = GGUFLayout(
        "dbrx",
        config=(
            ("attention.layer_norm_epsilon", "rms_norm_eps"),
            ("attention.clamp_kqv", "clip_qkv"),
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
        ),
        layer=(
            ("attn_norm", "norm_attn_norm.norm_1"),
            ("attn_qkv", "norm_attn_norm.attn.Wqkv"),
            ("attn_output", "norm_attn_norm.attn.out_proj"),
            ("attn_output_norm", "norm_attn_norm.norm_2"),
            ("ffn_gate_inp", "ffn.router.layer"),
            ("ffn_gate_exps", "ffn.experts.gate_proj"),
            ("ffn_up_exps", "ffn.experts.up_proj"),
            ("ffn_down_exps", "ffn.experts.down_proj"),
        ),
        top=(("token_embd", "transformer.wte"), ("output_norm", "transformer.norm_f")),
        fixed=(("moe_normalize_expert_weights", 1.0), ("hidden_act", "silu")),
        derive=_gguf_config,
        write_config=_gguf_write_config,
    )
    # As Phi-3: Wqkv's packed output gathered whole on every rank before the split, out_proj takes its slice of the
    # whole input, every rank runs every head; the experts cut their own intermediate rows (nn.Experts.shard)
    tp_patterns: ClassVar[dict[str, str]] = {
        "blocks.*.norm_attn_norm.attn.Wqkv": "colwise_gather",
        "blocks.*.norm_attn_norm.attn.out_proj": "rowwise_split",
    }
    _no_split_modules: ClassVar[list[str]] = ["DbrxBlock"]

    def __init__(self, config: DbrxConfig):
        super().__init__(config, DbrxModel(config))

    @property
    def model(self) -> DbrxModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs) -> None:
        """As every family, the experts written as the checkpoint holds them (checkpoint_experts)."""
        if not self._hf_peft_config_loaded:
            state_dict = checkpoint_experts(unique_state_dict(self) if state_dict is None else state_dict)
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)

    def shard_heads(self, world: int) -> None:
        """Every rank runs all heads (Wqkv's output is gathered): nothing to shard."""
