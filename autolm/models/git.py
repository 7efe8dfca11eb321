"""GIT (microsoft/git-base...: transformers' GitForCausalLM), an image-text model whose text decoder is a BERT-style
post-LN encoder run with a causal mask; autolm loads and runs its language model on text alone.

- embeddings (`git.embeddings`): word + learned absolute position, then a LayerNorm (no token types); positions
  where none are given are the cache's slots (padding included), as transformers counts them; given position_ids
  are table rows (generate passes the padding mask's positions, from 0, as transformers' generate does);
- layers (`git.encoder.layer.N`): BERT's (models/bert.py: attention.self.query/key/value, attention.output,
  intermediate, output), causal over the text tokens;
- the head `output`: a Linear with a bias, tied to the word embeddings only where tie_word_embeddings (default
  false). autolm's modules are `model` and `lm_head`; state_dict(), checkpoints and adapters use transformers'
  names (git.*, output.*).

Images: the CLIP-style tower (git.image_encoder), git.visual_projection and the video frames' temporal embeddings
(git.img_temporal_embedding) are skipped on load; pixel_values (any image input) is refused by name. Saved, a model
writes the text weights under transformers' names and its config.json with the checkpoint's vision_config kept as
it was given (GitConfig needs one for its image tower: absent, transformers builds its default); transformers'
GitForCausalLM loads that file with its image tower newly initialized (reported missing) and the same text logits.

Where transformers differs: with a cache, its GitModel widens a 2-D attention_mask by the image's patch count
(image_patch_tokens, from vision_config) on every step after the first, image or not, so on text alone a
left-padded row's decode steps read a mask shifted by that many slots (its padding seen, its first real tokens
masked); an unpadded batch is unaffected. autolm masks the padding on every step: its tokens are transformers'
generate(use_cache=False)'s (tests/test_family_git.py pins both). With labels, transformers drops the first
image_patch_tokens logits before its shifted loss, image or not, and fails on text alone (the lengths differ);
autolm's loss is the usual next-token loss over the text. llama.cpp has no GIT: no GGUF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import PretrainedConfig, _is_int
from ..errors import ConfigError, GenerationError
from ..nn import (
    ACTIVATIONS,
    CheckpointRules,
    Ignored,
    Linear,
    Rename,
    Rotary,
    embedding,
    resize_bias,
    transformers_state_dict,
)
from .base import CausalLM
from .bert import BertLayer, BertLMHeadModel, BertModel
from .bert_config import _NOT_BERT, _named_init


@dataclass(repr=False)
class GitConfig(PretrainedConfig):
    """transformers' GitConfig (its text decoder's fields): LayerNorm's epsilon is `layer_norm_eps` (also an
    attribute). vision_config, the dropouts and initializer_range change nothing autolm runs and are kept as given."""

    model_type: ClassVar[str] = "git"
    attribute_map: ClassVar[dict[str, str]] = {"rms_norm_eps": "layer_norm_eps"}
    activations: ClassVar[tuple[str, ...]] = tuple(ACTIVATIONS)
    # what models/bert.py's layers and forward read: always a causal decoder, no cross-attention, BERT's positions
    is_decoder: ClassVar[bool] = True
    add_cross_attention: ClassVar[bool] = False
    fairseq_positions: ClassVar[bool] = False

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = 101
    eos_token_id: int | list[int] | None = 102
    tie_word_embeddings: bool = False
    num_image_with_embedding: int | None = None

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.head_dim = None  # derived from num_attention_heads and hidden_size
        try:
            super().__post_init__()
        except ConfigError as e:  # the message in config.json's names
            raise ConfigError(re.sub(r"\brms_norm_eps\b", "layer_norm_eps", str(e))) from None

    def validate(self) -> None:
        super().validate()
        n = self.num_image_with_embedding
        if n is not None and not (_is_int(n) and n > 0):
            raise ConfigError(f"{self.source}: num_image_with_embedding must be a positive integer or null, "
                              f"found {n!r}")  # fmt: skip
        vision = self.extra.get("vision_config")
        if vision is not None and not isinstance(vision, dict):
            raise ConfigError(f"{self.source}: vision_config must be an object, found {vision!r}")

    def rope_kinds(self) -> dict[str, dict[str, Any]]:
        return {}  # learned position embeddings, no RoPE

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in _NOT_BERT:
            out.pop(key, None)
        return out


GitConfig.layer_norm_eps = property(lambda self: self.rms_norm_eps,
                                    lambda self, v: setattr(self, "rms_norm_eps", v))  # fmt: skip
_named_init(GitConfig)


class GitEmbeddings(nn.Module):
    """position_embeddings and the LayerNorm (word_embeddings are the body's embed_tokens)."""

    def __init__(self, config: GitConfig):
        super().__init__()
        self.position_embeddings = embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)


class GitModel(BertModel):
    """embed_tokens, embeddings (positions, LayerNorm), BERT's layers; no final norm (post-LN layers)."""

    def __init__(self, config: GitConfig):
        nn.Module.__init__(self)
        self.config = config
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        self.embeddings = GitEmbeddings(config)
        self.embeddings_project = None
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = None
        self.gradient_checkpointing = False
        self.rotary = Rotary({}, config.head_dim, config.max_position_embeddings, False)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """LayerNorm(input vectors + the positions' rows (B, T))."""
        table = self.embeddings.position_embeddings
        n = table.num_embeddings
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(f"position {int(position_ids.max())} is past the {n} learned positions "
                                  "(max_position_embeddings): shorten the prompt or max_new_tokens")  # fmt: skip
        return self.embeddings.LayerNorm(x + table(position_ids))


_RULES = CheckpointRules([
    Rename(r"^git\.embeddings\.word_embeddings\.", "model.embed_tokens.", r"^model\.embed_tokens\.",
           "git.embeddings.word_embeddings."),
    Rename(r"^git\.embeddings\.", "model.embeddings.", r"^model\.embeddings\.", "git.embeddings."),
    Rename(r"^git\.encoder\.layer\.", "model.layers.", r"^model\.layers\.", "git.encoder.layer."),
    Rename(r"^output\.", "lm_head.", r"^lm_head\.", "output."),
    Ignored(r"git\.(image_encoder|visual_projection)\..+"),  # the image tower and its projection
    Ignored(r"git\.img_temporal_embedding\.\d+"),  # video frames' embeddings (num_image_with_embedding)
    Ignored(r"git\.embeddings\.position_ids"),  # old files' buffer
])  # fmt: skip


class GitForCausalLM(BertLMHeadModel):
    """transformers' GitForCausalLM on text alone: BERT's body without token types, the head `output` (biased)."""

    config_class = GitConfig
    causal_only: ClassVar[str] = "the image-text GitModel (with its image tower) or none"
    hf_prefix: ClassVar[str] = "git"
    hf_head: ClassVar[str] = "output"
    checkpoint_rules = _RULES
    _no_split_modules: ClassVar[list[str]] = ["GitLayer"]

    def __init__(self, config: GitConfig):
        CausalLM.__init__(self, config, GitModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)
        transformers_state_dict(self)  # state_dict() in transformers' names

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.finish_logits(self.lm_head(h))

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """CausalLM's; the head's bias resized as transformers resizes an output Linear's (untied: mean_resizing;
        tied: zeros)."""
        bias = self.lm_head.bias
        emb = CausalLM.resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)
        resize_bias(
            self.lm_head, bias, emb.weight.shape[0], mean_resizing and not self.config.tie_word_embeddings
        )
        return emb

    def blocks(self) -> list[str]:
        layers = [f"model.layers.{i}" for i in range(len(self.model.layers))]
        return ["model.embed_tokens", "model.embeddings", *layers, "lm_head"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, *args, **kwargs):  # fmt: skip
        """CausalLM's forward (pixel_values and other image inputs refused by name there); positions where none
        are given as transformers counts them (the cache's slots)."""
        kwargs.pop("interpolate_pos_encoding", None)  # the image tower's option: no image is run
        if kwargs.get("token_type_ids") is not None:
            raise GenerationError(f"{type(self).__name__}.forward: token_type_ids given, but GIT has no token "
                                  "type embeddings: pass input_ids (or inputs_embeds) only")  # fmt: skip
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, inputs_embeds, past_key_values)
        return CausalLM.forward(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                                *args, **kwargs)  # fmt: skip
