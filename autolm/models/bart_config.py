"""The BART-style decoders' config classes (transformers' names and defaults per model_type): see models/bart.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS
from .xglm import NOT_WRITTEN, accept_json_names, check_fractions

_NAMES = {"hidden_size": "d_model", "intermediate_size": "decoder_ffn_dim", "num_hidden_layers": "decoder_layers",
          "num_attention_heads": "decoder_attention_heads", "hidden_act": "activation_function"}  # fmt: skip
_DROPOUTS = ("dropout", "attention_dropout", "activation_dropout", "decoder_layerdrop")


@dataclass(repr=False)
class BartConfig(PretrainedConfig):
    """transformers' BartConfig (the decoder's sizes under config.json's names d_model, decoder_layers,
    decoder_attention_heads, decoder_ffn_dim, activation_function; the encoder's kept as given). The class
    switches say which variant of the decoder a type is (see the module docstring)."""

    model_type: ClassVar[str] = "bart"
    attribute_map: ClassVar[dict[str, str]] = _NAMES
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "scale_embedding")
    do_layer_norm_before: ClassVar[bool] = False  # pre-norm layers and a final layer_norm
    enable_bias: ClassVar[bool] = True
    layer_norm_elementwise_affine: ClassVar[bool] = True
    position_kind: ClassVar[str] = "learned"  # "learned", "table" (fixed sinusoids in the weights), "fairseq"
    position_offset: ClassVar[int] = 2
    embedding_norm: ClassVar[str | None] = "after"  # layernorm_embedding after the positions, "before", None
    # where scale_embedding's sqrt(d_model) applies: "ids" (the embedded ids), "inputs" (inputs_embeds given too:
    # Marian, Pegasus) or "none" (transformers 5's Blenderbot-Small decoder does not read it)
    embed_scaling: ClassVar[str] = "ids"
    key_bias: ClassVar[bool] = True  # the attentions' k_proj biased (Whisper's is not)
    attention_bias: ClassVar[bool] = True  # the attentions' projections biased (BigBird-Pegasus: use_bias)
    final_norm_name: ClassVar[str] = "layer_norm"  # the pre-norm types' final norm (BigBird-Pegasus' differs)

    vocab_size: int = 50265
    max_position_embeddings: int = 1024
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    num_hidden_layers: int = 12
    intermediate_size: int = 4096
    num_attention_heads: int = 16
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    hidden_act: str = "gelu"
    hidden_size: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    classifier_dropout: float | None = 0.0
    scale_embedding: bool = False
    rms_norm_eps: float = 1e-5  # nn.LayerNorm's default: these configs have no epsilon (not written)
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2
    forced_eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from the heads and d_model
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = self.attribute_map
            raise ConfigError(re.sub(rf"\b({'|'.join(names)})\b", lambda m: names[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        check_fractions(self, _DROPOUTS)
        p = self.pad_token_id
        if p is not None and not _is_int(p):
            raise ConfigError(f"{self.source}: pad_token_id must be an integer or null, found {p!r}")

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            out.pop(key, None)
        return out


_NO_CLASSIFIER = ("classifier_dropout",)


@dataclass(repr=False)
class MBartConfig(BartConfig):
    """transformers' MBartConfig: pre-norm layers, a final layer_norm."""

    model_type: ClassVar[str] = "mbart"
    do_layer_norm_before: ClassVar[bool] = True
    decoder_start_token_id: int | None = None


@dataclass(repr=False)
class PLBartConfig(BartConfig):
    """transformers' PLBartConfig: BART's decoder, embeddings scaled by default."""

    model_type: ClassVar[str] = "plbart"
    absent_keys: ClassVar[tuple[str, ...]] = ("decoder_start_token_id",)
    vocab_size: int = 50005
    encoder_layers: int = 6
    encoder_ffn_dim: int = 3072
    encoder_attention_heads: int = 12
    num_hidden_layers: int = 6
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    hidden_size: int = 768
    attention_dropout: float = 0.1
    scale_embedding: bool = True
    decoder_start_token_id: int | None = None


@dataclass(repr=False)
class MvpConfig(BartConfig):
    """transformers' MvpConfig: BART's decoder (MvpForCausalLM builds it without prompts, whatever use_prompt
    says; the prompt fields are kept as given)."""

    model_type: ClassVar[str] = "mvp"
    absent_keys: ClassVar[tuple[str, ...]] = ("forced_eos_token_id",)
    bool_fields: ClassVar[tuple[str, ...]] = (*BartConfig.bool_fields, "use_prompt")
    vocab_size: int = 50267
    forced_eos_token_id: int | list[int] | None = None
    use_prompt: bool = False
    prompt_length: int = 100
    prompt_mid_dim: int = 800


@dataclass(repr=False)
class MarianConfig(BartConfig):
    """transformers' MarianConfig: fixed sinusoidal positions, no layernorm_embedding, post-norm layers.
    decoder_vocab_size (null: vocab_size) must equal vocab_size: MarianForCausalLM's head reads vocab_size."""

    model_type: ClassVar[str] = "marian"
    absent_keys: ClassVar[tuple[str, ...]] = _NO_CLASSIFIER
    embed_scaling: ClassVar[str] = "inputs"
    position_kind: ClassVar[str] = "table"
    position_offset: ClassVar[int] = 0
    embedding_norm: ClassVar[str | None] = None
    vocab_size: int = 58101
    decoder_vocab_size: int | None = None
    classifier_dropout: float | None = None
    pad_token_id: int | None = 58100
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 0
    decoder_start_token_id: int | None = 58100
    forced_eos_token_id: int | list[int] | None = 0
    share_encoder_decoder_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.decoder_vocab_size is None:
            self.decoder_vocab_size = self.vocab_size
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.decoder_vocab_size != self.vocab_size:
            raise ConfigError(f"{self.source}: decoder_vocab_size ({self.decoder_vocab_size!r}) differs from "
                              f"vocab_size ({self.vocab_size!r}): MarianForCausalLM needs them equal")  # fmt: skip


@dataclass(repr=False)
class PegasusConfig(BartConfig):
    """transformers' PegasusConfig: fixed sinusoidal positions, no layernorm_embedding, pre-norm layers, a final
    layer_norm."""

    model_type: ClassVar[str] = "pegasus"
    absent_keys: ClassVar[tuple[str, ...]] = (*_NO_CLASSIFIER, "bos_token_id")
    do_layer_norm_before: ClassVar[bool] = True
    embed_scaling: ClassVar[str] = "inputs"
    position_kind: ClassVar[str] = "table"
    position_offset: ClassVar[int] = 0
    embedding_norm: ClassVar[str | None] = None
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int | None = 0
    forced_eos_token_id: int | list[int] | None = 1


@dataclass(repr=False)
class BlenderbotSmallConfig(BartConfig):
    """transformers' BlenderbotSmallConfig: learned positions without offset, layernorm_embedding on the token
    embeddings before the positions are added, post-norm layers."""

    model_type: ClassVar[str] = "blenderbot-small"
    absent_keys: ClassVar[tuple[str, ...]] = _NO_CLASSIFIER
    embed_scaling: ClassVar[str] = "none"  # its decoder leaves scale_embedding unread (transformers 5)
    position_offset: ClassVar[int] = 0
    embedding_norm: ClassVar[str | None] = "before"
    max_position_embeddings: int = 512
    encoder_layers: int = 8
    encoder_ffn_dim: int = 2048
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    hidden_size: int = 512
    classifier_dropout: float | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    decoder_start_token_id: int | None = 1


@dataclass(repr=False)
class BlenderbotConfig(BlenderbotSmallConfig):
    """transformers' BlenderbotConfig: learned positions without offset, no layernorm_embedding, pre-norm layers
    and a final layer_norm."""

    model_type: ClassVar[str] = "blenderbot"
    do_layer_norm_before: ClassVar[bool] = True
    embed_scaling: ClassVar[str] = "ids"
    embedding_norm: ClassVar[str | None] = None
    vocab_size: int = 8008
    max_position_embeddings: int = 128
    encoder_layers: int = 2
    encoder_ffn_dim: int = 10240
    encoder_attention_heads: int = 32
    num_hidden_layers: int = 24
    intermediate_size: int = 10240
    num_attention_heads: int = 32
    hidden_size: int = 2560
    encoder_no_repeat_ngram_size: int = 3


@dataclass(repr=False)
class TrOCRConfig(BartConfig):
    """transformers' TrOCRConfig (no encoder fields): learned positions (offset 2) or, with
    use_learned_position_embeddings false, fairseq's sinusoids over the non-pad ids; layernorm_embedding where
    set; the cross-attention's keys and values read cross_attention_hidden_size features (null: d_model)."""

    model_type: ClassVar[str] = "trocr"
    absent_keys: ClassVar[tuple[str, ...]] = (*_NO_CLASSIFIER, "forced_eos_token_id", "encoder_layers",
                                              "encoder_ffn_dim", "encoder_attention_heads", "encoder_layerdrop")  # fmt: skip
    bool_fields: ClassVar[tuple[str, ...]] = (*BartConfig.bool_fields, "use_learned_position_embeddings",
                                              "layernorm_embedding")  # fmt: skip
    max_position_embeddings: int = 512
    classifier_dropout: float | None = None
    forced_eos_token_id: int | list[int] | None = None
    cross_attention_hidden_size: int | None = None
    use_learned_position_embeddings: bool = True
    layernorm_embedding: bool = True

    @property
    def position_kind(self) -> str:
        return "learned" if self.use_learned_position_embeddings else "fairseq"

    @property
    def embedding_norm(self) -> str | None:
        return "after" if self.layernorm_embedding else None

    def validate(self) -> None:
        super().validate()
        c = self.cross_attention_hidden_size
        if c is not None and not (_is_int(c) and 0 < c <= 1 << 17):
            raise ConfigError(f"{self.source}: cross_attention_hidden_size must be a positive integer or null, "
                              f"found {c!r}")  # fmt: skip
        if self.position_kind == "fairseq" and (not _is_int(self.pad_token_id) or self.hidden_size < 4):
            raise ConfigError(f"{self.source}: use_learned_position_embeddings false (sinusoids) needs an integer "
                              "pad_token_id and d_model of at least 4")  # fmt: skip


@dataclass(repr=False)
class WhisperConfig(BartConfig):
    """transformers' WhisperConfig, its decoder's fields (the encoder's and the audio's kept as given): pre-norm
    layers and a final layer_norm, learned positions without offset (max_target_positions of them), no
    layernorm_embedding, k_proj without bias; the decoder leaves scale_embedding unread. num_hidden_layers and
    num_attention_heads are the decoder's here (transformers' attributes of those names read the encoder's)."""

    model_type: ClassVar[str] = "whisper"
    attribute_map: ClassVar[dict[str, str]] = {**_NAMES, "max_position_embeddings": "max_target_positions"}
    absent_keys: ClassVar[tuple[str, ...]] = (*_NO_CLASSIFIER, "forced_eos_token_id")
    do_layer_norm_before: ClassVar[bool] = True
    embed_scaling: ClassVar[str] = "none"
    position_offset: ClassVar[int] = 0
    embedding_norm: ClassVar[str | None] = None
    key_bias: ClassVar[bool] = False
    vocab_size: int = 51865
    max_position_embeddings: int = 448
    encoder_layers: int = 4
    encoder_ffn_dim: int = 1536
    encoder_attention_heads: int = 6
    num_hidden_layers: int = 4
    intermediate_size: int = 1536
    num_attention_heads: int = 6
    hidden_size: int = 384
    dropout: float = 0.0
    classifier_dropout: float | None = None
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    decoder_start_token_id: int | None = 50257
    forced_eos_token_id: int | list[int] | None = None
    max_source_positions: int = 1500


@dataclass(repr=False)
class BigBirdPegasusConfig(BartConfig):
    """transformers' BigBirdPegasusConfig, its decoder's fields (the encoder's block-sparse attention settings,
    attention_type, block_size, num_random_blocks, kept as given: the decoder's attention is full): pre-norm layers
    whose final norm is named `layernorm_embedding` (no norm on the embeddings), learned positions without offset,
    the attentions' projections biased by use_bias (fc1/fc2 always). transformers' BigBirdPegasusForCausalLM ties
    no weights whatever tie_word_embeddings says: the attribute reads False, config.json keeps the value given.
    num_hidden_layers and num_attention_heads are the decoder's here (transformers' read the encoder's)."""

    model_type: ClassVar[str] = "bigbird_pegasus"
    absent_keys: ClassVar[tuple[str, ...]] = ("forced_eos_token_id",)
    bool_fields: ClassVar[tuple[str, ...]] = (*BartConfig.bool_fields, "use_bias")
    do_layer_norm_before: ClassVar[bool] = True
    final_norm_name: ClassVar[str] = "layernorm_embedding"
    position_offset: ClassVar[int] = 0
    embedding_norm: ClassVar[str | None] = None
    vocab_size: int = 96103
    max_position_embeddings: int = 4096
    encoder_layers: int = 16
    num_hidden_layers: int = 16
    hidden_act: str = "gelu_new"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    forced_eos_token_id: int | list[int] | None = None
    scale_embedding: bool = True
    attention_type: str = "block_sparse"
    block_size: int = 64
    num_random_blocks: int = 3
    use_bias: bool = False

    def __post_init__(self) -> None:
        self.declared_tie, self.tie_word_embeddings = self.tie_word_embeddings, False
        super().__post_init__()

    @property
    def attention_bias(self) -> bool:
        return self.use_bias

    def validate(self) -> None:
        super().validate()
        if self.attention_type not in ("original_full", "block_sparse"):
            raise ConfigError(f"{self.source}: attention_type must be 'original_full' or 'block_sparse', found "
                              f"{self.attention_type!r}")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tie_word_embeddings": getattr(self, "declared_tie", False)}


CONFIGS = (BartConfig, MBartConfig, PLBartConfig, MvpConfig, MarianConfig, PegasusConfig, BlenderbotSmallConfig,
           BlenderbotConfig, TrOCRConfig, WhisperConfig, BigBirdPegasusConfig)  # fmt: skip
for _cls in CONFIGS:
    accept_json_names(_cls)
