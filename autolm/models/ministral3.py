"""Ministral 3 (Mistral's Ministral 3 3B / 8B / 14B, text model_type ministral3): Mistral's layer (no biases, GQA,
a sliding window on every layer only where sliding_window is set; layer_types is not read) with YaRN RoPE and
Llama 4's attention temperature: after RoPE, each query is multiplied by
1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings)), both read from
rope_parameters (1 below the original context length). Keys are not scaled.

The released checkpoints are image-text (model_type mistral3, Mistral3ForConditionalGeneration, which
transformers' AutoModelForCausalLM does not load): autolm runs their language model (autolm.models.image_text),
a Ministral 3, or a Mistral where text_config says so (Mistral Small 3.1 / 3.2), as transformers' text models.

GGUF: llama.cpp's converter writes Ministral3ForCausalLM as "mistral3": Llama's keys and q/k permutation, YaRN's
keys, mscale_all_dim as rope.scaling.yarn_log_multiplier and llama_4_scaling_beta as
attention.temperature_scale; its graph scales queries from rope.scaling.original_context_length, turns RoPE with
no YaRN attention factor (transformers' mscale / mscale_all_dim ratio, so both must agree) and has no sliding
window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config_fields import _is_number
from ..errors import ConfigError
from ..nn import Attention, GGUFLayout, RMSNorm, Rotary, apply_rotary
from ..nn.rope import inv_freq_and_scale
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig
from .llama import LlamaDecoderLayer
from .mistral import MistralConfig

SCALE = (
    "llama_4_scaling"  # the per-position query scale, carried with the RoPE tables (a (scale, scale) pair)
)
_BETA, _ORIGINAL = "llama_4_scaling_beta", "original_max_position_embeddings"


def _default_rope(max_position_embeddings: int | None) -> dict[str, Any]:
    """transformers' Ministral3Config RoPE where the config gives none (the released models' settings)."""
    return {
        "type": "yarn",
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 16.0,
        _ORIGINAL: 16384,
        "max_position_embeddings": max_position_embeddings,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale_all_dim": 1.0,
        "mscale": 1.0,
        _BETA: 0.1,
    }


def rope_as_given(d: dict[str, Any], length: int, default, read) -> tuple[dict[str, Any], str]:
    """rope_parameters (or v4's rope_scaling) as `read` (the config class's base reading) reads them, the "type"
    spelling kept where the file has it (as transformers keeps it); `default(max_position_embeddings)` (transformers'
    YaRN default) where the config gives neither (a top-level rope_theta too: transformers keeps its default)."""
    given = d.get("rope_parameters") if d.get("rope_parameters") is not None else d.get("rope_scaling")
    if given is None:
        return default(d.get("max_position_embeddings", length)), "v5"
    rope, spelling = read()
    if isinstance(given, dict) and "type" in given:
        rope["type"] = given["type"]
    return rope, spelling


@dataclass(repr=False)
class Ministral3Config(MistralConfig):
    """transformers' Ministral3Config."""

    model_type: ClassVar[str] = "ministral3"
    absent_keys: ClassVar[tuple[str, ...]] = (
        "attention_bias",
        "max_window_layers",
        "mlp_bias",
        "use_sliding_window",
    )  # not in transformers' config: written when set
    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 11
    sliding_window: int | None = None
    rope_parameters: dict[str, Any] = field(default_factory=lambda: _default_rope(None))

    @classmethod
    def read_rope(cls, d: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
        base = super().read_rope
        return rope_as_given(d, cls.max_position_embeddings, _default_rope, lambda: base(d, source))

    def __post_init__(self) -> None:
        if (
            isinstance(self.rope_parameters, dict)
            and self.rope_parameters.get("max_position_embeddings", 0) is None
        ):
            self.rope_parameters = {
                **self.rope_parameters,
                "max_position_embeddings": self.max_position_embeddings,
            }
        super().__post_init__()

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window  # transformers' Ministral3 reads no layer_types

    def validate(self) -> None:
        super().validate()
        rope = self.rope_parameters
        for key, positive in ((_BETA, False), (_ORIGINAL, True)):
            value = rope.get(key)
            if not _is_number(value) or value < 0 or (positive and value <= 0):
                raise ConfigError(
                    f"{self.source}: rope_parameters[{key!r}] must be a {'positive' if positive else 'non-negative'}"
                    f" number (Ministral 3's attention temperature), found {value!r}"
                )


class Llama4ScaledRotary(Rotary):
    """The RoPE tables, plus SCALE: each position's query scale (B, 1, T, 1), in the tables' dtype."""

    def __init__(self, config: Ministral3Config):
        super().__init__(config.rope_kinds(), config.head_dim, config.max_position_embeddings)
        self.beta = float(config.rope_parameters[_BETA])
        self.original = float(config.rope_parameters[_ORIGINAL])
        self.rotary = Rotary(dict(self.kinds), config.head_dim, config.max_position_embeddings)
        self.kinds = {**self.kinds, SCALE: {}}

    def tables(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = self.rotary.tables(position_ids, dtype)
        scale = 1 + self.beta * torch.log(1 + torch.floor(position_ids / self.original))
        scale = scale[:, None, :, None].to(dtype)
        out[SCALE] = (scale, scale)
        return out

    def switch_length(self) -> int | None:
        return self.rotary.switch_length()


class Ministral3Attention(Attention):
    """Mistral's attention with the queries scaled by position after RoPE."""

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = ctx.rope[self.rope]
        q = apply_rotary(q, cos, sin) * ctx.rope[SCALE][0]
        k = apply_rotary(k, cos, sin)
        y = ctx.attend(self.layer_idx, q, k, v, self.sliding_window, self.scaling)
        return self.o_proj(y.reshape(B, T, nh * hd))


class Ministral3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = Ministral3Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            window=config.layer_window(layer_idx),
        )


class Ministral3Model(DecoderModel):
    def __init__(self, config: Any):
        super().__init__(config, Ministral3DecoderLayer, RMSNorm(config.hidden_size, config.rms_norm_eps))
        self.rotary = Llama4ScaledRotary(config)


def _gguf_derive(d: dict[str, Any], get) -> None:
    """llama.cpp's reading of a mistral3 file: the temperature's beta from attention.temperature_scale (none: no
    scaling) over rope.scaling.original_context_length (the training context where absent); YaRN's betas where
    given, and tables unscaled (mscale = mscale_all_dim)."""
    rope = d["rope_parameters"]
    beta = get("attention.temperature_scale")
    rope[_BETA] = float(beta) if _is_number(beta) else 0.0
    if rope.get(_ORIGINAL) is None:
        rope[_ORIGINAL] = d.get("max_position_embeddings")
    if rope.get("rope_type") == "yarn":
        for key in ("beta_fast", "beta_slow"):
            value = get(f"rope.scaling.yarn_{key}")
            if value is not None:
                rope[key] = value
        log_mul = get("rope.scaling.yarn_log_multiplier")
        rope["mscale"] = rope["mscale_all_dim"] = float(log_mul) if _is_number(log_mul) else 1.0


def _gguf_write_config(m: dict[str, Any], c: Ministral3Config) -> None:
    """The inverse of _gguf_derive, as the converter's Ministral3Model writes it; it converts YaRN RoPE only, and
    llama.cpp's graph applies no YaRN attention factor."""
    rope = c.rope_parameters
    if rope.get("rope_type") != "yarn" or not _is_number(rope.get("mscale_all_dim")):
        raise ConfigError(
            "ministral3: llama.cpp's converter writes YaRN RoPE with mscale_all_dim only, found rope_parameters "
            f"{rope}"
        )
    _, scale = inv_freq_and_scale(rope, c.head_dim, c.max_position_embeddings)
    if abs(scale - 1.0) > 1e-6:
        raise ConfigError(
            f"ministral3: rope_parameters mscale / mscale_all_dim / attention_factor give a YaRN attention factor "
            f"of {scale}; llama.cpp's mistral3 applies none"
        )
    m["rope.scaling.yarn_log_multiplier"] = float(rope["mscale_all_dim"])
    m["attention.temperature_scale"] = float(rope[_BETA])


class Mistral3Config(ImageTextConfig):
    """transformers' Mistral3Config (Mistral3ForConditionalGeneration): its language model's, a Mistral by default
    or a Ministral 3 (text_config's model_type); the head tied by the outer config (tied by default)."""

    model_type: ClassVar[str] = "mistral3"
    text_class: ClassVar[type] = MistralConfig
    text_classes: ClassVar[dict[str, type]] = {"ministral3": Ministral3Config}
    tie_default: ClassVar[bool | None] = True


class Ministral3ForCausalLM(CausalLM):
    """transformers' Ministral3ForCausalLM."""

    config_class = Ministral3Config
    gguf = GGUFLayout(
        "mistral3",
        permute_qk=True,
        fixed=(("sliding_window", None),),
        derive=_gguf_derive,
        write_config=_gguf_write_config,
    )
    _no_split_modules: ClassVar[list[str]] = ["Ministral3DecoderLayer"]

    def __init__(self, config: Any):
        super().__init__(config, Ministral3Model(config))
