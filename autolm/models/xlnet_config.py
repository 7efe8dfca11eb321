"""transformers' XLNetConfig for models/xlnet.py, in its field names and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PretrainedConfig
from ..config_fields import config_json_names
from ..errors import ConfigError
from ..nn import ACTIVATIONS

_NOT_XLNET = ("num_key_value_heads", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling", "use_cache",
              "max_position_embeddings", "attention_dropout")  # fmt: skip


@dataclass(repr=False)
class XLNetConfig(PretrainedConfig):
    """transformers' XLNetConfig, in its names (d_model, n_layer, n_head, d_inner, d_head, ff_activation,
    layer_norm_eps; also attributes). XLNet has no length limit (transformers' max_position_embeddings is -1; not
    written). Dropouts, initializer_range and the summary_* / *_n_top fields change no inference: kept."""

    model_type: ClassVar[str] = "xlnet"
    attribute_map: ClassVar[dict[str, str]] = {"hidden_size": "d_model", "num_hidden_layers": "n_layer",
                                               "num_attention_heads": "n_head", "intermediate_size": "d_inner",
                                               "head_dim": "d_head", "hidden_act": "ff_activation",
                                               "rms_norm_eps": "layer_norm_eps"}  # fmt: skip
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (*PretrainedConfig.bool_fields, "use_mems_eval", "use_mems_train",
                                              "bi_data", "same_length")  # fmt: skip

    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    attn_type: str = "bi"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-12
    dropout: float = 0.1
    mem_len: int | None = 512
    reuse_len: int | None = None
    use_mems_eval: bool = True
    use_mems_train: bool = False
    bi_data: bool = False
    clamp_len: int = -1
    same_length: bool = False
    summary_type: str = "last"
    summary_use_proj: bool = True
    summary_activation: str = "tanh"
    summary_last_dropout: float = 0.1
    start_n_top: int = 5
    end_n_top: int = 5
    pad_token_id: int | None = 5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 1 << 28  # no limit (relative positions)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            names = "|".join(self.attribute_map)
            raise ConfigError(re.sub(rf"\b({names})\b", lambda m: self.attribute_map[m[1]], str(e))) from None

    def validate(self) -> None:
        super().validate()
        if self.attn_type not in ("bi", "uni"):
            raise ConfigError(f"{self.source}: attn_type must be 'bi' or 'uni', found {self.attn_type!r}")
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ConfigError(f"{self.source}: d_head ({self.head_dim}) must be d_model // n_head")
        for key in ("mem_len", "reuse_len"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ConfigError(
                    f"{self.source}: {key} must be a non-negative integer or null, found {value!r}"
                )

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_XLNET:
            out.pop(key, None)
        return out


config_json_names(XLNetConfig, {"n_token": "vocab_size"})  # n_token: transformers' old name
