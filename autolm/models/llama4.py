"""Llama 4's text model (model_type llama4_text; and the language model of the image-text checkpoints, model_type
llama4: Llama 4 Scout and Maverick).

Pre-norm layers of grouped-query attention and a feed-forward block (`feed_forward`):

- RoPE on the layers `no_rope_layers` marks 1 (by default all but every `no_rope_layer_interval`-th), over
  interleaved pairs (x0, x1), (x2, x3), ... (transformers' complex multiply); after it, with `use_qk_norm`, queries
  and keys are L2-normalised per head (an RMS norm without weight, `qk_norm`). The other layers (NoPE) use no
  position encoding and, with `attn_temperature_tuning`, scale their queries by cache slot p:
  1 + attn_scale * log(1 + floor((p + 1) / floor_scale)); autolm carries that scale with the RoPE tables.
- Chunked attention on the layers whose `layer_types` entry is "chunked_attention" (by default the RoPE layers):
  a query at position p sees only the keys at positions k <= p with k // attention_chunk_size == p //
  attention_chunk_size; the other layers ("full_attention") see all earlier positions.
- A mixture of experts in the layers `moe_layers` lists (by default every `interleave_moe_layer_step`-th): the
  router (`router`) picks each token's top `num_experts_per_tok` experts by logit and weights them by the sigmoid of
  that logit; each chosen expert (a gated MLP of intermediate_size, stacked in `experts.gate_up_proj` (E, h, 2I) and
  `experts.down_proj` (E, I, h)) runs on the token's input *scaled by its weight*, and a shared expert
  (`shared_expert`, also of intermediate_size) on the plain input adds to their sum. The other layers have a dense
  gated MLP of `intermediate_size_mlp`.

GGUF (llama.cpp's "llama4", as its Llama4Model converter writes it): Llama's names with the feed-forward block's
(router ffn_gate_inp, the experts split into ffn_{gate,up,down}_exps, the shared expert as *_shexp), q/k rows not
permuted (llama.cpp turns consecutive pairs, as this model), feed_forward_length the dense MLPs' width and
expert_feed_forward_length the experts', Llama 3 RoPE as the rope_freqs tensor. llama.cpp's graph fixes the rest:
chunks of 8192 on three layers of four, the fourth NoPE with the temperature (floor_scale 8192, attn_scale 0.1),
mixtures on every interleave_moe_layer_step-th layer, no biases, and the q/k norm on exactly the files without
128 experts (Maverick's). A file reads back as that; GGUF out refuses a model that differs, naming the field.

Chunks count each row's positions from its first real token; the temperature counts cache slots, as transformers'
Llama4TextAttention does (the cache's length plus the token's index): a left-padded row's padding counts in it, so
the row's temperature is not that of the same row alone (Llama4Rotary.slot_tables).
"""

from __future__ import annotations

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
    GatedMLP,
    GGUFLayout,
    Ignored,
    Rename,
    RMSNorm,
    Rotary,
    Router,
    SparseMoeBlock,
    apply_rotary,
)
from ..nn.expert_formats import GGUFExperts
from .base import CausalLM, DecoderModel
from .image_text import TextFirstConfig
from .mixtral import validate_experts

TEMPERATURE = "llama4_temperature"  # the NoPE layers' per-position query scale, carried with the RoPE tables
_LAYER_TYPES = ("full_attention", "chunked_attention")
# a GGUF file's config (GGUFLayout.fixed): the q/k norm as llama.cpp decides it, on unless 128 experts
QK_NORM_BY_EXPERTS = "llama_cpp_qk_norm_by_experts"


@dataclass(repr=False)
class Llama4TextConfig(PretrainedConfig):
    """transformers' Llama4TextConfig: its fields and defaults (Llama 4 Scout's sizes). no_rope_layers,
    moe_layers and layer_types are derived where absent, as transformers derives (and writes) them."""

    model_type: ClassVar[str] = "llama4_text"
    layer_kinds: ClassVar[tuple[str, ...]] = _LAYER_TYPES
    absent_keys: ClassVar[tuple[str, ...]] = ("sliding_window",)  # not in transformers' config
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias", "use_qk_norm",
                                              "attn_temperature_tuning", "output_router_logits")  # fmt: skip
    default_theta: ClassVar[float] = 500000.0

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0}
    )

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        return super().read_rope({"rope_theta": cls.default_theta, **d}, source)

    def __post_init__(self) -> None:
        if self.extra.pop(QK_NORM_BY_EXPERTS, False):  # read from a GGUF file: llama.cpp's rule
            self.use_qk_norm = self.num_local_experts != 128
        n = self.num_hidden_layers
        if _is_int(n) and 0 < n <= 4096:
            for name in ("no_rope_layer_interval", "interleave_moe_layer_step"):
                if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                    raise ConfigError(
                        f"{self.source}: {name} must be a positive integer, found {getattr(self, name)!r}"
                    )
            if not self.no_rope_layers:
                self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
            if self.moe_layers is None:
                step = self.interleave_moe_layer_step
                self.moe_layers = list(range(step - 1, n, step))
            if self.layer_types is None and isinstance(self.no_rope_layers, list):
                self.layer_types = [_LAYER_TYPES[1] if r else _LAYER_TYPES[0] for r in self.no_rope_layers]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        src, n = self.source, self.num_hidden_layers
        rope = self.no_rope_layers
        if not isinstance(rope, list) or len(rope) < n or not all(_is_int(r) and r in (0, 1) for r in rope):
            raise ConfigError(
                f"{src}: no_rope_layers must list at least {n} entries of 0 (no RoPE) or 1, found {str(rope)[:200]}"
            )
        moe = self.moe_layers
        if not isinstance(moe, list) or not all(_is_int(i) and i >= 0 for i in moe):
            raise ConfigError(f"{src}: moe_layers must be a list of layer indices, found {str(moe)[:200]}")
        validate_experts(self, self.num_local_experts, self.num_experts_per_tok)
        for name in ("intermediate_size_mlp", "floor_scale"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ConfigError(f"{src}: {name} must be a positive integer, found {getattr(self, name)!r}")
        chunk = self.attention_chunk_size
        if chunk is not None and not (_is_int(chunk) and chunk > 0):
            raise ConfigError(
                f"{src}: attention_chunk_size must be a positive integer or null, found {chunk!r}"
            )
        if chunk is None and "chunked_attention" in self.layer_types:
            raise ConfigError(f"{src}: attention_chunk_size must be set for the chunked_attention layers")
        if not _is_number(self.attn_scale):
            raise ConfigError(f"{src}: attn_scale must be a number, found {self.attn_scale!r}")

    @property
    def num_experts(self) -> int:
        return self.num_local_experts

    def layer_chunk(self, i: int) -> int | None:
        """The attention chunk of layer i (None: full attention)."""
        return self.attention_chunk_size if self.layer_types[i] == "chunked_attention" else None


class Llama4Config(TextFirstConfig):
    """transformers' Llama4Config (model_type llama4: the image-text checkpoints, Llama 4 Scout and Maverick).
    autolm runs their language model: the config is its `text_config`, read as a Llama4TextConfig (top-level
    settings it leaves out, such as tie_word_embeddings and dtype, taken from the outer config), and loading skips
    the vision model's and projector's tensors (Llama4ForCausalLM.checkpoint_rules). Saved, it is the text model
    transformers' Llama4ForCausalLM loads."""

    model_type: ClassVar[str] = "llama4"
    text_class: ClassVar[type] = Llama4TextConfig


class Llama4Rotary(Rotary):
    """The RoPE tables, plus TEMPERATURE where a NoPE layer tunes it: each token's query scale (B, 1, T, 1) in fp32
    (transformers multiplies in fp32, then casts), from its cache slot `slots` (B, T) (as transformers counts),
    else its position."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config.rope_kinds(), config.head_dim, config.max_position_embeddings)
        self.rotary = Rotary(dict(self.kinds), config.head_dim, config.max_position_embeddings)
        self.floor_scale, self.attn_scale = float(config.floor_scale), float(config.attn_scale)
        n = config.num_hidden_layers
        if config.attn_temperature_tuning and not all(config.no_rope_layers[:n]):
            self.kinds = {**self.kinds, TEMPERATURE: {}}

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype, slots: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = self.rotary.tables(position_ids, dtype)
        if TEMPERATURE in self.kinds:
            p = (position_ids if slots is None else slots).float()
            scale = torch.log1p(torch.floor((p + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            scale = scale[:, None, :, None]
            out[TEMPERATURE] = (scale, scale)
        return out

    def slot_tables(
        self, position_ids: torch.Tensor, cache_position: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The temperature counts cache slots, as transformers' Llama4TextAttention (past_key_values' length + the
        token's index): a left-padded row's padding counts."""
        slots = cache_position.to(position_ids.device).unsqueeze(0).expand_as(position_ids)
        return self.tables(position_ids, dtype, slots)

    def switch_length(self) -> int | None:
        return self.rotary.switch_length()


class Llama4TextL2Norm(nn.Module):
    """x / rms(x) over the last dimension in fp32, no weight: Llama 4's q/k norm."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.eps).to(x.dtype)


class Llama4TextAttention(Attention):
    """Attention with interleaved RoPE then the L2 q/k norm (RoPE layers), or the position temperature on the
    queries (NoPE layers); chunked where the layer type says so."""

    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        use_rope = bool(config.no_rope_layers[layer_idx])
        super().__init__(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         layer_idx, bias=config.attention_bias, rope="default" if use_rope else None,
                         rope_interleaved=True, chunk=config.layer_chunk(layer_idx))  # fmt: skip
        if config.use_qk_norm and use_rope:
            self.qk_norm = Llama4TextL2Norm(config.rms_norm_eps)
        self.temperature = config.attn_temperature_tuning and not use_rope

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if self.rope is not None:
            cos, sin = ctx.rope[self.rope]
            q, k = apply_rotary(q, cos, sin, True), apply_rotary(k, cos, sin, True)
        if isinstance(self.qk_norm, nn.Module):
            q, k = self.qk_norm(q), self.qk_norm(k)
        if self.temperature:
            q = (q * ctx.rope[TEMPERATURE][0]).to(q.dtype)
        y = ctx.attend(self.layer_idx, q, k, v, None, self.scaling, None, None, self.chunk)
        return self.o_proj(y.reshape(B, T, nh * hd))


class Llama4Router(Router):
    """The top k experts by logit, weighted by the sigmoid of their logits (in fp32, then the logits' dtype)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = kernels.linear(x, self.weight, self.bias)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, torch.sigmoid(top.float()).to(logits.dtype)


class Llama4TextMoe(SparseMoeBlock):
    """router + experts, each chosen expert fed the token scaled by its weight, + an ungated `shared_expert`."""

    def __init__(self, config: Llama4TextConfig):
        h, e, act = config.hidden_size, config.num_local_experts, config.hidden_act
        router = Llama4Router(h, e, config.num_experts_per_tok)
        experts = Experts(e, h, config.intermediate_size, act, transposed=True)
        super().__init__(router, experts, router_name="router")
        self.shared_expert = GatedMLP(h, config.intermediate_size, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        flat = x.reshape(-1, h)
        ids, weights = self.router(flat)
        N, k = ids.shape
        scaled = (flat.unsqueeze(1) * weights.unsqueeze(-1)).reshape(N * k, h)
        routed = self.experts(scaled, ids.reshape(N * k, 1), weights.new_ones(N * k, 1))
        return (self.shared_expert(flat) + routed.view(N, k, h).sum(1)).view(B, T, h)


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: Llama4TextConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Llama4TextAttention(config, layer_idx)
        if layer_idx in config.moe_layers:
            self.feed_forward = Llama4TextMoe(config)
        else:
            self.feed_forward = GatedMLP(h, config.intermediate_size_mlp, config.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Llama4TextModel(DecoderModel):
    def __init__(self, config: Llama4TextConfig):
        super().__init__(config, Llama4TextDecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.rotary = Llama4Rotary(config)


# transformers' base_model_tp_plan, the stacked experts whole on every rank (as autolm's other mixtures)
LLAMA4_TP = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    **{f"layers.*.feed_forward.{m}gate_proj": "colwise" for m in ("", "shared_expert.")},
    **{f"layers.*.feed_forward.{m}up_proj": "colwise" for m in ("", "shared_expert.")},
    **{f"layers.*.feed_forward.{m}down_proj": "rowwise" for m in ("", "shared_expert.")},
}


# llama.cpp's Llama4Model converter: the config keys beyond autolm's common ones, the feed-forward block's names
GGUF_CONFIG = (
    ("feed_forward_length", "intermediate_size_mlp"),  # the converter's intermediate_size
    ("expert_feed_forward_length", "intermediate_size"),
    ("expert_count", "num_local_experts"),
    ("expert_used_count", "num_experts_per_tok"),
    ("interleave_moe_layer_step", "interleave_moe_layer_step"),
)
GGUF_LAYER = (
    *((f"ffn_{p}", f"feed_forward.{p}_proj") for p in ("gate", "up", "down")),
    ("ffn_gate_inp", "feed_forward.router"),
    *((f"ffn_{p}_exps", f"feed_forward.experts.{p}_proj") for p in ("gate", "up", "down")),
    *((f"ffn_{p}_shexp", f"feed_forward.shared_expert.{p}_proj") for p in ("gate", "up", "down")),
)
# what llama.cpp's graph runs whatever the file says (llama_model_llama4::load_arch_hparams)
GGUF_FIXED = (
    ("attention_chunk_size", 8192),
    ("no_rope_layer_interval", 4),
    ("attn_temperature_tuning", True),
    ("floor_scale", 8192),
    ("attn_scale", 0.1),
    ("attention_bias", False),
    (QK_NORM_BY_EXPERTS, True),
)


class Llama4ForCausalLM(CausalLM):
    """transformers' Llama4ForCausalLM (the text model; model_type llama4_text, or llama4's language model)."""

    config_class = Llama4TextConfig
    checkpoint_rules = CheckpointRules(
        [  # the image-text checkpoints (Llama4Config): their language model's tensors, saved as the text model's
            Rename(r"^(language_model\.model|model\.language_model)\.", "model.", r"(?!)", ""),
            Rename(r"^language_model\.lm_head\.", "lm_head.", r"(?!)", ""),
            Ignored(r"(model\.)?(vision_model|multi_modal_projector)\..+"),
            GGUFExperts(transposed=True),  # llama.cpp's stacked experts, gate and up apart, (E, out, in)
        ]
    )
    gguf = GGUFLayout("llama4", config=GGUF_CONFIG, layer=GGUF_LAYER, fixed=GGUF_FIXED)
    tp_patterns: ClassVar[dict[str, str]] = LLAMA4_TP
    _no_split_modules: ClassVar[list[str]] = ["Llama4TextDecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Llama4TextModel(config))
