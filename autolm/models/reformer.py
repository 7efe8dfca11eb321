"""Reformer as a causal LM (transformers' ReformerModelWithLMHead, is_decoder true).

- embeddings: `word_embeddings` plus axial position embeddings (two factors: position p reads row p // shape[1] of
  `weights.0` and column p % shape[1] of `weights.1`, concatenated) or a plain table (`embedding`);
- reversible residual layers over two streams, both the embeddings at first: each layer adds its attention
  (`attention.layer_norm` of the second stream -> self_attention -> `output.dense`) to the first stream, then its
  feed-forward (`feed_forward.layer_norm` -> `dense.dense` -> activation -> `output.dense`) of the new first stream
  to the second; `encoder.layer_norm` over both (2 * hidden_size) and the head `lm_head.decoder` (no bias:
  `lm_head.bias` loads and saves unread, as in transformers);
- local self-attention layers (query, key, value): a query sees the keys of its own chunk of
  local_attn_chunk_length positions and of the local_num_chunks_before chunks before it, causally;
- LSH self-attention layers (shared query_key, value): keys are the length-normalised queries over sqrt(head
  size), a query never sees its own key (-1e5) unless nothing else, masked keys -1e9.

LSH attention attends as full causal attention up to lsh_attn_chunk_length keys; past it transformers hashes the
keys into buckets by random rotations (seeded by hash_seed where set: deterministic), sorts them and attends within
chunks of the sorted order (models.reformer_lsh). A forward from slot 0 runs that exactly, its input padded on the
right to a multiple of the chunk lengths as transformers pads it, without writing the cache. transformers' cached
steps past the chunk length hash the cached states' buckets (its past_buckets_states); autolm does not run those: a
forward after cached tokens past lsh_attn_chunk_length is a GenerationError naming it (generation stops there;
a full forward of any length runs). num_buckets null: chosen from each hashed forward's length (transformers fixes
it at its first such forward's and writes it into its config). Local attention runs at every length. The cache keeps
each layer's keys and values (transformers keeps the normed hidden states: the same).

As transformers: positions are position_ids where given, else cache slots (padding included); the loss is the
shifted causal loss. Where autolm differs: transformers' generate drops attention_mask (padding is attended, and
positions count slots) while autolm's masks it; its cached local step with local_num_chunks_before > 1 reads the
last local_attn_chunk_length states where fewer than that many chunks lie behind the query, autolm keeps the full
forward's keys. No one-token or compiled step (every token takes the general forward), no tensor-parallel plan
(transformers has none), no tied head (the head reads 2 * hidden_size); llama.cpp has no Reformer: no GGUF.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, GenerationError
from ..nn import ACTIVATIONS, Forward, Linear, embedding, resize_bias
from .base import CausalLM, DecoderModel
from .reformer_config import ReformerConfig
from .reformer_lsh import lsh_attention

_MASKS = {torch.float16: (-1e4, -1e3)}  # transformers' mask values (masked keys, one's own) by dtype
_MASKS_FP32 = (-1e9, -1e5)


class AxialPositionEmbeddings(nn.Module):
    """`weights.0` (shape[0], 1, d0) and `weights.1` (1, shape[1], d1): position p is row p // shape[1] of the first
    and column p % shape[1] of the second, concatenated."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        (r, c), (d0, d1) = config.axial_pos_shape, config.axial_pos_embds_dim
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.ones(r, 1, d0)), nn.Parameter(torch.ones(1, c, d1))]
        )

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        c = self.weights[1].shape[1]
        return torch.cat([self.weights[0][position_ids // c, 0], self.weights[1][0, position_ids % c]], -1)


class PositionEmbeddings(nn.Module):
    """A plain table (`embedding`), where axial_pos_embds is false."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(position_ids)


class ReformerEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.word_embeddings = embedding(config.vocab_size, config.hidden_size)
        kind = AxialPositionEmbeddings if config.axial_pos_embds else PositionEmbeddings
        self.position_embeddings = kind(config)


class ReformerSelfAttention(nn.Module):
    """Local (`query`, `key`, `value`) or LSH (`query_key`, `value`) attention of one layer (see the module
    docstring), in eager arithmetic with transformers' finite mask values."""

    def __init__(self, config: ReformerConfig, layer_idx: int, kind: str):
        super().__init__()
        self.layer_idx, self.kind = layer_idx, kind
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        h, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        names = ("query_key", "value") if kind == "lsh" else ("query", "key", "value")
        for name in names:
            setattr(self, name, Linear(h, inner, bias=False))
        self.chunk, self.before = config.local_attn_chunk_length, config.local_num_chunks_before
        self.config = config  # LSH hashing reads its fields (models.reformer_lsh)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: Forward) -> torch.Tensor:
        B, T, _ = x.shape
        if self.kind == "lsh":
            q = self.heads(self.query_key(x))
            k = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(self.head_dim)
        else:
            q, k = self.heads(self.query(x)), self.heads(self.key(x)) / math.sqrt(self.head_dim)
        v = self.heads(self.value(x))
        if self.kind == "lsh" and ctx.cache is None and ctx.kv_length > self.config.lsh_attn_chunk_length:
            mask = None if ctx.attention_mask is None else ctx.attention_mask[:, :T].to(x.device)
            return lsh_attention(q, v, mask, self.config).transpose(1, 2).reshape(B, T, -1)
        if ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_idx, k, v, ctx.cache_position, ctx.kv_length)
            k, v = k.to(q.dtype), v.to(q.dtype)
        S, at = k.shape[2], ctx.cache_position.to(x.device)[:, None]
        slots = torch.arange(S, device=x.device)[None]
        seen = slots <= at
        if self.kind == "local":
            seen = seen & (slots // self.chunk >= at // self.chunk - self.before)
        seen = seen[None, None]
        if ctx.attention_mask is not None:
            seen = seen & ctx.attention_mask[:, None, None, :S].bool().to(x.device)
        masked, itself = (
            torch.tensor(v, dtype=q.dtype, device=x.device) for v in _MASKS.get(q.dtype, _MASKS_FP32)
        )
        scores = torch.where(seen, q @ k.transpose(2, 3), masked)
        if self.kind == "lsh":
            scores = torch.where(slots == at, itself, scores)
        probs = torch.exp(scores - torch.logsumexp(scores, -1, keepdim=True))
        if ctx.attentions is not None:
            ctx.attentions.append(probs)
        return (probs @ v).transpose(1, 2).reshape(B, T, -1)


class ReformerSelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dense = Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=False)


class ReformerAttention(nn.Module):
    """layer_norm -> self_attention -> output.dense."""

    def __init__(self, config: ReformerConfig, layer_idx: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attention = ReformerSelfAttention(config, layer_idx, config.attn_layers[layer_idx])
        self.output = ReformerSelfOutput(config)

    def forward(self, x: torch.Tensor, ctx: Forward) -> torch.Tensor:
        return self.output.dense(self.self_attention(self.layer_norm(x), ctx))


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = Linear(n_in, n_out, bias=True)


class ChunkReformerFeedForward(nn.Module):
    """layer_norm -> dense.dense -> activation -> output.dense (transformers' chunking changes no value)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.dense = _Dense(config.hidden_size, config.intermediate_size)
        self.output = _Dense(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.act(self.dense.dense(self.layer_norm(x))))


class ReformerLayer(nn.Module):
    """The reversible layer over the two streams, side by side in the last dimension (attention's, hidden)."""

    def __init__(self, config: ReformerConfig, layer_idx: int):
        super().__init__()
        self.attention = ReformerAttention(config, layer_idx)
        self.feed_forward = ChunkReformerFeedForward(config)

    def forward(self, x: torch.Tensor, ctx: Forward) -> torch.Tensor:
        attn, hidden = x.chunk(2, -1)
        attn = attn + self.attention(hidden, ctx)
        return torch.cat([attn, hidden + self.feed_forward(attn)], -1)


class ReformerEncoder(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(ReformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.rms_norm_eps)


class ReformerModel(DecoderModel):
    """transformers' ReformerModel (`embeddings`, `encoder`); autolm's names embed_tokens and layers reach into
    them."""

    def __init__(self, config: ReformerConfig):
        nn.Module.__init__(self)
        self.config = config
        self.embeddings = ReformerEmbeddings(config)
        self.encoder = ReformerEncoder(config)
        self.gradient_checkpointing = False

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "embed_tokens":
            self.embeddings.word_embeddings = value
        else:
            super().__setattr__(name, value)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x  # encoder.layer_norm after hidden_states took the hidden stream (forward)

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        """The hidden stream, as transformers' hidden_states gives it."""
        return x[..., x.shape[-1] // 2 :]

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, hidden_states=None,
                attentions=None, block_ids=None):  # fmt: skip
        """Positions' embeddings added, both streams through the layers, encoder.layer_norm: (B, T, 2h). A forward
        that hashes (see hashed_length) runs on its input padded as transformers pads it, without the cache."""
        cfg, (B, T) = self.config, x.shape[:2]
        padded = self.hashed_length(
            T, int(cache_position[0]) if T else 0, None if cache is None else cache.prefill
        )
        if padded is not None:
            extra = padded - T
            pad = self.embed_tokens.weight.new_full((B, extra), cfg.pad_token_id or 0, dtype=torch.long)
            x = torch.cat([x, self.embed_tokens(pad).to(x.dtype)], 1)
            real = torch.ones(B, T, device=x.device) if attention_mask is None else attention_mask[:, :T]
            attention_mask = torch.cat([real, real.new_zeros(B, extra)], 1)
            cache_position = torch.arange(padded, device=x.device)
            slots = torch.arange(T, padded, device=x.device).expand(B, -1)
            position_ids, cache, kv_length = torch.cat([position_ids.to(x.device), slots], 1), None, padded
        position_ids = position_ids.to(x.device)
        top = int(position_ids.max()) if position_ids.numel() and not torch.compiler.is_compiling() else 0
        if top >= cfg.positions:
            raise GenerationError(f"position {top} is past the {cfg.positions} positions of Reformer's "
                                  "embeddings (axial_pos_shape's cells, or max_position_embeddings): shorten the "
                                  "prompt or max_new_tokens")  # fmt: skip
        x = x + self.embeddings.position_embeddings(position_ids).to(x.dtype)
        ctx = Forward({}, cache, cache_position, kv_length, attention_mask, B, attentions, block_ids)
        x = self.run(torch.cat([x, x], -1), ctx, hidden_states)
        if hidden_states is not None:
            hidden_states[-1] = self.shown(hidden_states[-1])
            hidden_states[:] = [h[:, :T] for h in hidden_states]
        return self.encoder.layer_norm(x[:, :T])

    def hashed_length(self, T: int, past: int, prefill: int | None = None) -> int | None:
        """The length transformers pads a forward from slot 0 to where its LSH layers hash (past
        lsh_attn_chunk_length: to a multiple of the chunk lengths), else None; a GenerationError for a forward after
        cached tokens where transformers would hash the cached buckets (keys past the chunk length, or a first
        forward of `prefill` tokens that hashed), which autolm does not run."""
        cfg = self.config
        if "lsh" not in cfg.attn_layers:
            return None
        local = {cfg.local_attn_chunk_length} if "local" in cfg.attn_layers else set()
        lengths = {cfg.lsh_attn_chunk_length} | local
        lcm = math.lcm(*lengths)

        def padded(n: int) -> int:
            return n if n % lcm == 0 or min(lengths) >= n else n + lcm - n % lcm

        if past:
            if past + T > cfg.lsh_attn_chunk_length or padded(prefill or past) > cfg.lsh_attn_chunk_length:
                raise GenerationError(f"{past + T} positions for Reformer's LSH attention after cached tokens: "
                                      f"past lsh_attn_chunk_length ({cfg.lsh_attn_chunk_length}) transformers hashes "
                                      "the cached tokens' buckets, which autolm does not run; generate fewer "
                                      "tokens, or run the whole sequence in one forward")  # fmt: skip
            return None
        return padded(T) if padded(T) > cfg.lsh_attn_chunk_length else None


class ReformerOnlyLMHead(nn.Module):
    """`decoder` (2 * hidden_size -> vocab, no bias) and `bias`, which transformers keeps and never adds."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.decoder = Linear(2 * config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


class ReformerModelWithLMHead(CausalLM):
    """transformers' ReformerModelWithLMHead (see the module docstring)."""

    config_class = ReformerConfig
    causal_only: ClassVar[str] = "an encoder (ReformerForMaskedLM, classification, QA)"
    base_model_prefix = "reformer"
    layers_prefix = "reformer.encoder.layers"
    embeddings_name = "reformer.embeddings.word_embeddings"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["ReformerLayer"]
    one_token_step: ClassVar[bool] = False  # masks of its own (chunks, the self mask): the general forward

    def __init__(self, config: ReformerConfig):
        for name, why in (("is_decoder", not config.is_decoder), ("tie_word_embeddings", config.tie_word_embeddings),
                          ("local_num_chunks_after", config.local_num_chunks_after),
                          ("lsh_num_chunks_after", config.lsh_num_chunks_after)):  # fmt: skip
            if why:
                raise ConfigError(f"{config.source}: ReformerModelWithLMHead needs is_decoder true, "
                                  "tie_word_embeddings false (the head reads 2 * hidden_size) and no chunks after "
                                  f"(local_num_chunks_after, lsh_num_chunks_after 0); {name} is "
                                  f"{getattr(config, name)!r}")  # fmt: skip
        super().__init__(config, ReformerModel(config))
        self.lm_head = ReformerOnlyLMHead(config)

    @property
    def model(self) -> ReformerModel:
        """The body (`reformer`), by the name autolm's code uses in every family."""
        return self.reformer

    def tie_weights(self) -> None:
        """Never tied (the head is 2 * hidden_size wide)."""

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head.decoder

    def blocks(self) -> list[str]:
        n = len(self.reformer.encoder.layers)
        return ["reformer.embeddings", *(f"{self.layers_prefix}.{i}" for i in range(n)), "reformer.encoder.layer_norm",
                "lm_head"]  # fmt: skip

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """CausalLM's over the embeddings and `lm_head.decoder`; `lm_head.bias` cut or grown with them."""
        head = self.lm_head
        self.lm_head = head.decoder
        try:
            emb = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        finally:
            head.decoder, self.lm_head = self.lm_head, head
        holder = nn.Module()
        holder.bias = None
        resize_bias(holder, head.bias, emb.weight.shape[0], mean_resizing)
        head.bias = holder.bias if holder.bias is not None else head.bias
        return emb

    def decoder_states(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *rest):
        """CausalLM's; positions are cache slots where position_ids are not given, as transformers counts them."""
        if position_ids is None:
            x = input_ids if inputs_embeds is None else inputs_embeds
            past = past_key_values.length if past_key_values is not None else 0
            device = x.device
            position_ids = torch.arange(past, past + x.shape[1], device=device).expand(x.shape[0], -1)
        return super().decoder_states(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, *rest
        )
