"""RoFormer run as a decoder (transformers' RoFormerForCausalLM with `is_decoder=True`): BERT's post-LN layers
(models/bert.py) with rotary positions in the self-attention instead of learned position embeddings.

- embeddings: word + token type (type 0 unless token_type_ids are given), then a LayerNorm, all `embedding_size`
  wide (None: hidden_size), projected to hidden_size by `embeddings_project` where they differ; no positions added;
- attention: RoFormer's sinusoidal RoPE over adjacent pairs (x[2i], x[2i+1]) of every head's query and key (and
  value, where `rotary_value`), read from the table `roformer.encoder.embed_positions.weight` (its first half
  sin, its second cos; kept in the checkpoint as transformers keeps it, and used as the file has it);
- positions are always the cache's slots, as transformers' RoFormerEncoder counts them (the cache's length plus
  the token's index): a left-padded row's padding counts, and given position_ids change nothing (transformers
  takes none; autolm ignores them likewise); a slot past max_position_embeddings is refused (GenerationError);
- the head: cls.predictions (transform.dense to embedding_size -> hidden_act -> LayerNorm, then the decoder with
  its bias), tied to the word embeddings unless untied.

`is_decoder=False` runs bidirectionally without a cache and refuses generate, as BERT's (models/bert.py);
cross-attention weights load and never run (encoder_hidden_states refused). llama.cpp has no RoFormer: no GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import GenerationError
from ..nn import CheckpointRules, Rename, apply_rotary, embedding
from .bert import BertLMHeadModel, BertModel, BertSelfAttention, _rules
from .bert_config import ElectraConfig, _named_init


@dataclass(repr=False)
class RoFormerConfig(ElectraConfig):
    """transformers' RoFormerConfig: BERT's fields, embedding_size (None: hidden_size) and rotary_value."""

    model_type: ClassVar[str] = "roformer"
    bool_fields: ClassVar[tuple[str, ...]] = (*ElectraConfig.bool_fields, "rotary_value")

    vocab_size: int = 50000
    embedding_size: int | None = None
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 1536
    rotary_value: bool = False

    def __post_init__(self) -> None:
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        super().__post_init__()


_named_init(RoFormerConfig)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """transformers' RoFormerSinusoidalPositionalEmbedding.create_weight: sin of pos / 10000^(2i/dim) in the first
    half, cos in the second, computed in float64 (a checkpoint's own table replaces it on load)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    angles = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * (torch.arange(dim) // 2) / dim)
    sentinel = (dim + 1) // 2
    out = torch.empty(n_pos, dim, dtype=torch.float32)
    out[:, :sentinel] = angles[:, 0::2].sin().float()
    out[:, sentinel:] = angles[:, 1::2].cos().float()
    return out


class RoFormerPositions(nn.Module):
    """transformers' encoder.embed_positions: the sinusoidal table `weight` (max_position_embeddings, head_dim),
    a buffer here (transformers' frozen parameter), read by RoFormerRotary."""

    def __init__(self, n_pos: int, dim: int):
        super().__init__()
        self.register_buffer("weight", sinusoidal_table(n_pos, dim))


class RoFormerRotary:
    """The RoPE tables as RoFormer reads them: rows of the body's embed_positions at the cache's slots (whatever
    position_ids say), as (cos, sin) in rotate-half layout, whose first half apply_rotary's interleaved pairs read."""

    kinds: ClassVar[dict[str, dict]] = {"default": {}}  # the one table the layers read

    def __init__(self, body: RoFormerModel):
        self._body = [body]  # not a submodule of its own

    def tables(self, position_ids: torch.Tensor, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"default": (cos, sin)}, each (B, 1, T, head_dim), for positions (B, T)."""
        table = self._body[0].embed_positions.weight
        n = table.shape[0]
        if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= n:
            raise GenerationError(f"position {int(position_ids.max())} is past the {n} sinusoidal positions "
                                  "(max_position_embeddings): shorten the prompt or max_new_tokens")  # fmt: skip
        rows = table[position_ids.to(table.device)].to(position_ids.device, dtype)
        sin, cos = rows.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, T, hd/2) each
        return {"default": (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))}

    def slot_tables(
        self, position_ids, cache_position, dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The tables at the cache's slots, whatever position_ids say (transformers' RoFormerEncoder)."""
        return self.tables(cache_position.to(position_ids.device).expand(position_ids.shape[0], -1), dtype)

    def switch_length(self) -> int | None:
        return None


class RoFormerSelfAttention(BertSelfAttention):
    """BERT's query/key/value with RoFormer's pairwise RoPE on query and key (and value where rotary_value)."""

    def __init__(self, config: RoFormerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.rope, self.rope_interleaved = "default", True
        self.rotary_value = config.rotary_value

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        self._tables = ctx.rope["default"] if self.rotary_value else None
        try:
            return super().forward(x, ctx)
        finally:
            self._tables = None  # this forward's tables only

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project(x)
        if self.rotary_value:  # the values rotated as the keys are (transformers caches them rotated too)
            B, T, _ = v.shape
            heads = v.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
            v = apply_rotary(heads, *self._tables, True).transpose(1, 2).reshape(B, T, -1)
        return q, k, v


class RoFormerEmbeddings(nn.Module):
    """token_type_embeddings and the LayerNorm (word_embeddings are the body's embed_tokens; no positions)."""

    def __init__(self, config: RoFormerConfig):
        super().__init__()
        self.token_type_embeddings = embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.rms_norm_eps)


class RoFormerModel(BertModel):
    """BERT's body with RoFormer's embeddings and attention, and the sinusoidal table `embed_positions`."""

    slot_positions: ClassVar[bool] = True  # the one-token step's positions are the slots (autolm.step)

    def __init__(self, config: RoFormerConfig):
        super().__init__(config)
        self.embeddings = RoFormerEmbeddings(config)
        for layer in self.layers:
            old = layer.attention.self
            layer.attention.self = RoFormerSelfAttention(config, old.layer_idx)
        hd = config.hidden_size // config.num_attention_heads
        self.embed_positions = RoFormerPositions(config.max_position_embeddings, hd)
        self.rotary = RoFormerRotary(self)

    def scale_inputs(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """LayerNorm(input vectors + token type 0), projected; given token_type_ids: BertLMHeadModel.forward."""
        emb = self.embeddings
        x = emb.LayerNorm(x + emb.token_type_embeddings.weight[0])
        return x if self.embeddings_project is None else self.embeddings_project(x)


_ROFORMER_RULES = CheckpointRules([
    *_rules("roformer", "cls.predictions").rules,
    Rename(r"^roformer\.embeddings_project\.", "model.embeddings_project.", r"^model\.embeddings_project\.",
           "roformer.embeddings_project."),
    Rename(r"^roformer\.encoder\.embed_positions\.", "model.embed_positions.", r"^model\.embed_positions\.",
           "roformer.encoder.embed_positions."),
])  # fmt: skip


class RoFormerForCausalLM(BertLMHeadModel):
    """transformers' RoFormerForCausalLM."""

    config_class = RoFormerConfig
    hf_prefix: ClassVar[str] = "roformer"
    checkpoint_rules = _ROFORMER_RULES
    _no_split_modules: ClassVar[list[str]] = ["RoFormerLayer"]

    def __init__(self, config: RoFormerConfig):
        super().__init__(config)
        body = RoFormerModel(config)
        self.model = body
        self._modules = {k: self._modules[k] for k in ("model", "head", "lm_head")}
        if not config.tie_word_embeddings:
            self.checkpoint_rules = CheckpointRules([
                *_rules("roformer", "cls.predictions", tied=False).rules, *_ROFORMER_RULES.rules[-2:]
            ])  # fmt: skip

    def blocks(self) -> list[str]:
        """BERT's, the sinusoidal table first (the layers read it)."""
        return ["model.embed_positions", *super().blocks()]
