"""ProphetNet's decoder config (transformers' ProphetNetConfig): see models/prophetnet.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int, _is_number
from ..errors import ConfigError
from ..nn import ACTIVATIONS
from .xglm import NOT_WRITTEN, accept_json_names, check_fractions

_NAMES = {"intermediate_size": "decoder_ffn_dim", "num_hidden_layers": "num_decoder_layers",
          "num_attention_heads": "num_decoder_attention_heads", "hidden_act": "activation_function"}  # fmt: skip


@dataclass(repr=False)
class ProphetNetConfig(PretrainedConfig):
    """transformers' ProphetNetConfig: the decoder's sizes under config.json's names num_decoder_layers,
    num_decoder_attention_heads, decoder_ffn_dim and activation_function (the encoder's kept as given)."""

    model_type: ClassVar[str] = "prophetnet"
    attribute_map: ClassVar[dict[str, str]] = _NAMES
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "add_cross_attention",
                                              "disable_ngram_loss")  # fmt: skip

    vocab_size: int = 30522
    hidden_size: int = 1024
    encoder_ffn_dim: int = 4096
    num_encoder_layers: int = 12
    num_encoder_attention_heads: int = 16
    intermediate_size: int = 4096
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    hidden_act: str = "gelu"
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    dropout: float = 0.1
    max_position_embeddings: int = 512
    init_std: float = 0.02
    add_cross_attention: bool = True
    decoder_start_token_id: int | None = 0
    ngram: int = 2
    num_buckets: int = 32
    relative_max_distance: int = 128
    disable_ngram_loss: bool = False
    eps: float = 0.0
    rms_norm_eps: float = 1e-5  # nn.LayerNorm's default (not written)
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(re.sub(rf"\b({'|'.join(_NAMES)})\b", lambda m: _NAMES[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        check_fractions(self, ("dropout", "attention_dropout", "activation_dropout", "eps"))
        for name in ("ngram", "num_buckets"):
            v = getattr(self, name)
            if not (_is_int(v) and 0 < v <= 4096):
                raise ConfigError(f"{self.source}: {name} must be a positive integer, found {v!r}")
        d = self.relative_max_distance
        if not (_is_number(d) and d > self.num_buckets // 2):
            raise ConfigError(f"{self.source}: relative_max_distance must be a number above num_buckets // 2 "
                              f"({self.num_buckets // 2}), found {d!r}")  # fmt: skip
        if not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.max_position_embeddings - 2:
            raise ConfigError(f"{self.source}: pad_token_id must be an integer below max_position_embeddings - 2 "
                              f"(positions start after it), found {self.pad_token_id!r}")  # fmt: skip

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned positions and relative buckets, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            out.pop(key, None)
        return out


accept_json_names(ProphetNetConfig)
