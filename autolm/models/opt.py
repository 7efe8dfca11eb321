"""OPT (Meta's OPT-125m ... 66B and their fine-tunes): learned position embeddings read two rows past each position
(fairseq's padding offset), LayerNorm with bias (or without any parameters: layer_norm_elementwise_affine=False),
multi-head attention with q/k/v/out_proj (biased unless enable_bias=False), a plain ReLU MLP fc1 -> fc2, a tied head.

Two layouts: pre-norm layers (do_layer_norm_before, OPT-125m and 1.3B up) with a final LayerNorm after the last layer
(none where `_remove_final_layer_norm`, old fine-tunes), or post-norm layers (OPT-350m: each residual sum is normed,
no final LayerNorm). OPT-350m also embeds words in word_embed_proj_dim (512) < hidden_size (1024): `project_in`
widens the token embeddings before the position embeddings are added, `project_out` narrows the last hidden states
back for the head (which is tied to the narrow embeddings).

transformers' names: the body is `model.decoder` (embed_tokens, embed_positions, project_in/out, layers,
final_layer_norm) under `model`; autolm's code reaches the decoder as `model` and its final norm as `norm`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int, _is_number
from ..config_fields import config_json_names
from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, Attention, Linear, embedding
from .base import CausalLM, DecoderModel
from .image_text import ImageTextConfig

_OFFSET = 2  # OPT's position embeddings start at row 2 (rows 0 and 1 were fairseq's padding)
# config fields OPT's config.json does not have (OPT has no grouped KV heads, no RoPE, no epsilon of its own)
_NOT_OPT = ("num_key_value_heads", "head_dim", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling",
            "rms_norm_eps")  # fmt: skip


@dataclass(repr=False)
class OPTConfig(PretrainedConfig):
    """transformers' OPTConfig: config.json names the MLP width `ffn_dim` and the activation
    `activation_function` (attributes too). word_embed_proj_dim defaults to hidden_size. LayerNorm's epsilon is
    PyTorch's default (1e-5); dropout, layerdrop and init_std change no inference and are kept as given."""

    model_type: ClassVar[str] = "opt"
    attribute_map: ClassVar[dict[str, str]] = {
        "intermediate_size": "ffn_dim",
        "hidden_act": "activation_function",
    }
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "do_layer_norm_before",
        "_remove_final_layer_norm",
        "enable_bias",
        "layer_norm_elementwise_affine",
    )

    vocab_size: int = 50272
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    hidden_act: str = "relu"
    rms_norm_eps: float = 1e-5  # nn.LayerNorm's default: OPT's config has no epsilon
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    word_embed_proj_dim: int | None = None
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True

    def __post_init__(self) -> None:
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    @property
    def embedding_width(self) -> int:
        return self.word_embed_proj_dim

    def validate(self) -> None:
        super().validate()
        d = self.word_embed_proj_dim
        if not (_is_int(d) and 0 < d <= 1 << 17):
            raise ConfigError(
                f"{self.source}: word_embed_proj_dim must be a positive integer or null, found {d!r}"
            )
        for key in ("dropout", "layerdrop"):
            v = self.extra.get(key, 0.0)
            if not (_is_number(v) and 0 <= v <= 1):
                raise ConfigError(f"{self.source}: {key} must be a number in [0, 1], found {v!r}")

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_OPT:
            out.pop(key, None)
        return out


config_json_names(OPTConfig)


class OPTAttention(Attention):
    """Multi-head attention (no RoPE) whose output projection is `out_proj`."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        n = config.num_attention_heads
        super().__init__(
            config.hidden_size, n, n, config.head_dim, layer_idx, bias=config.enable_bias, rope=None
        )

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        super().make_projections(hidden, bias, o_bias)
        self.out_proj = self._modules.pop("o_proj")

    @property
    def o_proj(self) -> Linear:
        """Attention.forward's output projection: OPT calls it out_proj."""
        return self.out_proj


def _layer_norm(config: OPTConfig, dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=config.rms_norm_eps, elementwise_affine=config.layer_norm_elementwise_affine)


class OPTDecoderLayer(nn.Module):
    """self_attn, then fc1 -> activation -> fc2, each a residual branch; their LayerNorms (self_attn_layer_norm,
    final_layer_norm) norm the branch's input (pre-norm) or the residual sum after it (post-norm, OPT-350m)."""

    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        h, bias = config.hidden_size, config.enable_bias
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.act = ACTIVATIONS[config.hidden_act]
        self.self_attn_layer_norm = _layer_norm(config, h)
        self.fc1 = Linear(h, config.intermediate_size, bias=bias)
        self.fc2 = Linear(config.intermediate_size, h, bias=bias)
        self.final_layer_norm = _layer_norm(config, h)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        pre = self.do_layer_norm_before
        x = x + self.self_attn(self.self_attn_layer_norm(x) if pre else x, ctx)
        if not pre:
            x = self.self_attn_layer_norm(x)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x) if pre else x)))
        return x if pre else self.final_layer_norm(x)


class OPTDecoder(DecoderModel):
    """embed_tokens (word_embed_proj_dim wide), embed_positions (max_position_embeddings + 2 rows), project_in,
    layers, final_layer_norm, project_out; `norm` names final_layer_norm (None where OPT has none)."""

    def __init__(self, config: OPTConfig):
        final = config.do_layer_norm_before and not config._remove_final_layer_norm
        super().__init__(config, OPTDecoderLayer, _layer_norm(config, config.hidden_size) if final else None)
        h, d = config.hidden_size, config.word_embed_proj_dim
        if d != h:
            self.embed_tokens = embedding(config.vocab_size, d)
        self.embed_positions = embedding(config.max_position_embeddings + _OFFSET, h)
        self.project_in = Linear(d, h, bias=False) if d != h else None
        self.project_out = Linear(h, d, bias=False) if d != h else None
        order = ("embed_tokens", "embed_positions", "project_in", "layers", "final_layer_norm", "project_out")
        self._modules = {k: self._modules[k] for k in order if k in self._modules}  # forward's order

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__("final_layer_norm" if name == "norm" else name, value)

    norm = property(lambda self: self.final_layer_norm)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token vectors widened by project_in (OPT-350m), plus the learned embeddings of their positions (B, T)
        (the padding mask's positions), read 2 rows on."""
        n = self.embed_positions.num_embeddings - _OFFSET
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(
                f"position {int(position_ids.max())} is past OPT's {n} learned positions "
                "(max_position_embeddings): shorten the prompt or max_new_tokens"
            )
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(position_ids + _OFFSET)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm (pre-norm OPT), then project_out back to the embeddings' width (OPT-350m)."""
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTModel(nn.Module):
    """transformers' OPTModel, the module named `model`: it holds only the decoder, and answers for it (autolm's
    code reaches the body's parts as `model.embed_tokens`, `model.layers`, ... and runs `model(...)`)."""

    _DELEGATED: ClassVar[tuple[str, ...]] = ("embed_tokens", "embed_positions", "project_in", "project_out",
                                             "layers", "norm", "final_layer_norm", "gradient_checkpointing")  # fmt: skip

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            decoder = self.__dict__.get("_modules", {}).get("decoder")  # none while built or unpickled
            if decoder is None:
                raise
            return getattr(decoder, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._DELEGATED:
            setattr(self.decoder, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.decoder(*args, **kwargs)


class Blip2Config(ImageTextConfig):
    """transformers' Blip2Config (BLIP-2): its language model's, an OPT (or another family autolm ships), its head
    tied by text_config's own setting (transformers builds the language model from text_config alone); the
    Q-Former, its query tokens and projection skipped. A T5 (encoder-decoder) language model is refused."""

    model_type: ClassVar[str] = "blip-2"
    text_class: ClassVar[type] = OPTConfig

    @classmethod
    def tie(cls, outer: dict[str, Any], text: dict[str, Any]) -> bool | None:
        return text.get("tie_word_embeddings")

    @classmethod
    def text_class_of(cls, kind: Any, source: str) -> type:
        from . import model_types

        if kind is not None and kind not in model_types():
            raise ConfigError(f"{source}: text_config.model_type is {kind!r}: autolm runs {cls.model_type}'s "
                              "decoder-only language models (OPT and the families it ships), not this one")  # fmt: skip
        return super().text_class_of(kind, source)


class InstructBlipConfig(Blip2Config):
    """transformers' InstructBlipConfig (InstructBLIP), read as Blip2Config."""

    model_type: ClassVar[str] = "instructblip"


class InstructBlipVideoConfig(Blip2Config):
    """transformers' InstructBlipVideoConfig (InstructBLIP-Video), read as Blip2Config."""

    model_type: ClassVar[str] = "instructblipvideo"


class OPTForCausalLM(CausalLM):
    """transformers' OPTForCausalLM: the head reads word_embed_proj_dim features, tied to embed_tokens unless the
    config unties it."""

    config_class = OPTConfig
    layers_prefix = "model.decoder.layers"
    embeddings_name = "model.decoder.embed_tokens"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan for OPT
    _no_split_modules: ClassVar[list[str]] = ["OPTDecoderLayer"]

    def __init__(self, config: OPTConfig):
        super().__init__(config, OPTModel(config))
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)

    def blocks(self) -> list[str]:
        """Placement units in forward order: the decoder's modules (each decoder layer on its own), the head."""
        decoder, out = self.model.decoder, []
        for name, m in decoder.named_children():
            if m is decoder.layers:
                out += [f"{self.layers_prefix}.{i}" for i in range(len(m))]
            elif any(True for _ in m.parameters()):
                out.append(f"model.decoder.{name}")
        return [*out, "lm_head"]
