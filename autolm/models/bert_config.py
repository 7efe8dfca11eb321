"""The configs of the BERT-style encoders run as decoders (models/bert.py): transformers' BertConfig and the RoBERTa
family's (RobertaConfig, XLMRobertaConfig, CamembertConfig, Data2VecTextConfig), ELECTRA's, ERNIE's, and the pre-LN
relatives' (RobertaPreLayerNormConfig, XLMRobertaXLConfig, MegatronBertConfig) and BertGenerationConfig, in
transformers' field names and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS

# config fields these configs do not have (derived, or no such feature)
_NOT_BERT = ("num_key_value_heads", "head_dim", "sliding_window", "rope_parameters", "rope_theta", "rope_scaling",
             "layer_types", "attention_dropout")  # fmt: skip


@dataclass(repr=False)
class BertConfig(PretrainedConfig):
    """transformers' BertConfig: LayerNorm's epsilon is `layer_norm_eps` (also an attribute). Dropouts,
    initializer_range and classifier_dropout change no inference and are kept as given."""

    model_type: ClassVar[str] = "bert"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "layer_norm_eps"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    bool_fields: ClassVar[tuple[str, ...]] = (
        *PretrainedConfig.bool_fields,
        "is_decoder",
        "add_cross_attention",
    )
    fairseq_positions: ClassVar[bool] = False  # RoBERTa's: positions counted over the non-pad ids
    token_types: ClassVar[bool] = True  # token type embeddings (BertGeneration has none)
    embeddings_norm: ClassVar[bool] = True  # a LayerNorm over the embeddings (XLM-R-XL, Megatron: none)

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    rms_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    is_decoder: bool = False
    add_cross_attention: bool = False

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(re.sub(r"\brms_norm_eps\b", "layer_norm_eps", str(e))) from None

    def validate(self) -> None:
        super().validate()
        if self.token_types and not (_is_int(self.type_vocab_size) and self.type_vocab_size > 0):
            raise ConfigError(f"{self.source}: type_vocab_size must be a positive integer, "
                              f"found {self.type_vocab_size!r}")  # fmt: skip
        pad = self.pad_token_id
        if self.fairseq_positions and not (_is_int(pad) and 0 <= pad < self.max_position_embeddings - 1):
            raise ConfigError(f"{self.source}: pad_token_id must be an integer below max_position_embeddings - 1 "
                              f"(positions count from it), found {pad!r}")  # fmt: skip

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_BERT:
            out.pop(key, None)
        return out


BertConfig.layer_norm_eps = property(lambda self: self.rms_norm_eps,
                                     lambda self, v: setattr(self, "rms_norm_eps", v))  # fmt: skip


def _named_init(cls: type) -> None:
    """cls(layer_norm_eps=...) as in transformers: config.json's name as an argument too."""
    dataclass_init = cls.__init__

    def __init__(self, layer_norm_eps=None, **kwargs: Any) -> None:
        dataclass_init(self, **kwargs, **({} if layer_norm_eps is None else {"rms_norm_eps": layer_norm_eps}))

    cls.__init__ = __init__


_named_init(BertConfig)


def _roberta_config(name: str, model_type: str) -> type:
    """A RoBERTa-family config: BertConfig's fields with RoBERTa's vocabulary and special ids, positions counted
    over the non-pad ids."""
    vocab = 50265 if model_type in ("roberta", "roberta-prelayernorm") else 30522
    cls = dataclass(repr=False)(type(name, (BertConfig,), {
        "__annotations__": {"vocab_size": int, "pad_token_id": "int | None", "bos_token_id": "int | None",
                            "eos_token_id": "int | list[int] | None"},
        "vocab_size": vocab, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "model_type": model_type, "fairseq_positions": True, "__doc__": f"transformers' {name}.",
    }))  # fmt: skip
    _named_init(cls)
    return cls


RobertaConfig = _roberta_config("RobertaConfig", "roberta")
XLMRobertaConfig = _roberta_config("XLMRobertaConfig", "xlm-roberta")
CamembertConfig = _roberta_config("CamembertConfig", "camembert")
Data2VecTextConfig = _roberta_config("Data2VecTextConfig", "data2vec-text")
RobertaPreLayerNormConfig = _roberta_config("RobertaPreLayerNormConfig", "roberta-prelayernorm")


@dataclass(repr=False)
class XLMRobertaXLConfig(XLMRobertaConfig):
    """transformers' XLMRobertaXLConfig: RoBERTa's positions and special ids, pre-LN layers, no LayerNorm over the
    embeddings."""

    model_type: ClassVar[str] = "xlm-roberta-xl"
    embeddings_norm: ClassVar[bool] = False

    vocab_size: int = 250880
    hidden_size: int = 2560
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    intermediate_size: int = 10240
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    rms_norm_eps: float = 1e-5


_named_init(XLMRobertaXLConfig)


@dataclass(repr=False)
class MegatronBertConfig(BertConfig):
    """transformers' MegatronBertConfig: BERT's fields and positions, pre-LN layers, no LayerNorm over the
    embeddings."""

    model_type: ClassVar[str] = "megatron-bert"
    embeddings_norm: ClassVar[bool] = False

    vocab_size: int = 29056
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096


_named_init(MegatronBertConfig)


@dataclass(repr=False)
class BertGenerationConfig(BertConfig):
    """transformers' BertGenerationConfig: BERT's without token types (type_vocab_size, not a field of
    transformers' config, is written only where config.json gives it)."""

    model_type: ClassVar[str] = "bert-generation"
    token_types: ClassVar[bool] = False

    vocab_size: int = 50358
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    type_vocab_size: int | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("type_vocab_size") is None:
            out.pop("type_vocab_size", None)
        return out


_named_init(BertGenerationConfig)


@dataclass(repr=False)
class ElectraConfig(BertConfig):
    """transformers' ElectraConfig (the generator run as a decoder): embeddings `embedding_size` wide, projected
    to hidden_size where they differ; the summary_* fields (its discriminator's heads) are kept as given."""

    model_type: ClassVar[str] = "electra"

    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    @property
    def embedding_width(self) -> int:
        return self.embedding_size

    def validate(self) -> None:
        super().validate()
        if not (_is_int(self.embedding_size) and 0 < self.embedding_size <= 1 << 17):
            raise ConfigError(
                f"{self.source}: embedding_size must be a positive integer, found {self.embedding_size!r}"
            )


_named_init(ElectraConfig)


@dataclass(repr=False)
class ErnieConfig(BertConfig):
    """transformers' ErnieConfig (ERNIE 1.0 / 2.0 / 3.0 base models): BERT's, plus task type embeddings added to
    the inputs where use_task_id (task 0 unless task_type_ids are given)."""

    model_type: ClassVar[str] = "ernie"
    bool_fields: ClassVar[tuple[str, ...]] = (*BertConfig.bool_fields, "use_task_id")

    task_type_vocab_size: int = 3
    use_task_id: bool = False

    def validate(self) -> None:
        super().validate()
        if self.use_task_id and not (_is_int(self.task_type_vocab_size) and self.task_type_vocab_size > 0):
            raise ConfigError(f"{self.source}: task_type_vocab_size must be a positive integer, "
                              f"found {self.task_type_vocab_size!r}")  # fmt: skip


_named_init(ErnieConfig)
