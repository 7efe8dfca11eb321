"""Gemma 4's text model (model_type gemma4_text; gemma4: the image-text checkpoints' language model), Gemma 3's
layer reworked:

- every norm is RMSNorm times w in fp32 (not 1 + w), weights starting at one; a weightless norm on values (v_norm)
  besides the q/k norms per head; attention scores are not scaled (scale 1);
- sliding and full layers (`layer_types`, every 6th full by default, the last always full), full ones with their
  own head size and KV heads (`global_head_dim`, 512 by default, `num_global_key_value_heads` where
  `attention_k_eq_v`, or a `per_layer_config` table); with `attention_k_eq_v` full layers have no v_proj: their
  values are the key projection before k_norm;
- RoPE per layer type; the full layers' default is "proportional" RoPE (proportional_inv_freq);
- each layer's output times `layer_scalar`, a buffer the checkpoint holds; logits soft-capped at
  final_logit_softcapping where set (the image-text model too);
- `enable_moe_block` (26B-A4B): beside the dense MLP, a mixture of experts read from the MLP's input (routing:
  Gemma4TextRouter), its input normed by pre_feedforward_layernorm_2; the MLP's and the experts' outputs normed
  (post_feedforward_layernorm_1 / _2), summed, then post_feedforward_layernorm;
- E2B / E4B: per-layer input embeddings, KV sharing over the last layers, double-wide MLPs (gemma4_small.py).
GGUF in and out as llama.cpp's converter writes the family: gemma4_gguf.py. Not supported (ConfigError naming the
key): bidirectional attention (use_bidirectional_attention "all").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import kernels
from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Attention, CheckpointRules, Experts, GatedMLP, Ignored, Linear, Rename, RMSNorm
from ..nn.linear import packed
from ..nn.rope import Rotary, apply_rotary, cos_sin, inv_freq_and_scale, proportional_inv_freq
from . import gemma4_gguf as gguf_io
from . import gemma4_small as small
from .base import DecoderModel
from .gemma2 import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, takes_hidden_activation
from .image_text import TextFirstConfig

_KINDS = ("sliding_attention", "full_attention")
_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}
_OVERRIDABLE = ("head_dim", "num_key_value_heads")  # what a per_layer_config entry may set
_PER_LAYER_KEYS = ("global_head_dim", "num_global_key_value_heads", "per_layer_config")


def _takes_per_layer_keys(cls):
    """cls(global_head_dim=..., num_global_key_value_heads=..., per_layer_config=...) as transformers' config takes
    them: kept in `extra`, as config.json's are."""
    init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = {k: kwargs.pop(k) for k in _PER_LAYER_KEYS if k in kwargs}
        init(self, *args, **(dict(kwargs, extra={**kwargs.get("extra", {}), **given}) if given else kwargs))

    cls.__init__ = __init__
    return cls


@_takes_per_layer_keys
@takes_hidden_activation
@dataclass(repr=False)
class Gemma4TextConfig(Gemma2Config):
    """transformers' Gemma4TextConfig (its field names and defaults). global_head_dim, num_global_key_value_heads
    and per_layer_config stay as config.json gives them (transformers writes per_layer_config)."""

    model_type: ClassVar[str] = "gemma4_text"
    bool_fields: ClassVar[tuple[str, ...]] = (*Gemma2Config.bool_fields, "attention_k_eq_v", "enable_moe_block",
                                              "use_double_wide_mlp")  # fmt: skip
    absent_keys: ClassVar[tuple[str, ...]] = ("query_pre_attn_scalar", "attn_logit_softcapping")

    vocab_size: int = 262_144
    intermediate_size: int = 9216
    num_hidden_layers: int = 30
    max_position_embeddings: int = 131_072
    sliding_window: int | None = 512
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None  # not Gemma 4's: written only where config.json set it
    use_bidirectional_attention: str | None = None
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int | None = 256
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    rope_parameters: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(_DEFAULT_ROPE))

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        """rope_parameters by layer type, as given (transformers' defaults where absent)."""
        given = d.get("rope_parameters")
        if given is None:
            return copy.deepcopy(_DEFAULT_ROPE), "v5"
        _require(isinstance(given, dict) and all(isinstance(v, dict) for v in given.values()),
                 f"{source}: rope_parameters must be an object of objects by layer type, found {str(given)[:100]}")  # fmt: skip
        return {kind: {"rope_type": "default", **params} for kind, params in given.items()}, "v5"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None and _is_int(n) and n > 0:  # every 6th layer full
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
        types = self.layer_types
        if isinstance(types, list) and types and types[-1] != "full_attention":
            self.layer_types = [*types[:-1], "full_attention"]  # as transformers forces it
        super().__post_init__()

    def _overrides(self) -> dict[int, dict[str, Any]]:
        """Layer index -> the head_dim / num_key_value_heads it has instead of the config's."""
        table = self.extra.get("per_layer_config")
        if table is None:
            full = {"head_dim": self.extra.get("global_head_dim", 512)}
            if self.attention_k_eq_v and self.extra.get("num_global_key_value_heads") is not None:
                full["num_key_value_heads"] = self.extra["num_global_key_value_heads"]
            return {i: full for i, t in enumerate(self.layer_types) if t == "full_attention"}
        _require(isinstance(table, dict), f"{self.source}: per_layer_config must be an object by layer index")
        out = {}
        for key, entry in table.items():
            i = int(key) if isinstance(key, str) and key.isdigit() else key
            _require(_is_int(i) and 0 <= i < self.num_hidden_layers and isinstance(entry, dict),
                     f"{self.source}: per_layer_config[{key!r}] must be a layer index's object")  # fmt: skip
            _require(not set(entry) - set(_OVERRIDABLE), f"{self.source}: per_layer_config[{key!r}] sets "
                     f"{sorted(entry)}; autolm supports only {list(_OVERRIDABLE)} per layer")  # fmt: skip
            out[i] = entry
        return out

    def layer_head_dim(self, i: int) -> int:
        return self._overrides().get(i, {}).get("head_dim", self.head_dim)

    def layer_kv_heads(self, i: int) -> int:
        return self._overrides().get(i, {}).get("num_key_value_heads", self.num_key_value_heads)

    def kind_head_dim(self, kind: str) -> int:  # a layer type's head size (its RoPE table's width)
        return self.layer_head_dim(self.layer_types.index(kind))

    rope_theta = property(lambda self: float(self.rope_parameters["full_attention"]["rope_theta"]))

    def own_rope_kinds(self) -> dict[str, dict[str, Any]]:  # the model's RoPE tables
        return {kind: self.rope_parameters.get(kind) for kind in _KINDS if kind in self.layer_types}

    def rope_kinds(self) -> dict[str, dict[str, Any]]:  # the shared code's: all but "proportional"
        return {k: r for k, r in self.own_rope_kinds().items() if r.get("rope_type") != "proportional"}

    gguf_not_compared: ClassVar[tuple[str, ...]] = gguf_io.NOT_COMPARED  # GGUF out: compared its own way
    gguf_compared = gguf_io.compared

    def layer_rope(self, i: int) -> str:
        return self.layer_types[i]

    def validate(self) -> None:
        src = self.source
        _require(self.use_bidirectional_attention in (None, "vision"),
                 f"{src}: use_bidirectional_attention is {self.use_bidirectional_attention!r}; autolm runs causal "
                 "language models only (expected null, or 'vision', which leaves text causal)")  # fmt: skip
        for kind in set(self.layer_types or ()) & set(_KINDS):
            _require(bool(self.rope_parameters.get(kind)), f"{src}: rope_parameters has no entry for {kind!r}")  # fmt: skip
        PretrainedConfig.validate(self)  # its RoPE checks know every type but "proportional", checked here
        for kind, rope in self.own_rope_kinds().items():
            if rope.get("rope_type") == "proportional":
                _validate_proportional(rope, f"{src}: rope_parameters[{kind!r}]")
        self._validate_gemma4()

    def _validate_gemma4(self) -> None:
        src, cap = self.source, self.final_logit_softcapping
        _require(cap is None or (_is_number(cap) and cap > 0),
                 f"{src}: final_logit_softcapping must be a positive number or null, found {cap!r}")  # fmt: skip
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            _require(_is_int(hd) and 0 < hd <= 1 << 14, f"{src}: global_head_dim / per_layer_config head_dim "
                     f"must be a positive integer, found {hd!r} for layer {i}")  # fmt: skip
            _require(_is_int(kv) and kv > 0 and self.num_attention_heads % kv == 0,
                     f"{src}: num_global_key_value_heads / per_layer_config num_key_value_heads must divide "
                     f"num_attention_heads, found {kv!r} for layer {i}")  # fmt: skip
        for kind in set(self.layer_types):  # one RoPE table per layer type
            dims = {self.layer_head_dim(i) for i, t in enumerate(self.layer_types) if t == kind}
            _require(len(dims) == 1, f"{src}: per_layer_config gives the {kind} layers different head_dim "
                     "values")  # fmt: skip
        small.validate_small(self)
        if self.enable_moe_block:
            for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
                v = getattr(self, name)
                _require(_is_int(v) and v > 0, f"{src}: {name} must be a positive integer with enable_moe_block, "
                         f"found {v!r}")  # fmt: skip
            _require(self.top_k_experts <= self.num_experts, f"{src}: top_k_experts ({self.top_k_experts}) "
                     f"exceeds num_experts ({self.num_experts})")  # fmt: skip


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_proportional(rope: dict[str, Any], where: str) -> None:
    theta, part, factor = (rope.get(k, d) for k, d in (("rope_theta", None), ("partial_rotary_factor", 1.0),
                                                        ("factor", 1.0)))  # fmt: skip
    _require(_is_number(theta) and theta > 0, f"{where}: rope_theta must be a positive number, "
             f"found {theta!r}")  # fmt: skip
    _require(_is_number(part) and 0 <= part <= 1, f"{where}: partial_rotary_factor must be in [0, 1], "
             f"found {part!r}")  # fmt: skip
    _require(_is_number(factor) and factor > 0, f"{where}: factor must be a positive number, "
             f"found {factor!r}")  # fmt: skip


class Gemma4Config(TextFirstConfig):
    """transformers' Gemma4Config (the image-text checkpoints), read as Gemma3Config is: its language model's
    text_config (tie_word_embeddings and dtype from the outer config where it leaves them out), the vision and audio
    towers skipped at load, saved as the text model. Logits soft-capped as the image-text model's are."""

    model_type: ClassVar[str] = "gemma4"
    text_class: ClassVar[type] = Gemma4TextConfig


class Gemma4Rotary(Rotary):
    """RoPE tables by layer type, each as wide as its layers' heads (`head_dims`), proportional RoPE included."""

    def __init__(self, kinds: dict[str, dict[str, Any]], head_dims: dict[str, int], max_positions: int):
        super().__init__(kinds, 0, max_positions)
        self.head_dims = head_dims

    def tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        out = {}
        for kind, rope in self.kinds.items():
            key = self._seq_key(rope, position_ids)
            cached = self._freqs.get(kind)
            if cached is None or cached[2] != key or cached[0].device != position_ids.device:
                hd = self.head_dims[kind]
                if rope.get("rope_type") == "proportional":
                    inv_freq, scale = proportional_inv_freq(rope, hd), 1.0
                else:
                    inv_freq, scale = inv_freq_and_scale(rope, hd, self.max_pos, key or None)
                cached = self._freqs[kind] = (inv_freq.to(position_ids.device), scale, key)
            cos, sin = cos_sin(position_ids, cached[0], cached[1], dtype)
            out[kind] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return out


class WeightlessRMSNorm(nn.Module):
    """RMSNorm without a weight (transformers' Gemma4RMSNorm(with_scale=False)): normed in fp32, cast back."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.eps).to(x.dtype)


def _norm(config: Any):
    """Gemma 4's norm for a width: RMSNorm times w in fp32."""
    return lambda dim: RMSNorm(dim, config.rms_norm_eps, weight_in_fp32=True)


class Gemma4TextAttention(Attention):
    """q/k norms per head, a weightless v norm, unscaled scores; the layer's own head size and KV heads. With
    attention_k_eq_v, full layers have no v_proj: their values are the key projection (before k_norm). A KV-shared
    layer (kv_source: the layer whose keys and values it reads) has only q_proj, q_norm and o_proj; the layer it
    reads keeps its keys and values in the forward (keeps_kv)."""

    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config.hidden_size, config.num_attention_heads, config.layer_kv_heads(layer_idx),
                         config.layer_head_dim(layer_idx), layer_idx, bias=config.attention_bias, scale=1.0,
                         window=config.layer_window(layer_idx), rope=config.layer_rope(layer_idx), qk_norm="head",
                         norm=_norm(config))  # fmt: skip
        sources = small.kv_sources(config)
        self.kv_source, self.keeps_kv = sources[layer_idx], layer_idx in sources
        if self.kv_source is not None:  # none of its own
            del self.k_proj, self.v_proj, self.k_norm
            return
        self.v_norm = WeightlessRMSNorm(config.rms_norm_eps)
        if config.attention_k_eq_v and config.layer_types[layer_idx] == "full_attention":
            del self.v_proj
            self.v_proj = None

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        (cos, sin), window = ctx.rope[self.rope], self.sliding_window
        if self.kv_source is not None:  # its own queries over another layer's keys and values
            q = apply_rotary(self.q_norm(self.q_proj(x).view(B, T, nh, hd)).transpose(1, 2), cos, sin)
            return self.o_proj(ctx.attend_shared(self.kv_source, q, window, self.scaling).flatten(2))
        kv = (self.q_proj, self.k_proj) if self.v_proj is None else (self.q_proj, self.k_proj, self.v_proj)
        q, k, *v = packed(x, kv)
        v = v[0] if v else k  # attention_k_eq_v: the key projection, before k_norm
        q = self.q_norm(q.view(B, T, nh, hd)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, nkv, hd)).transpose(1, 2)
        v = self.v_norm(v.view(B, T, nkv, hd)).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, window, self.scaling, None, None, keep=self.keeps_kv)
        return self.o_proj(y.reshape(B, T, nh * hd))


class Gemma4TextRouter(nn.Module):
    """transformers' Gemma4TextRouter: a weightless RMSNorm of x times `scale` / sqrt(hidden), `proj` to expert
    logits, softmax in fp32, the top k renormalised, times `per_expert_scale` of the chosen experts."""

    def __init__(self, config: Any):
        super().__init__()
        h, n = config.hidden_size, config.num_experts
        self.norm = WeightlessRMSNorm(config.rms_norm_eps)
        self.proj = Linear(h, n, bias=False)
        self.scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(n))
        self.top_k, self.root = config.top_k_experts, h**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, h) -> (expert ids (N, k), routing weights (N, k) in fp32)."""
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.root), dim=-1, dtype=torch.float32)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return ids, top * self.per_expert_scale[ids]


class Gemma4TextDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, norm = config.hidden_size, _norm(config)
        self.self_attn = Gemma4TextAttention(config, layer_idx)
        wide = 2 if config.use_double_wide_mlp and self.self_attn.kv_source is not None else 1
        self.mlp = GatedMLP(h, config.intermediate_size * wide, config.hidden_act)
        self.input_layernorm = norm(h)
        self.post_attention_layernorm = norm(h)
        self.pre_feedforward_layernorm = norm(h)
        self.post_feedforward_layernorm = norm(h)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.enable_moe_block = config.enable_moe_block
        if self.enable_moe_block:
            self.router = Gemma4TextRouter(config)
            self.experts = Experts(config.num_experts, h, config.moe_intermediate_size, config.hidden_act)
            self.post_feedforward_layernorm_1 = norm(h)
            self.post_feedforward_layernorm_2 = norm(h)
            self.pre_feedforward_layernorm_2 = norm(h)
        small.add_per_layer_input(self, config, norm)

    def moe(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' part, read from the MLP's input x (B, T, h)."""
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.router(flat)
        y = self.experts(self.pre_feedforward_layernorm_2(flat), ids, weights)
        return self.post_feedforward_layernorm_2(y.reshape(x.shape))

    def forward(self, x: torch.Tensor, ctx, per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.enable_moe_block:
            h = self.post_feedforward_layernorm_1(h) + self.moe(x)
        x = x + self.post_feedforward_layernorm(h)
        return small.apply_per_layer_input(self, x, per_layer_input) * self.layer_scalar


class Gemma4TextModel(small.PerLayerInputs, Gemma2Model):
    """Gemma 2's scaled embeddings; Gemma 4's layers, final norm, RoPE tables and per-layer inputs."""

    layer_class: ClassVar[type] = Gemma4TextDecoderLayer  # a variant's own layer class (gemma4_unified.py)

    def __init__(self, config: Any):
        DecoderModel.__init__(self, config, self.layer_class, _norm(config)(config.hidden_size))
        self.add_per_layer_modules(config, _norm(config))  # per-layer inputs, where the config has them
        self.embed_scale = config.hidden_size**0.5
        kinds = config.own_rope_kinds()
        self.rotary = Gemma4Rotary(kinds, {k: config.kind_head_dim(k) for k in kinds},
                                   config.max_position_embeddings)  # fmt: skip


class Gemma4ForCausalLM(small.SmallCausalLM, Gemma2ForCausalLM):
    """transformers' Gemma4ForCausalLM (the text model; model_type gemma4_text). The KV cache holds each layer's
    own KV heads and head size (full-attention layers differ from sliding ones)."""

    config_class = Gemma4TextConfig
    # the image-text checkpoints (Gemma4Config): their language model's tensors, saved as the text model's
    checkpoint_rules = CheckpointRules([Rename(r"^model\.language_model\.", "model.", r"(?!)", ""),
                                        Ignored(r"(model\.)?(vision_tower|audio_tower|embed_vision|embed_audio)\..+")])  # fmt: skip
    gguf = gguf_io.LAYOUT  # llama.cpp's Gemma4Model converter's file (models.gemma4_gguf)
    _no_split_modules: ClassVar[list[str]] = ["Gemma4TextDecoderLayer"]
    body_class: ClassVar[type] = Gemma4TextModel  # a variant's own body (gemma4_unified.py)

    def __init__(self, config: Any):
        Gemma2ForCausalLM.__init__(self, config, self.body_class(config))
        self.checkpoint_rules = gguf_io.with_rules(self.rules_for(config), config)  # GGUF's rules first
