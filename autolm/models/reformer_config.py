"""Reformer's config (transformers' ReformerConfig): see models/reformer.py."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS
from .xglm import NOT_WRITTEN, accept_json_names, check_fractions

_NAMES = {"intermediate_size": "feed_forward_size", "head_dim": "attention_head_size",
          "rms_norm_eps": "layer_norm_eps"}  # fmt: skip
_DROPOUTS = ("hidden_dropout_prob", "local_attention_probs_dropout_prob", "lsh_attention_probs_dropout_prob")


@dataclass(repr=False)
class ReformerConfig(PretrainedConfig):
    """transformers' ReformerConfig: config.json's feed_forward_size, attention_head_size and layer_norm_eps are
    intermediate_size, head_dim and rms_norm_eps (attributes under both names); num_hidden_layers is
    len(attn_layers), as transformers sets it."""

    model_type: ClassVar[str] = "reformer"
    attribute_map: ClassVar[dict[str, str]] = _NAMES
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "axial_pos_embds", "is_decoder")
    absent_keys: ClassVar[tuple[str, ...]] = ("attention_dropout",)  # ReformerConfig has per-kind dropouts

    head_dim: int | None = 64
    attn_layers: list[str] = field(default_factory=lambda: ["local", "lsh", "local", "lsh", "local", "lsh"])
    axial_norm_std: float = 1.0
    axial_pos_embds: bool = True
    axial_pos_shape: list[int] = field(default_factory=lambda: [64, 64])
    axial_pos_embds_dim: list[int] = field(default_factory=lambda: [64, 192])
    chunk_size_lm_head: int = 0
    eos_token_id: int | list[int] | None = 2
    intermediate_size: int = 512
    hash_seed: int | None = None
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.05
    hidden_size: int = 256
    initializer_range: float = 0.02
    is_decoder: bool = False
    rms_norm_eps: float = 1e-12
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    local_attention_probs_dropout_prob: float = 0.05
    local_attn_chunk_length: int = 64
    lsh_attn_chunk_length: int = 64
    lsh_attention_probs_dropout_prob: float = 0.0
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    max_position_embeddings: int = 4096
    num_attention_heads: int = 12
    num_buckets: int | list[int] | None = None
    num_hashes: int = 1
    vocab_size: int = 320
    tie_word_embeddings: bool = False
    classifier_dropout: float | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        if isinstance(self.attn_layers, (list, tuple)):
            self.attn_layers = list(self.attn_layers)
            self.num_hidden_layers = len(self.attn_layers)
        for name in ("axial_pos_shape", "axial_pos_embds_dim"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(re.sub(rf"\b({'|'.join(_NAMES)})\b", lambda m: _NAMES[m[1]], str(e))) from None

    def validate(self) -> None:
        if not (isinstance(self.attn_layers, list) and self.attn_layers
                and set(self.attn_layers) <= {"local", "lsh"}):  # fmt: skip
            raise ConfigError(f"{self.source}: attn_layers must be a non-empty list of 'local' and 'lsh', found "
                              f"{self.attn_layers!r}")  # fmt: skip
        super().validate()
        check_fractions(self, _DROPOUTS)
        for name in ("local_attn_chunk_length", "lsh_attn_chunk_length"):
            v = getattr(self, name)
            if not (_is_int(v) and v > 0):
                raise ConfigError(f"{self.source}: {name} must be a positive integer, found {v!r}")
        for name in ("local_num_chunks_before", "local_num_chunks_after", "lsh_num_chunks_before",
                     "lsh_num_chunks_after"):  # fmt: skip
            v = getattr(self, name)
            if not (_is_int(v) and v >= 0):
                raise ConfigError(f"{self.source}: {name} must be a non-negative integer, found {v!r}")
        if self.axial_pos_embds:
            shape, dims = self.axial_pos_shape, self.axial_pos_embds_dim
            if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
                raise ConfigError(
                    f"{self.source}: axial_pos_shape must be two positive integers, found {shape!r}"
                )
            if not (isinstance(dims, list) and len(dims) == 2 and all(_is_int(d) and d > 0 for d in dims)
                    and sum(dims) == self.hidden_size):  # fmt: skip
                raise ConfigError(f"{self.source}: axial_pos_embds_dim must be two positive integers summing to "
                                  f"hidden_size ({self.hidden_size}), found {dims!r}")  # fmt: skip

    @property
    def positions(self) -> int:
        """How many positions the embeddings hold (the axial grid's cells, else max_position_embeddings)."""
        return math.prod(self.axial_pos_shape) if self.axial_pos_embds else self.max_position_embeddings

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned (axial) positions, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in NOT_WRITTEN:
            out.pop(key, None)
        return out


accept_json_names(ReformerConfig)
