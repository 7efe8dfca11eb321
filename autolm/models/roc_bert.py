"""RoCBert run as a decoder (transformers' RoCBertForCausalLM with `is_decoder=True`): BERT's post-LN layers, head
cls.predictions and positions (models/bert.py), body `roc_bert`, with the pronunciation and shape embeddings.

- `concat_input` (the default): the word vector concatenated with the shape embedding (where enable_shape) and
  the pronunciation embedding (where enable_pronunciation), mapped back to hidden_size by `map_inputs_layer`, then
  token type + position under the LayerNorm. Ids not given are 0 at every token (their tables' row 0), exactly as
  transformers fills them, for input_ids and inputs_embeds alike;
- otherwise: BERT's LayerNorm(word + token type + position), then averaged with the shape and pronunciation
  embeddings of the ids given (enabled ones only; none given: as it is);
- forward takes `input_shape_ids` / `input_pronunciation_ids` (B, T). generate() takes none (refused by name:
  transformers' generate gives every new token the prompt's last ids, which autolm does not copy); its tokens get
  row 0, as transformers' forward without them.

`is_decoder=False` runs bidirectionally without a cache and refuses generate, as BERT's; cross-attention weights
load and never run (encoder_hidden_states refused). llama.cpp has no RoCBert: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import _is_int
from ..errors import ConfigError, GenerationError
from ..nn import Linear, embedding
from .bert import BertLMHeadModel, BertModel, _rules
from .bert_config import BertConfig, _named_init


@dataclass(repr=False)
class RoCBertConfig(BertConfig):
    """transformers' RoCBertConfig: BERT's fields with the pronunciation and shape embeddings'."""

    model_type: ClassVar[str] = "roc_bert"
    bool_fields: ClassVar[tuple[str, ...]] = (*BertConfig.bool_fields, "enable_pronunciation", "enable_shape",
                                              "concat_input")  # fmt: skip
    absent_keys: ClassVar[tuple[str, ...]] = ("bos_token_id", "eos_token_id")  # transformers' has none

    enable_pronunciation: bool = True
    enable_shape: bool = True
    pronunciation_embed_dim: int = 768
    pronunciation_vocab_size: int = 910
    shape_embed_dim: int = 512
    shape_vocab_size: int = 24858
    concat_input: bool = True

    def validate(self) -> None:
        super().validate()
        for key in (
            "pronunciation_embed_dim",
            "pronunciation_vocab_size",
            "shape_embed_dim",
            "shape_vocab_size",
        ):
            if not (_is_int(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(
                    f"{self.source}: {key} must be a positive integer, found {getattr(self, key)!r}"
                )
        if (
            not self.concat_input
            and self.pronunciation_embed_dim != self.hidden_size
            and self.enable_pronunciation
        ):
            raise ConfigError(f"{self.source}: pronunciation_embed_dim must equal hidden_size without concat_input "
                              f"(the embeddings are averaged), found {self.pronunciation_embed_dim}")  # fmt: skip
        if not self.concat_input and self.shape_embed_dim != self.hidden_size and self.enable_shape:
            raise ConfigError(f"{self.source}: shape_embed_dim must equal hidden_size without concat_input "
                              f"(the embeddings are averaged), found {self.shape_embed_dim}")  # fmt: skip


_named_init(RoCBertConfig)

_IDS = ("input_shape_ids", "input_pronunciation_ids")


class RoCBertModel(BertModel):
    """BERT's body with the shape and pronunciation tables (embeddings.shape_embed / pronunciation_embed) and,
    where concat_input, embeddings.map_inputs_layer. `_extra`: one forward's (token types, shape ids,
    pronunciation ids), each None where not given."""

    def __init__(self, config: RoCBertConfig):
        super().__init__(config)
        emb, h = self.embeddings, config.hidden_size
        emb.pronunciation_embed = embedding(config.pronunciation_vocab_size, config.pronunciation_embed_dim)
        emb.shape_embed = embedding(config.shape_vocab_size, config.shape_embed_dim)
        self.tables = [
            (name, getattr(config, f"enable_{name}"))
            for name in ("shape", "pronunciation")  # transformers' order of concatenation
        ]
        if config.concat_input:
            width = h + sum(getattr(config, f"{n}_embed_dim") for n, on in self.tables if on)
            emb.map_inputs_layer = Linear(width, h, bias=True)
        self.concat = config.concat_input
        self._extra = (None, None, None)

    def _table(self, name: str) -> torch.nn.Embedding:
        return getattr(self.embeddings, "shape_embed" if name == "shape" else "pronunciation_embed")

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """transformers' RoCBertEmbeddings over the word vectors x (see the module's doc)."""
        types, *ids = self._extra
        emb = self.embeddings
        if self.concat:
            parts = [x]
            for (name, on), given in zip(self.tables, ids):
                if on:
                    table = self._table(name)
                    parts.append(
                        table(given) if given is not None else table.weight[0].expand(*x.shape[:2], -1)
                    )
            x = emb.map_inputs_layer(torch.cat(parts, -1))
        if types is not None:  # BertModel adds type 0's row
            x = x + emb.token_type_embeddings(types) - emb.token_type_embeddings.weight[0]
        y = super().scale_inputs(x, position_ids)
        if self.concat:
            return y
        added = [
            self._table(name)(given)
            for (name, on), given in zip(self.tables, ids)
            if on and given is not None
        ]
        return y if not added else (y + sum(added)) / (1 + len(added))


class RoCBertForCausalLM(BertLMHeadModel):
    """transformers' RoCBertForCausalLM."""

    config_class = RoCBertConfig
    hf_prefix: ClassVar[str] = "roc_bert"
    checkpoint_rules = _rules("roc_bert", "cls.predictions")
    _no_split_modules: ClassVar[list[str]] = ["RoCBertLayer"]

    def __init__(self, config: RoCBertConfig):
        super().__init__(config)
        self.model = RoCBertModel(config)
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}

    def forward(
        self, *args, token_type_ids=None, input_shape_ids=None, input_pronunciation_ids=None, **kwargs
    ):
        """BertLMHeadModel's forward; the token types, shape and pronunciation ids (B, T) given to the
        embeddings (see the module's doc)."""
        self.model._extra = (token_type_ids, input_shape_ids, input_pronunciation_ids)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.model._extra = (None, None, None)

    def generate(self, *args, **kwargs):
        """BertLMHeadModel's; input_shape_ids / input_pronunciation_ids refused by name (see the module's doc)."""
        for key in _IDS:
            if kwargs.get(key) is not None:
                raise GenerationError(f"{type(self).__name__}.generate: {key} are not supported (transformers "
                                      "gives every new token the prompt's last ones); autolm generates with "
                                      f"row 0 of the table, as a forward without {key}")  # fmt: skip
            kwargs.pop(key, None)
        return super().generate(*args, **kwargs)
