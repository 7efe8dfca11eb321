"""MPT (MosaicML's MPT-7B, MPT-30B and their Instruct / Chat / StoryWriter versions): pre-norm layers of LayerNorm
without bias, multi-head attention whose q/k/v are one fused `Wqkv` (rows [q | k | v]) with its output clamped
to [-clip_qkv, clip_qkv] when attn_config.clip_qkv is set, no position embeddings but ALiBi: each head's scores
biased by its slope times the key's position counted back from the last key (transformers' bias; softmax does
not see a row's constant, so the shared attention's bias by key slot computes the same), a plain GELU MLP
up_proj -> down_proj (4 * d_model wide), no biases anywhere, the head tied to the embeddings.

The slopes are MPT's (`build_mpt_alibi_tensor`): for n heads and m the next power of two at or above n, head i of m
has slope 2^(-8 (i + 1) / m); with m != n the odd-indexed ones come first, then the even ones, cut to n. The 8 is
attn_config.alibi_bias_max, which transformers' MPT never reads: it always builds the slopes with 8, so a config
with another value is refused (naming the key), as is any setting transformers' MptForCausalLM does not compute
(see MptConfig.validate): autolm loads what transformers runs, and computes it the same.

config.json nests the attention's settings in `attn_config` (clip_qkv, softmax_scale, alibi_bias_max read into
fields; its other keys kept as read and written back); the top level names d_model, n_heads, n_layers,
max_seq_len and layer_norm_epsilon. transformers' names: the body is `transformer` (wte, blocks, norm_f), each
block norm_1, attn (Wqkv, out_proj), norm_2, ffn (up_proj, down_proj); autolm's code reaches them as `model`,
`embed_tokens`, `layers` and `norm`. There is no tensor-parallel plan (transformers has none for MPT).
transformers' MPT cannot run past max_seq_len (its bias table's length); ALiBi needs no table here, so autolm
runs on, as MosaicML's own code and llama.cpp do (MPT-7B-StoryWriter's longer contexts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_number
from ..config_fields import config_json_names
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GGUFLayout, Linear
from .base import CausalLM, DecoderModel

# the fields read from attn_config (field -> its key there)
NESTED = {"clip_qkv": "clip_qkv", "softmax_scale": "softmax_scale", "alibi_bias_max": "alibi_bias_max"}
# attn_config settings transformers' MPT does not compute: the only value it runs (its default) for each
ATTN_DEFAULTS = {
    "alibi": True,  # without ALiBi MPT has learned positions (wpe), which transformers' model lacks
    "attn_type": "multihead_attention",  # transformers' Wqkv is always 3 * d_model wide
    "qk_ln": False,  # transformers' attention has no q/k LayerNorms
    "prefix_lm": False,  # transformers' mask is causal only
    "attn_uses_sequence_id": False,  # nor does it mask by sequence id
    "rope": False,  # llm-foundry's RoPE variant: not in transformers' model
    "sliding_window_size": -1,  # llm-foundry's sliding window (-1: none): transformers' mask has none
}
# top-level settings transformers' MPT does not compute: the values it runs
TOP_DEFAULTS = {"expansion_ratio": 4, "no_bias": True, "logit_scale": None}
# config.json's name for each field, in error messages
_KEY_NAMES = {
    "hidden_size": "d_model",
    "num_attention_heads": "n_heads",
    "num_hidden_layers": "n_layers",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "layer_norm_epsilon",
    **{field: f"attn_config.{key}" for field, key in NESTED.items()},
}
# fields of the common config that MPT's config.json does not have at its top level
_NOT_WRITTEN = ("intermediate_size", "hidden_act", "num_key_value_heads", "head_dim", "attention_dropout",
                "sliding_window", "rope_parameters", "rope_theta", "rope_scaling", *NESTED)  # fmt: skip


@dataclass(repr=False)
class MptConfig(PretrainedConfig):
    """transformers' MptConfig and its defaults (use_cache false, a tied head, no token ids), attn_config read as
    the module docstring says. The MLP is 4 * d_model wide (intermediate_size) and exact GELU (hidden_act), as in
    transformers; keys that change no computation (the dropouts, init_device, embedding_fraction, learned_pos_emb,
    which ALiBi turns off) are kept as config.json gives them."""

    model_type: ClassVar[str] = "mpt"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "layer_norm_epsilon",
    }
    activations: ClassVar[tuple[str, ...]] = ("gelu",)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "no_bias")

    vocab_size: int = 50368
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_cache: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    expansion_ratio: int = 4
    no_bias: bool = True
    logit_scale: float | str | None = None
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    alibi_bias_max: int = 8

    def __post_init__(self) -> None:
        attn = self.extra.get("attn_config")
        if attn is None:
            self.extra.pop("attn_config", None)
        elif not isinstance(attn, dict):
            raise ConfigError(f"{self.source}: attn_config must be an object, found {attn!r}")
        for field, key in NESTED.items():
            if key in self.extra.get("attn_config", {}):
                setattr(self, field, self.extra["attn_config"][key])
        self.num_key_value_heads = self.head_dim = None  # every head its own k/v; d_model / n_heads
        self.intermediate_size = (
            4 * self.hidden_size if isinstance(self.hidden_size, int) else self.hidden_size
        )
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(
                re.sub(rf"\b({'|'.join(_KEY_NAMES)})\b", lambda m: _KEY_NAMES[m[1]], str(e))
            ) from None

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # ALiBi, no RoPE

    def validate(self) -> None:
        super().validate()
        src = self.source
        for name in ("clip_qkv", "softmax_scale"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and v > 0):
                raise ConfigError(f"{src}: attn_config.{name} must be a positive number or null, found {v!r}")
        if self.alibi_bias_max != 8 or isinstance(self.alibi_bias_max, bool):
            raise ConfigError(
                f"{src}: attn_config.alibi_bias_max must be 8, found {self.alibi_bias_max!r} (transformers' MPT "
                "builds its ALiBi slopes with 8 whatever the config says)"
            )
        attn = self.extra.get("attn_config", {})
        for key, want in ATTN_DEFAULTS.items():
            if attn.get(key, want) != want:
                raise ConfigError(
                    f"{src}: attn_config.{key} {attn[key]!r} is not supported: transformers' MPT computes "
                    f"{key} {want!r} only"
                )
        for key, want in TOP_DEFAULTS.items():
            v = getattr(self, key)
            if v != want or isinstance(v, bool) is not isinstance(want, bool):
                raise ConfigError(
                    f"{src}: {key} {v!r} is not supported: transformers' MPT computes {key} {want!r} only"
                )
        norm = self.extra.get("norm_type", "low_precision_layernorm")
        if norm not in ("low_precision_layernorm", "layernorm"):
            raise ConfigError(
                f"{src}: norm_type {norm!r} is not supported (transformers' MPT uses LayerNorm: expected "
                "'low_precision_layernorm' or 'layernorm')"
            )
        ffn = self.extra.get("ffn_config") or {}
        if not isinstance(ffn, dict) or ffn.get("ffn_type", "mptmlp") != "mptmlp":
            raise ConfigError(f"{src}: ffn_config {ffn!r} is not supported (transformers' MPT has the plain MLP, "
                              "ffn_type 'mptmlp')")  # fmt: skip

    @property
    def alibi_slopes(self) -> list[float]:
        """Each head's ALiBi slope, as transformers' build_mpt_alibi_tensor computes it (in float32; on the CPU
        whatever the default device, the model being built on the meta device)."""
        n = self.num_attention_heads
        m = 2 ** math.ceil(math.log2(n))
        base = torch.arange(1, m + 1, dtype=torch.int64, device="cpu").float() * (self.alibi_bias_max / m)
        slopes = 1.0 / torch.pow(2, base)
        if m != n:
            slopes = torch.cat([slopes[1::2], slopes[::2]])[:n]
        return slopes.tolist()

    def to_dict(self) -> dict[str, Any]:
        """config.json: the fields in attn_config (with its other keys as read)."""
        out = super().to_dict()
        attn = dict(self.extra.get("attn_config", {}))
        attn.update((key, getattr(self, field)) for field, key in NESTED.items())
        for key in _NOT_WRITTEN:
            out.pop(key, None)
        return {**out, "attn_config": attn}


# keys that are no field (attn_config, the dropouts) kept as unknown keys
config_json_names(MptConfig, keep_unknown=True)


class MptAttention(Attention):
    """`Wqkv` (rows [q | k | v]) clamped to [-clip_qkv, clip_qkv] when set, and `out_proj`; no biases, no RoPE,
    MPT's ALiBi slopes; the scale attn_config.softmax_scale, else 1/sqrt(head_dim)."""

    def __init__(self, config: MptConfig, layer_idx: int):
        h, n, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        scale = config.softmax_scale if config.softmax_scale is not None else 1 / math.sqrt(h / n)
        super().__init__(h, n, n, hd, layer_idx, scale=scale, rope=None, alibi=config.alibi_slopes)
        self.clip_qkv = config.clip_qkv

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        self.Wqkv = Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = Linear(hidden, hidden, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        return q, k, v

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: MPT calls it out_proj."""
        return self.out_proj


class MptMLP(nn.Module):
    """up_proj -> exact GELU -> down_proj, 4 * d_model wide, no biases."""

    def __init__(self, config: MptConfig):
        super().__init__()
        h = config.hidden_size
        self.up_proj = Linear(h, config.intermediate_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]
        self.down_proj = Linear(config.intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MptBlock(nn.Module):
    """x += attn(norm_1(x)); x += ffn(norm_2(x)); LayerNorms without bias."""

    def __init__(self, config: MptConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_epsilon
        self.norm_1 = nn.LayerNorm(h, eps=eps, bias=False)
        self.attn = MptAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(h, eps=eps, bias=False)
        self.ffn = MptMLP(config)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = self.attn(self.norm_1(x), ctx) + x
        return self.ffn(self.norm_2(x)) + x


class MptModel(DecoderModel):
    """wte, blocks, norm_f; `embed_tokens`, `layers` and `norm` name them (also when assigned)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "wte", "layers": "blocks", "norm": "norm_f"}

    def __init__(self, config: MptConfig):
        norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        super().__init__(config, MptBlock, norm)


def gguf_config(d: dict[str, Any], get) -> None:
    """llama.cpp's mpt metadata: feed_forward_length is 4 * d_model (read as expansion_ratio); max_alibi_bias a
    float (an integral one read as the integer config.json holds)."""
    ff, h = d.pop("intermediate_size", None), d.get("hidden_size")
    if ff is not None and isinstance(h, int) and h > 0:
        d["expansion_ratio"] = ff // h if ff % h == 0 else ff / h
    bias = d.get("alibi_bias_max")
    if isinstance(bias, float) and bias.is_integer():
        d["alibi_bias_max"] = int(bias)


def gguf_write_config(m: dict[str, Any], c: MptConfig) -> None:
    """What llama.cpp's MPTModel writes: context length, sizes, head count, LayerNorm's epsilon, clamp_kqv where
    clip_qkv is set and max_alibi_bias (floats); no vocabulary size, KV head count, head size, RoPE or RMS
    epsilon."""
    for key in ("vocab_size", "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "rope.freq_base", "rope.dimension_count", "attention.layer_norm_rms_epsilon"):  # fmt: skip
        m.pop(key, None)
    if c.clip_qkv is not None:
        m["attention.clamp_kqv"] = float(c.clip_qkv)
    m["attention.max_alibi_bias"] = float(c.alibi_bias_max)


class MptForCausalLM(CausalLM):
    """transformers' MptForCausalLM (the LM head tied to wte)."""

    config_class = MptConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.blocks"
    embeddings_name = "transformer.wte"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none, as in transformers
    _no_split_modules: ClassVar[list[str]] = ["MptBlock"]
    # llama.cpp's mpt graph: Wqkv fused as it is (attn_qkv), clamped by clamp_kqv, ALiBi with max_alibi_bias (its
    # slopes for any head count equal MPT's), the scale 1/sqrt(head_dim) always (softmax_scale unset)
    gguf = GGUFLayout(
        "mpt",
        config=(
            ("attention.layer_norm_epsilon", "layer_norm_epsilon"),
            ("attention.clamp_kqv", "clip_qkv"),
            ("attention.max_alibi_bias", "alibi_bias_max"),
        ),
        layer=(
            ("attn_norm", "norm_1"),
            ("attn_qkv", "attn.Wqkv"),
            ("attn_output", "attn.out_proj"),
            ("ffn_norm", "norm_2"),
            ("ffn_up", "ffn.up_proj"),
            ("ffn_down", "ffn.down_proj"),
        ),
        top=(("token_embd", "transformer.wte"), ("output_norm", "transformer.norm_f")),
        fixed=(("softmax_scale", None),),
        derive=gguf_config,
        write_config=gguf_write_config,
    )

    def __init__(self, config: MptConfig):
        super().__init__(config, MptModel(config))

    @property
    def model(self) -> MptModel:
        """The body (`transformer`), by the name autolm's code uses in every family."""
        return self.transformer
