"""MusicGen's configs: the decoders' (transformers' MusicgenDecoderConfig / MusicgenMelodyDecoderConfig, model types
"musicgen_decoder" / "musicgen_melody_decoder") and the composite models' (MusicgenConfig / MusicgenMelodyConfig,
"musicgen" / "musicgen_melody", what facebook/musicgen-* and musicgen-melody hold), read as their decoder's.

A composite config.json holds the T5 text encoder's settings (`text_encoder`), the EnCodec audio codec's
(`audio_encoder`) and the decoder's (`decoder`); Melody's adds the chroma features' sizes (num_chroma,
chroma_length). autolm runs the decoder alone: `MusicgenConfig` reads `decoder` by the decoder's config class (as
image_text.ImageTextConfig reads an image-text wrapper's text_config; dtype from the outer config where `decoder`
leaves it out) and drops the rest, so a loaded composite model is its decoder (config.model_type
"musicgen_decoder") and saving writes the decoder-only files transformers' MusicgenForCausalLM /
MusicgenMelodyForCausalLM load. Its checkpoint's names (`COMPOSITE_RULES`): decoder.model.decoder.* and
decoder.lm_heads.* read as the decoder's model.decoder.* / lm_heads.*; text_encoder.*, audio_encoder.*,
enc_to_dec_proj.* and Melody's audio_enc_to_dec_proj.* skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import Ignored, Rename
from ..nn.mlp import ACTIVATIONS
from .image_text import ImageTextConfig

# fields autolm's layers read that transformers' MusicgenDecoderConfig has not
_NOT_THEIRS = ("intermediate_size", "hidden_act", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "sliding_window", "rope_parameters", "rope_theta", "rope_scaling")  # fmt: skip


@dataclass(repr=False)
class MusicgenDecoderConfig(PretrainedConfig):
    """transformers' MusicgenDecoderConfig: its fields and defaults (musicgen-small's decoder sizes)."""

    model_type: ClassVar[str] = "musicgen_decoder"
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "scale_embedding",
        "is_decoder",
        "add_cross_attention",
    )
    # what OPT's layer reads: no biases in the attention and the MLP, pre-norm, affine LayerNorms
    enable_bias: ClassVar[bool] = False
    do_layer_norm_before: ClassVar[bool] = True
    layer_norm_elementwise_affine: ClassVar[bool] = True

    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    num_hidden_layers: int = 24
    ffn_dim: int = 4096
    num_attention_heads: int = 16
    layerdrop: float = 0.0
    activation_function: str = "gelu"
    hidden_size: int = 1024
    dropout: float = 0.1
    activation_dropout: float = 0.0
    initializer_factor: float = 0.02
    scale_embedding: bool = False
    num_codebooks: int = 4
    audio_channels: int = 1
    pad_token_id: int | None = 2048
    bos_token_id: int | None = 2048
    eos_token_id: int | list[int] | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None
    rms_norm_eps: float = 1e-5  # nn.LayerNorm's default

    def __post_init__(self) -> None:
        self.intermediate_size, self.hidden_act = self.ffn_dim, self.activation_function
        super().__post_init__()

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # sinusoidal positions, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_THEIRS:
            out.pop(key, None)
        return out

    def validate(self) -> None:
        super().validate()
        src = self.source
        if not _is_int(self.num_codebooks) or self.num_codebooks <= 0:
            raise ConfigError(
                f"{src}: num_codebooks must be a positive integer, found {self.num_codebooks!r}"
            )
        if self.audio_channels not in (1, 2) or isinstance(self.audio_channels, bool):
            raise ConfigError(
                f"{src}: audio_channels must be 1 (mono) or 2 (stereo), found {self.audio_channels!r}"
            )
        if self.audio_channels == 2 and self.num_codebooks % 2:
            raise ConfigError(
                f"{src}: num_codebooks ({self.num_codebooks}) must be even with audio_channels 2"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{src}: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads"
            )
        for name in ("dropout", "activation_dropout", "layerdrop"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 <= v <= 1:
                raise ConfigError(f"{src}: {name} must be a number in [0, 1], found {v!r}")


@dataclass(repr=False)
class MusicgenMelodyDecoderConfig(MusicgenDecoderConfig):
    """transformers' MusicgenMelodyDecoderConfig: MusicGen's, with no cross-attention."""

    model_type: ClassVar[str] = "musicgen_melody_decoder"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("cross_attention_hidden_size", None)  # not a field of transformers' melody decoder config
        return out


class MusicgenConfig(ImageTextConfig):
    """transformers' MusicgenConfig (the composite model's), read as its decoder's MusicgenDecoderConfig (see the
    module docstring); the text encoder's and audio codec's settings are dropped."""

    model_type: ClassVar[str] = "musicgen"
    text_class: ClassVar[type] = MusicgenDecoderConfig
    fixed: ClassVar[dict[str, Any]] = {"tie_word_embeddings": False}  # one head per codebook, never tied

    def __new__(cls, decoder: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return cls.from_dict({"decoder": decoder or {}, **kwargs})

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides: Any) -> Any:
        decoder = d.get("decoder") if isinstance(d, dict) else None
        if not isinstance(decoder, dict):
            raise ConfigError(f"{source}: model_type {cls.model_type!r} needs a decoder object (the audio-token "
                              f"decoder's settings), found {str(decoder)[:100]}")  # fmt: skip
        outer = {k: v for k, v in d.items() if k in ("dtype", "torch_dtype")}
        return super().from_dict({**outer, "text_config": decoder}, source, **overrides)


class MusicgenMelodyConfig(MusicgenConfig):
    """transformers' MusicgenMelodyConfig, read as its decoder's MusicgenMelodyDecoderConfig."""

    model_type: ClassVar[str] = "musicgen_melody"
    text_class: ClassVar[type] = MusicgenMelodyDecoderConfig


# the composite checkpoints' names (see the module docstring); a decoder's own files hold none of them
COMPOSITE_RULES = (
    Rename(r"^decoder\.", "", r"(?!)", ""),
    Ignored(r"(text_encoder|audio_encoder|enc_to_dec_proj|audio_enc_to_dec_proj)\..+"),
)
