"""StableLM (stabilityai/stablelm-2-1_6b, stablelm-2-zephyr-1_6b, stablelm-3b-4e1t, stable-code-3b): pre-norm
layers of LayerNorm (with bias), grouped-query attention with optional q/k/v biases (`use_qkv_bias`, StableLM 2)
and no o_proj bias, RoPE on the first quarter of each head (`partial_rotary_factor`), a SiLU-gated MLP without
biases, and an untied head. Two options: `qk_layernorm`, a LayerNorm without bias of its own for each query and
key head (`q_layernorm.norms.<head>`, StableLM 2 12B), and `use_parallel_residual`, x + attn(ln(x)) + mlp(ln(x))
with no post_attention_layernorm.

config.json spells RoPE the old way (rope_theta and partial_rotary_factor at the top level, StableLM 2's files)
or the new one (rope_parameters); a config is written back in the spelling it was read in. transformers'
dropouts (hidden_dropout, attention_dropout) are kept in the config and not applied, as in every autolm family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PartialRotaryConfig, PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, GGUFLayout
from .base import LLAMA_TP, CausalLM, DecoderModel


@dataclass(repr=False)
class StableLmConfig(PartialRotaryConfig):
    """transformers' StableLmConfig. The LayerNorms' epsilon is `layer_norm_eps`; partial_rotary_factor (top-level
    in transformers 4's config.json, inside rope_parameters in 5's) defaults to 0.25, as transformers sets it.
    `StableLmConfig(partial_rotary_factor=..., rope_theta=...)` fills rope_parameters, as in transformers."""

    model_type: ClassVar[str] = "stablelm"
    rotary_factor: ClassVar[float] = 0.25
    # not in transformers' config: written when set
    absent_keys: ClassVar[tuple[str, ...]] = ("head_dim", "rms_norm_eps", "sliding_window")
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "use_qkv_bias",
        "qk_layernorm",
        "use_parallel_residual",
    )

    vocab_size: int = 50304
    intermediate_size: int = 6912
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    hidden_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    def validate(self) -> None:
        super().validate()
        src = self.source
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(
                f"{src}: head_dim is hidden_size / num_attention_heads in StableLM "
                f"({self.hidden_size} / {self.num_attention_heads}), found {self.head_dim!r}"
            )
        if not _is_number(self.layer_norm_eps) or not 0 < self.layer_norm_eps < 1:
            raise ConfigError(
                f"{src}: layer_norm_eps must be a positive number below 1, found {self.layer_norm_eps!r}"
            )
        if not _is_number(self.hidden_dropout) or not 0 <= self.hidden_dropout <= 1:
            raise ConfigError(
                f"{src}: hidden_dropout must be a number in [0, 1], found {self.hidden_dropout!r}"
            )


_dataclass_init = StableLmConfig.__init__


def _init(self, *, partial_rotary_factor=None, rope_theta=None, **kwargs: Any) -> None:
    """StableLmConfig(partial_rotary_factor=..., rope_theta=...) as in transformers."""
    if partial_rotary_factor is not None or rope_theta is not None:
        rope = dict(kwargs.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
        if rope_theta is not None:
            rope["rope_theta"] = rope_theta
        if partial_rotary_factor is not None:
            rope["partial_rotary_factor"] = partial_rotary_factor
        kwargs["rope_parameters"] = rope
    _dataclass_init(self, **kwargs)


StableLmConfig.__init__ = _init


class StableLmLayerNormPerHead(nn.Module):
    """transformers' per-head LayerNorms: `norms.<i>` (a LayerNorm without bias) normalises head i. Computed as
    one normalisation of every head in fp32, times each head's weight, cast back once (what each head's own
    LayerNorm computes, in one call instead of one per head). Under tensor parallelism every rank keeps every
    head's norm (a few numbers each) and applies its own heads' rows (`shard`), as the column-parallel q/k give it
    those heads."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(num_heads))
        self.dim, self.eps = dim, eps
        self.tp: tuple[int, int] | None = None

    def shard(self, rank: int, world: int) -> dict[str, tuple[int, int]]:
        """Tensor parallelism (on the meta model): the norms stay whole; this rank's heads are chosen in forward."""
        self.tp = (rank, world)
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, heads, hd) -> the same shape, head i normalised by norms[i]."""
        weight = torch.stack([norm.weight for norm in self.norms]).float()  # (heads, hd)
        if self.tp is not None:  # this rank's heads: a contiguous slice, as the colwise q/k rows
            weight = weight.chunk(self.tp[1])[self.tp[0]]
        return (F.layer_norm(x.float(), (self.dim,), eps=self.eps) * weight).to(x.dtype)


class StableLmAttention(Attention):
    """Attention with biases on q/k/v where `use_qkv_bias` says (none on o_proj); with qk_layernorm, a LayerNorm
    per query head and per key head (`q_layernorm`, `k_layernorm`)."""

    def __init__(self, config: StableLmConfig, layer_idx: int):
        nh, nkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        super().__init__(config.hidden_size, nh, nkv, hd, layer_idx, bias=config.use_qkv_bias, o_bias=False)
        if config.qk_layernorm:
            self.q_layernorm = StableLmLayerNormPerHead(hd, nh, config.layer_norm_eps)
            self.k_layernorm = StableLmLayerNormPerHead(hd, nkv, config.layer_norm_eps)
            self.qk_norm = "head"

    # Attention.forward's names for StableLM's q/k norms
    q_norm = property(lambda self: self.q_layernorm)
    k_norm = property(lambda self: self.k_layernorm)


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config: StableLmConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = StableLmAttention(config, layer_idx)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        if not config.use_parallel_residual:  # the parallel form has no second norm
            self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(h, ctx)
        if self.use_parallel_residual:  # x + attn(ln(x)) + mlp(ln(x)), summed in transformers' order
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class StableLmModel(DecoderModel):
    """embed_tokens, layers, norm (a LayerNorm with bias)."""

    def __init__(self, config: StableLmConfig):
        super().__init__(
            config, StableLmDecoderLayer, nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's stablelm keys: rope.dimension_count is the rotary dimensions of a head of hidden / heads (all
    of them where the file does not say), read back as the partial_rotary_factor transformers' int(head_dim *
    factor) turns into them."""
    heads, hidden, rotary = d.get("num_attention_heads"), d.get("hidden_size"), d.pop("head_dim", None)
    if not (_is_int(heads) and heads > 0 and _is_int(hidden) and hidden % heads == 0):
        return  # the config's validation names the key
    head_dim = hidden // heads
    if rotary is None:
        rotary = head_dim
    if _is_int(rotary) and 0 < rotary <= head_dim:
        factor = rotary / head_dim
        while int(head_dim * factor) < rotary:
            factor = math.nextafter(factor, 2.0)
        d["rope_parameters"]["partial_rotary_factor"] = factor


def gguf_write_config(m: dict[str, Any], c: StableLmConfig) -> None:
    """The inverse of gguf_config, as llama.cpp's StableLMModel writes it: the rotary dimensions, the residual's
    form, the LayerNorm epsilon; no vocabulary size, head size or RMS epsilon, and no RoPE base where it is
    llama.cpp's default (the converter writes none)."""
    for key in ("vocab_size", "attention.key_length", "attention.value_length",
                "attention.layer_norm_rms_epsilon"):  # fmt: skip
        m.pop(key, None)
    if m.get("rope.freq_base") == 10000.0:
        m.pop("rope.freq_base")
    m["rope.dimension_count"] = int(c.rope_parameters["partial_rotary_factor"] * c.head_dim)
    m["use_parallel_residual"] = c.use_parallel_residual


class StableLmForCausalLM(CausalLM):
    """transformers' StableLmForCausalLM (the head untied unless the config ties it)."""

    config_class = StableLmConfig
    # llama.cpp's StableLMModel: Llama's tensor names, q/k not permuted (NeoX-style RoPE), each layer's per-head
    # q/k norms stacked into one (heads, head_dim) tensor, biases and q/k norms read off the tensors
    gguf = GGUFLayout(
        "stablelm",
        config=(
            ("attention.layer_norm_epsilon", "layer_norm_eps"),
            ("use_parallel_residual", "use_parallel_residual"),
        ),
        present=(("blk.0.attn_q.bias", "use_qkv_bias"), ("blk.0.attn_q_norm.weight", "qk_layernorm")),
        stacked=(
            ("attn_q_norm", "self_attn.q_layernorm.norms"),
            ("attn_k_norm", "self_attn.k_layernorm.norms"),
        ),
        derive=gguf_config,
        write_config=gguf_write_config,
    )
    # transformers' StableLmConfig declares no base_model_tp_plan; here Llama's (heads split, the per-head q/k
    # LayerNorms whole on every rank, each rank applying its heads' rows; partial RoPE is per head)
    tp_patterns: ClassVar[dict[str, str]] = LLAMA_TP
    _no_split_modules: ClassVar[list[str]] = ["StableLmDecoderLayer"]

    def __init__(self, config: StableLmConfig):
        super().__init__(config, StableLmModel(config))
