"""RemBERT run as a decoder (transformers' RemBertForCausalLM with `is_decoder=True`): BERT's post-LN layers
(models/bert.py) with decoupled input and output embeddings.

- embeddings: word + learned position + token type (type 0 unless token_type_ids are given) under a LayerNorm,
  all `input_embedding_size` wide, then `encoder.embedding_hidden_mapping_in` to hidden_size (always there);
  positions where none are given are the cache's slots, given ones read as rows (BERT's);
- the head: cls.predictions.dense (hidden_size -> `output_embedding_size`) -> hidden_act -> LayerNorm -> decoder
  (to the vocabulary, with its bias). Never tied to the input embeddings, whatever tie_word_embeddings says
  (transformers' RemBertForCausalLM ties nothing): the config runs untied (config.tie_word_embeddings is False once
  loaded) and writes config.json's value back as it was given.

`is_decoder=False` runs bidirectionally without a cache and refuses generate, as BERT's; cross-attention weights
load and never run (encoder_hidden_states refused). llama.cpp has no RemBERT: no GGUF.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import _is_int
from ..errors import ConfigError
from ..nn import ACTIVATIONS, CheckpointRules, Ignored, Linear, Rename, transformers_state_dict
from .base import CausalLM
from .bert import BertLMHeadModel, BertModel, _rules
from .bert_config import BertConfig, _named_init

logger = logging.getLogger("autolm")


@dataclass(repr=False)
class RemBertConfig(BertConfig):
    """transformers' RemBertConfig: BERT's fields with input_embedding_size and output_embedding_size."""

    model_type: ClassVar[str] = "rembert"

    vocab_size: int = 250300
    hidden_size: int = 1152
    num_hidden_layers: int = 32
    num_attention_heads: int = 18
    input_embedding_size: int = 256
    output_embedding_size: int = 1664
    intermediate_size: int = 4608
    bos_token_id: int | None = 312
    eos_token_id: int | list[int] | None = 313
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        # transformers' RemBertForCausalLM ties nothing whatever this says: run untied, write it back as given
        self._tie_declared = self.tie_word_embeddings
        self.tie_word_embeddings = False
        super().__post_init__()

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["tie_word_embeddings"] = self.__dict__.get("_tie_declared", False)
        return out

    @property
    def embedding_size(self) -> int:
        """The embeddings' width as models/bert.py's body reads it."""
        return self.input_embedding_size

    @property
    def embedding_width(self) -> int:
        return self.input_embedding_size

    def validate(self) -> None:
        super().validate()
        for key in ("input_embedding_size", "output_embedding_size"):
            value = getattr(self, key)
            if not (_is_int(value) and 0 < value <= 1 << 17):
                raise ConfigError(f"{self.source}: {key} must be a positive integer, found {value!r}")


_named_init(RemBertConfig)


class RemBertModel(BertModel):
    """BERT's body with the embeddings' projection always there (transformers' embedding_hidden_mapping_in)."""

    def __init__(self, config: RemBertConfig):
        super().__init__(config)
        self.embeddings_project = Linear(config.input_embedding_size, config.hidden_size, bias=True)


class RemBertPredictionHead(nn.Module):
    """cls.predictions' dense (to output_embedding_size), activation and LayerNorm (the decoder is lm_head)."""

    def __init__(self, config: RemBertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.output_embedding_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.output_embedding_size, eps=config.rms_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


_REMBERT_RULES = CheckpointRules([
    *_rules("rembert", "cls.predictions").rules[:3],
    Rename(r"^rembert\.encoder\.embedding_hidden_mapping_in\.", "model.embeddings_project.",
           r"^model\.embeddings_project\.", "rembert.encoder.embedding_hidden_mapping_in."),
    Rename(r"^cls\.predictions\.decoder\.", "lm_head.", r"^lm_head\.", "cls.predictions.decoder."),
    Rename(r"^cls\.predictions\.(?=(dense|LayerNorm)\.)", "head.", r"^head\.", "cls.predictions."),
    Ignored(r"rembert\.embeddings\.(position_ids|token_type_ids)"),  # old files' buffers
    Ignored(r"rembert\.pooler\..*"),  # an encoder file's pooler, which the CausalLM has not
])  # fmt: skip


class RemBertForCausalLM(BertLMHeadModel):
    """transformers' RemBertForCausalLM."""

    config_class = RemBertConfig
    hf_prefix: ClassVar[str] = "rembert"
    checkpoint_rules = _REMBERT_RULES
    _no_split_modules: ClassVar[list[str]] = ["RemBertLayer"]

    def __init__(self, config: RemBertConfig):
        CausalLM.__init__(self, config, RemBertModel(config))
        self.head = RemBertPredictionHead(config)
        self.lm_head = Linear(config.output_embedding_size, config.vocab_size, bias=True)
        if not config.is_decoder:  # transformers' warning; the forward runs bidirectionally, with no cache
            logger.warning(
                "If you want to use `%s` as a standalone, add `is_decoder=True.`", type(self).__name__
            )
            self.one_token_step = False
        transformers_state_dict(self)  # state_dict() in transformers' names

    def tie_weights(self) -> None:
        """Nothing tied (transformers' RemBertForCausalLM ties no weights)."""
