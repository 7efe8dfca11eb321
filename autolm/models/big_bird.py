"""BigBird run as a decoder (transformers' BigBirdForCausalLM with `is_decoder=True`): BERT's post-LN layers, body
`bert` and head cls.predictions (models/bert.py), with BigBird's options.

- `use_bias`: whether query / key / value have biases; `rescale_embeddings`: the token vectors (embedded or given
  as inputs_embeds) times sqrt(hidden_size) before the token type and position embeddings are added;
- attention: full causal attention (transformers' "original_full"). transformers' BigBirdModel runs
  `attention_type="block_sparse"` (the default) only over a forward of more than (5 + 2 * num_random_blocks) *
  block_size tokens, and then without a causal mask and without the cache: its decoder sees later tokens there.
  Shorter forwards (every decoding step among them) switch the model to "original_full" for good, which autolm
  always runs. A forward that long under "block_sparse" is refused (GenerationError naming attention_type): set
  attention_type="original_full" to run it causally;
- positions where none are given are the cache's slots, given ones read as rows (BERT's).

`is_decoder=False` runs bidirectionally (full attention) without a cache and refuses generate, as BERT's;
cross-attention weights load and never run (encoder_hidden_states refused). llama.cpp has no BigBird: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import _is_int
from ..errors import ConfigError, GenerationError
from ..nn import CheckpointRules, Ignored, Linear, Rename
from .bert import BertLMHeadModel, BertModel, _rules
from .bert_config import BertConfig, _named_init


@dataclass(repr=False)
class BigBirdConfig(BertConfig):
    """transformers' BigBirdConfig: BERT's fields, BigBird's attention options and rescale_embeddings."""

    model_type: ClassVar[str] = "big_bird"
    bool_fields: ClassVar[tuple[str, ...]] = (*BertConfig.bool_fields, "use_bias", "rescale_embeddings")

    vocab_size: int = 50358
    hidden_act: str = "gelu_new"
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    sep_token_id: int | None = 66
    attention_type: str = "block_sparse"
    use_bias: bool = True
    rescale_embeddings: bool = False
    block_size: int = 64
    num_random_blocks: int = 3

    def validate(self) -> None:
        super().validate()
        if self.attention_type not in ("original_full", "block_sparse"):
            raise ConfigError(f"{self.source}: attention_type must be 'original_full' or 'block_sparse', "
                              f"found {self.attention_type!r}")  # fmt: skip
        for key in ("block_size", "num_random_blocks"):
            if not (_is_int(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConfigError(f"{self.source}: {key} must be a non-negative integer, "
                                  f"found {getattr(self, key)!r}")  # fmt: skip

    @property
    def sparse_from(self) -> int | None:
        """The forward length past which transformers runs block-sparse attention (None: never)."""
        if self.attention_type != "block_sparse":
            return None
        return (5 + 2 * self.num_random_blocks) * self.block_size


_named_init(BigBirdConfig)


class BigBirdModel(BertModel):
    """BERT's body; query / key / value biased where use_bias; the token vectors rescaled where
    rescale_embeddings (in embed: forward scales given inputs_embeds alike)."""

    def __init__(self, config: BigBirdConfig):
        super().__init__(config)
        if not config.use_bias:
            for layer in self.layers:
                att = layer.attention.self
                size = att.num_heads * att.head_dim
                att.query, att.key, att.value = (
                    Linear(config.hidden_size, size, bias=False) for _ in range(3)
                )
        self.embed_scale = config.hidden_size**0.5 if config.rescale_embeddings else None
        # transformers' BigBirdForCausalLM keeps BigBirdModel's pooler (never run by the LM): loaded and saved
        self.pooler = Linear(config.hidden_size, config.hidden_size, bias=True)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x if self.embed_scale is None else x * self.embed_scale


def _big_bird_rules(tied: bool) -> CheckpointRules:
    """BERT's rules under `bert`, the pooler kept as model.pooler (BERT's files' pooler is dropped)."""
    kept = [r for r in _rules("bert", "cls.predictions", tied).rules
            if not (isinstance(r, Ignored) and "pooler" in r.model)]  # fmt: skip
    pooler = Rename(r"^bert\.pooler\.", "model.pooler.", r"^model\.pooler\.", "bert.pooler.")
    return CheckpointRules([*kept, pooler])


class BigBirdForCausalLM(BertLMHeadModel):
    """transformers' BigBirdForCausalLM (body `bert`, head cls.predictions)."""

    config_class = BigBirdConfig
    checkpoint_rules = _big_bird_rules(True)
    _no_split_modules: ClassVar[list[str]] = ["BigBirdLayer"]

    def __init__(self, config: BigBirdConfig):
        super().__init__(config)
        self.model = BigBirdModel(config)
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}
        if not config.tie_word_embeddings:
            self.checkpoint_rules = _big_bird_rules(False)

    def blocks(self) -> list[str]:
        """BERT's, the (never run) pooler before the head."""
        out = super().blocks()
        return [*out[:-2], "model.pooler", *out[-2:]]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, **kwargs):  # fmt: skip
        """BertLMHeadModel's forward; given inputs_embeds rescaled where rescale_embeddings; a forward long
        enough for transformers' block-sparse attention refused (see the module's doc)."""
        x = input_ids if input_ids is not None else inputs_embeds
        limit = self.config.sparse_from
        if limit is not None and x is not None and x.shape[1] > limit:
            raise GenerationError(f"{type(self).__name__}: a forward over {x.shape[1]} tokens, more than "
                                  f"(5 + 2 * num_random_blocks) * block_size = {limit}, with attention_type "
                                  "'block_sparse': transformers runs block-sparse attention there, without a causal "
                                  "mask or the cache, which autolm does not run. Set attention_type="
                                  "'original_full' (full causal attention, as transformers runs shorter forwards), "
                                  "or feed the prompt in shorter pieces")  # fmt: skip
        if inputs_embeds is not None and self.model.embed_scale is not None:
            inputs_embeds = inputs_embeds * self.model.embed_scale
        return super().forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *args,
                               **kwargs)  # fmt: skip
