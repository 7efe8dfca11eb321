"""Gemma 2: Llama-shaped attention and gated MLP with Gemma's arithmetic.

- RMSNorm times (1 + w), in fp32, and four of them per layer: before and after attention, before and after the MLP;
- GeLU (tanh) gate, read from `hidden_activation` (transformers ignores `hidden_act` for Gemma 2 and 3);
- token embeddings times sqrt(hidden_size) in the embeddings' dtype: transformers' scaled embedding module does
  it, so `inputs_embeds` a user passes are taken as they are;
- attention scores scaled by query_pre_attn_scalar ** -0.5 and soft-capped (tanh) at attn_logit_softcapping;
- sliding-window and global layers alternating (`layer_types`); logits soft-capped at final_logit_softcapping.

Gemma 3's text model (gemma3.py) is this layer with q/k norms and a RoPE table per layer type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS, Attention, GatedMLP, GGUFLayout, RMSNorm
from .base import CausalLM, DecoderModel


def takes_hidden_activation(cls):
    """cls(hidden_activation=...) as transformers' Gemma configs take it (autolm's field is hidden_act)."""
    init = cls.__init__

    def __init__(self, *args: Any, hidden_activation: str | None = None, **kwargs: Any) -> None:
        if hidden_activation is not None:
            kwargs["hidden_act"] = hidden_activation
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@takes_hidden_activation
@dataclass(repr=False)
class Gemma2Config(PretrainedConfig):
    """transformers' Gemma2Config (its field names and defaults)."""

    model_type: ClassVar[str] = "gemma2"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_act": "hidden_activation"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "attention_bias")

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"  # config.json's hidden_activation (attribute_map)
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Gemma2Config:
        """As PretrainedConfig reads it; a `hidden_act` key, which transformers ignores for Gemma (the activation
        is `hidden_activation`), is kept as read instead of naming the activation."""
        d = {**d, **overrides}
        ignored = {"hidden_act": d.pop("hidden_act")} if "hidden_act" in d else {}
        config = super().from_dict(d, source)
        config.extra.update(ignored)
        return config

    def __post_init__(self) -> None:
        if self.layer_types is None and _is_int(self.num_hidden_layers) and self.num_hidden_layers > 0:
            n = self.default_pattern()
            self.layer_types = [
                "sliding_attention" if (i + 1) % n else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        super().__post_init__()

    def default_pattern(self) -> int:
        """Where layer_types is not given, every n-th layer is global and the others slide: n."""
        return 2

    @property
    def hidden_activation(self) -> str:
        return self.hidden_act

    @hidden_activation.setter
    def hidden_activation(self, value: str) -> None:
        self.hidden_act = value

    @property
    def qk_norm(self) -> bool:
        return False

    @property
    def attn_softcap(self) -> float | None:
        """The soft-cap the attention applies to its scores."""
        return self.attn_logit_softcapping

    def layer_rope(self, i: int) -> str:
        """The RoPE table layer i reads (see rope_kinds)."""
        return "default"

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_number(self.query_pre_attn_scalar) or self.query_pre_attn_scalar <= 0:
            raise ConfigError(
                f"{src}: query_pre_attn_scalar must be a positive number, found {self.query_pre_attn_scalar!r}"
            )
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            v = getattr(self, name)
            if v is not None and (not _is_number(v) or v <= 0):
                raise ConfigError(f"{src}: {name} must be a positive number or null, found {v!r}")
        if self.use_bidirectional_attention:
            raise ConfigError(
                f"{src}: use_bidirectional_attention is true (an encoder, e.g. EmbeddingGemma); autolm runs causal "
                "language models only"
            )


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps

        def norm(dim: int) -> RMSNorm:
            return RMSNorm(dim, eps, offset=1.0)

        self.self_attn = Attention(
            h,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            layer_idx,
            bias=config.attention_bias,
            scale=config.query_pre_attn_scalar**-0.5,
            window=config.layer_window(layer_idx),
            rope=config.layer_rope(layer_idx),
            qk_norm="head" if config.qk_norm else None,
            norm=norm,
            softcap=config.attn_softcap,
        )
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm = norm(h)
        self.post_attention_layernorm = norm(h)
        self.pre_feedforward_layernorm = norm(h)
        self.post_feedforward_layernorm = norm(h)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(DecoderModel):
    def __init__(self, config: Any, layer_cls: type[nn.Module] = Gemma2DecoderLayer):
        super().__init__(config, layer_cls, RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0))
        self.embed_scale = config.hidden_size**0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers multiplies by its scale buffer cast to the embeddings' dtype (rounded in bf16)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """tanh soft-capping of logits at +-cap (None: unchanged)."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def gguf_derive(big_layers: int, pattern: int):
    """What llama.cpp derives for a Gemma GGUF instead of reading it: the attention scale (hidden / heads for the
    27B model, known by its layer count, else head_dim) and the sliding layers (every `pattern`-th global unless
    the file gives attention.sliding_window_pattern, a count or a list of flags)."""

    def derive(d: dict[str, Any], get) -> None:
        layers, hidden, heads = d.get("num_hidden_layers"), d.get("hidden_size"), d.get("num_attention_heads")
        if not all(_is_int(v) and v > 0 for v in (layers, hidden, heads)):
            return  # the config's validation names what is wrong
        head_dim = d.setdefault("head_dim", hidden // heads)  # llama.cpp's default, not Gemma's 256
        d.setdefault("query_pre_attn_scalar", hidden // heads if layers == big_layers else head_dim)
        swa = get("attention.sliding_window_pattern", pattern)
        if isinstance(swa, list):
            flags = [bool(f) for f in swa[:layers]]
        else:
            n = swa if _is_int(swa) else pattern
            flags = [n == 0 or i % n < n - 1 for i in range(layers)]
        d.setdefault("layer_types", ["sliding_attention" if f else "full_attention" for f in flags])

    return derive


# llama.cpp's Gemma tensor names where they differ from Llama's (its ffn_norm is the pre-MLP norm)
GEMMA_GGUF_LAYER = (
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
)


class Gemma2ForCausalLM(CausalLM):
    """transformers' Gemma2ForCausalLM."""

    config_class = Gemma2Config
    gguf = GGUFLayout(
        "gemma2",
        config=(
            ("attention.key_length", "head_dim"),
            ("attn_logit_softcapping", "attn_logit_softcapping"),
            ("final_logit_softcapping", "final_logit_softcapping"),
        ),
        layer=GEMMA_GGUF_LAYER,
        norm_shift=1.0,
        derive=gguf_derive(big_layers=46, pattern=2),
    )
    _no_split_modules: ClassVar[list[str]] = ["Gemma2DecoderLayer"]

    def __init__(self, config: Any, model: DecoderModel | None = None):
        super().__init__(config, model or Gemma2Model(config))
        self.final_logit_softcapping = (
            config.final_logit_softcapping
        )  # a setting of the compiled head's graph

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return softcap(logits, self.final_logit_softcapping)
