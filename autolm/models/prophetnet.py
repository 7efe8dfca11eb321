"""ProphetNet's decoder as a causal LM (transformers' ProphetNetForCausalLM).

The decoder runs a main stream and `ngram` predicting streams through every layer, side by side in one tensor
(B, (1 + ngram) * T, h), as transformers does:

- the main stream: the token embeddings plus the learned position `slot + 1 + pad_token_id`; each stream s:
  `ngram_embeddings[s - 1]` (stream 0 takes the last row, as transformers indexes it) plus the position one
  further on; `embeddings_layer_norm` over all of them;
- each layer (post-norm, biases): the n-gram self-attention (`self_attn`: key_proj, value_proj, query_proj,
  out_proj shared by the streams; `relative_pos_embeddings` turns each query's state into a bias per head and
  relative-position bucket, T5's causal buckets of num_buckets up to relative_max_distance), then
  `self_attn_layer_norm`, then `feed_forward` (intermediate -> activation -> output) and its layer norm. The main
  stream attends the main stream causally; stream s at slot i attends the main keys of slots <= i - s (and slot 0)
  and its own key at slot i (bucket 0), never the other streams;
- the LM head reads the predicting streams: `logits` are stream 0's (the next token), `logits_ngram` the further
  streams' (where ngram > 1); the main stream's own output feeds no head. Only the main stream's keys and values
  go in the cache.

transformers' quirks kept: the predicting streams' relative bias is gathered from a (T, ngram, heads) layout read
as (ngram, heads, T), so with several tokens in a forward a position's bias comes from another position's and
stream's state (the logits of a prompt differ from those of its prefixes; one token at a time it is exact);
positions are cache slots, padding included (position_ids are not read); the loss is transformers' n-gram loss,
every stream against the labels as given (no shift; label smoothing `eps`; `disable_ngram_loss`).
Where autolm differs: transformers' cached forward masks neither padding nor, for streams s >= 1, the main keys of
slots i - s + 1 .. i; autolm keeps each forward's masks (a left-padded batch's generation does not attend its
padding; logits_ngram of a cached step equal the full forward's). transformers' cached step needs
pad_token_id 0 (its relative positions are shifted by it); autolm's are slot differences. transformers' own cache
holds num_encoder_layers layers (fewer decoder layers than encoder layers only). The cross-attention's weights
(`cross_attn`, `cross_attn_layer_norm`) load and save but never run (no encoder; encoder_hidden_states refused).
The word embeddings are `prophetnet.decoder.word_embeddings`, tied to `prophetnet.word_embeddings` and the head
unless untied (then `prophetnet.word_embeddings` is kept, unread, as in transformers). No one-token or compiled
step (every token takes the general forward), no tensor-parallel plan (transformers has none); llama.cpp has no
ProphetNet: no GGUF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GenerationError
from ..nn import ACTIVATIONS, Forward, Linear, embedding
from .base import CausalLM, DecoderModel
from .opt import OPTModel
from .output import ModelOutput
from .prophetnet_config import ProphetNetConfig


def relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: float) -> torch.Tensor:
    """transformers' causal buckets of key position minus query position: distances back 0 .. num_buckets // 2 - 1
    exactly, then log-spaced up to max_distance, the rest in the last bucket; keys ahead in bucket 0."""
    back = (-relative).clamp(min=0)
    exact = num_buckets // 2
    large = exact + torch.log(back.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = torch.min(large, torch.full_like(large, num_buckets - 1)).int()
    return torch.where(back < exact, back.int(), large).long()


@dataclass
class NgramForward(Forward):
    """Forward's context plus the streams' count and the relative buckets of this forward's queries over the
    key slots: main (T, S) (key slot minus query slot), predicting (T, S) (one less)."""

    ngram: int = 1
    main_buckets: torch.Tensor | None = None
    predict_buckets: torch.Tensor | None = None


class ProphetNetAttention(nn.Module):
    """A layer's encoder attention (`cross_attn`): its weights load and save; autolm runs no encoder."""

    def __init__(self, hidden: int):
        super().__init__()
        for name in ("key_proj", "value_proj", "query_proj", "out_proj"):
            setattr(self, name, Linear(hidden, hidden, bias=True))


class ProphetNetNgramSelfAttention(nn.Module):
    """The main and predicting streams' self-attention with its relative-position bias (see the module
    docstring)."""

    def __init__(self, config: ProphetNetConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.layer_idx, self.ngram = layer_idx, config.ngram
        self.num_heads = self.num_kv_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.num_buckets = config.num_buckets
        for name in ("key_proj", "value_proj", "query_proj", "out_proj"):
            setattr(self, name, Linear(h, h, bias=True))
        self.relative_pos_embeddings = Linear(h, config.num_buckets * self.num_heads, bias=True)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, h) -> (B, nh, L, hd)."""
        return t.view(*t.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: NgramForward) -> torch.Tensor:
        B, L, h = x.shape
        n, nh, T = self.ngram, self.num_heads, L // (1 + self.ngram)
        q = self.heads(self.query_proj(x) / self.head_dim**0.5)
        k, v = self.heads(self.key_proj(x)), self.heads(self.value_proj(x))
        keys, values = k[:, :, :T], v[:, :, :T]
        if ctx.cache is not None:
            keys, values = ctx.cache.update(self.layer_idx, keys, values, ctx.cache_position, ctx.kv_length)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        S = keys.shape[2]
        allowed = main_mask(ctx, S)  # (B, 1, T, S)
        # the main stream: causal over the main keys, each query's bias from its own state
        bias = self.relative_pos_embeddings(x[:, :T]).view(B, T, self.num_buckets, nh).permute(0, 3, 1, 2)
        bias = bias.gather(-1, ctx.main_buckets.expand(B, nh, T, S))
        scores = (q[:, :, :T] @ keys.transpose(2, 3) + bias).masked_fill(~allowed, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if ctx.attentions is not None:
            ctx.attentions.append(probs)
        main = self.out_proj((probs @ values).transpose(1, 2).reshape(B, T, h))
        # the predicting streams: the main keys up to slot i - s (and slot 0), and their own key
        qp, kp, vp = (t[:, :, T:].reshape(B, nh, n, T, self.head_dim).transpose(1, 2) for t in (q, k, v))
        raw = self.relative_pos_embeddings(x[:, T:]).view(B, n, T, self.num_buckets, nh)
        raw = raw.permute(0, 2, 1, 4, 3).reshape(B, n, nh, T, self.num_buckets)  # transformers' layout
        bias = raw.gather(-1, ctx.predict_buckets.expand(B, n, nh, T, S))
        shift = torch.arange(n, device=x.device)[:, None, None]
        slots = torch.arange(S, device=x.device)
        rule = (slots <= ctx.cache_position.to(x.device)[:, None] - shift) | (slots == 0)  # (n, T, S)
        seen = rule[None, :, None] & real_keys(ctx, S)[:, None, None, None]  # (B, n, 1, T, S)
        scores = (qp @ keys[:, None].transpose(-1, -2) + bias).masked_fill(~seen, float("-inf"))
        own = (qp * kp).sum(-1, keepdim=True) + raw[..., :1]
        probs = F.softmax(torch.cat([scores, own], -1), dim=-1, dtype=torch.float32).to(q.dtype)
        out = probs[..., :S] @ values[:, None] + probs[..., S:] * vp  # (B, n, nh, T, hd)
        streams = self.out_proj(out.transpose(2, 3).reshape(B, n * T, h))
        return torch.cat([main, streams], 1)


def real_keys(ctx: Forward, S: int) -> torch.Tensor:
    """(B, S): whether each key slot holds a real token (a padding query's streams see only their own keys)."""
    if ctx.attention_mask is None:
        return torch.ones(ctx.batch, S, dtype=torch.bool, device=ctx.cache_position.device)
    return ctx.attention_mask[:, :S].bool()


def main_mask(ctx: Forward, S: int) -> torch.Tensor:
    """The boolean (B, 1, T, S) causal and padding mask of the main stream (a padding query sees itself)."""
    mask = ctx.mask(None)
    if mask is None:
        slots = torch.arange(S, device=ctx.cache_position.device)
        mask = (slots[None] <= ctx.cache_position[:, None])[None, None].expand(ctx.batch, 1, -1, -1)
    return mask


class ProphetNetFeedForward(nn.Module):
    """intermediate -> activation -> output."""

    def __init__(self, config: ProphetNetConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.intermediate = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.output = Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.intermediate(x)))


class ProphetNetDecoderLayer(nn.Module):
    """self_attn -> self_attn_layer_norm (post-norm), cross_attn's weights (never run), feed_forward ->
    feed_forward_layer_norm."""

    def __init__(self, config: ProphetNetConfig, layer_idx: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = ProphetNetNgramSelfAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        if config.add_cross_attention:
            self.cross_attn = ProphetNetAttention(h)
            self.cross_attn_layer_norm = nn.LayerNorm(h, eps=eps)
        self.feed_forward = ProphetNetFeedForward(config)
        self.feed_forward_layer_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, ctx: NgramForward) -> torch.Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, ctx))
        return self.feed_forward_layer_norm(x + self.feed_forward(x))


class ProphetNetDecoder(DecoderModel):
    """word_embeddings, position_embeddings, ngram_embeddings, layers, embeddings_layer_norm (no final norm)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "word_embeddings"}

    def __init__(self, config: ProphetNetConfig):
        super().__init__(config, ProphetNetDecoderLayer, None)
        h = config.hidden_size
        self.position_embeddings = embedding(config.max_position_embeddings, h)
        self.ngram_embeddings = embedding(config.ngram, h)
        self.embeddings_layer_norm = nn.LayerNorm(h, eps=config.rms_norm_eps)
        order = (
            "word_embeddings",
            "position_embeddings",
            "ngram_embeddings",
            "layers",
            "embeddings_layer_norm",
        )
        self._modules = {**{k: self._modules[k] for k in order}, **self._modules}

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def shown(self, x: torch.Tensor) -> torch.Tensor:
        """The main stream, as transformers' hidden_states gives it."""
        return x[:, : x.shape[1] // (1 + self.config.ngram)]

    def forward(self, x, attention_mask, position_ids, cache, cache_position, kv_length, hidden_states=None,
                attentions=None, block_ids=None):  # fmt: skip
        """The streams' inputs (see the module docstring) through the layers: (B, (1 + ngram) T, h) out. Positions
        are the slots of cache_position (position_ids are not read)."""
        cfg, (B, T, h) = self.config, x.shape
        n, pad, slots = cfg.ngram, cfg.pad_token_id, cache_position.to(x.device)
        last = int(slots.max()) + 2 + pad if slots.numel() and not torch.compiler.is_compiling() else 0
        if last >= cfg.max_position_embeddings:
            raise GenerationError(f"slot {last - 2 - pad} needs position {last}, past the {cfg.max_position_embeddings} "
                                  "positions of ProphetNet's table (max_position_embeddings; the predicting streams "
                                  "read one further): shorten the prompt or max_new_tokens")  # fmt: skip
        ahead = self.position_embeddings(slots + 2 + pad)
        rows = self.ngram_embeddings((torch.arange(n, device=x.device) - 1) % n)  # transformers' [s - 1]
        streams = (rows[:, None] + ahead[None]).reshape(1, n * T, h).expand(B, -1, -1)
        x = self.embeddings_layer_norm(
            torch.cat([x + self.position_embeddings(slots + 1 + pad), streams.to(x.dtype)], 1)
        )
        rel = torch.arange(kv_length, device=x.device)[None] - slots[:, None]  # (T, S): key slot - query slot
        buckets = [relative_buckets(r, cfg.num_buckets, cfg.relative_max_distance) for r in (rel, rel - 1)]
        ctx = NgramForward({}, cache, cache_position, kv_length, attention_mask, B, attentions, block_ids, ngram=n,
                           main_buckets=buckets[0], predict_buckets=buckets[1])  # fmt: skip
        x = self.run(x, ctx, hidden_states)
        if hidden_states is not None:
            hidden_states[-1] = self.shown(hidden_states[-1])
        return x


class ProphetNetDecoderWrapper(OPTModel):
    """transformers' ProphetNetDecoderWrapper, the module named `prophetnet`: its own `word_embeddings` (the
    decoder's, tied; unread where untied) and the decoder, which it answers for."""

    _DELEGATED: ClassVar[tuple[str, ...]] = ("embed_tokens", "position_embeddings", "ngram_embeddings", "layers",
                                             "embeddings_layer_norm", "norm", "gradient_checkpointing")  # fmt: skip

    def __init__(self, config: ProphetNetConfig):
        nn.Module.__init__(self)
        self.word_embeddings = embedding(config.vocab_size, config.hidden_size)
        self.decoder = ProphetNetDecoder(config)


@dataclass
class ProphetNetDecoderLMOutput(ModelOutput):
    """transformers' ProphetNetDecoderLMOutput (loss, logits: stream 0's, logits_ngram: the further streams',
    past_key_values, hidden_states: the main stream's, attentions: the main stream's)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_ngram: torch.Tensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ProphetNetForCausalLM(CausalLM):
    """transformers' ProphetNetForCausalLM: the head over the predicting streams (see the module docstring)."""

    config_class = ProphetNetConfig
    causal_only: ClassVar[str] = "an encoder-decoder"  # transformers' other ProphetNet heads
    # learned positions at the cache's slots: served rows run alone (serve.rows)
    rows_apart: ClassVar[bool] = True
    base_model_prefix = "prophetnet"
    layers_prefix = "prophetnet.decoder.layers"
    embeddings_name = "prophetnet.decoder.word_embeddings"
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan
    _no_split_modules: ClassVar[list[str]] = ["ProphetNetDecoderLayer"]
    one_token_step: ClassVar[bool] = False  # the streams ride beside the tokens: the general forward decodes

    def __init__(self, config: ProphetNetConfig):
        super().__init__(config, ProphetNetDecoderWrapper(config))
        if config.tie_word_embeddings:  # the file's name for the (one) embeddings, which the head copies
            self.embeddings_name = "prophetnet.word_embeddings"

    @property
    def model(self) -> ProphetNetDecoderWrapper:
        """The body (`prophetnet`), by the name autolm's code uses in every family."""
        return self.prophetnet

    @property
    def new_if_missing(self) -> tuple[str, ...]:
        """A tied file holds the word embeddings once, as prophetnet.word_embeddings."""
        return ("prophetnet.decoder.word_embeddings.weight",) if self.config.tie_word_embeddings else ()

    def init_new(self, names: list[str]) -> str:
        self.tie_weights()
        return "tied prophetnet.decoder.word_embeddings to prophetnet.word_embeddings"

    def tie_weights(self) -> None:
        """Tied: the decoder's embeddings and the head are prophetnet.word_embeddings."""
        if self.config.tie_word_embeddings:
            self.prophetnet.decoder.word_embeddings.weight = self.prophetnet.word_embeddings.weight
            super().tie_weights()

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        new = super().resize_token_embeddings(*args, **kwargs)
        if self.config.tie_word_embeddings:
            self.prophetnet.word_embeddings = new
            self.tie_weights()
        return new

    def blocks(self) -> list[str]:
        """Placement units in forward order: the wrapper's embeddings, the decoder's modules (each layer on its
        own), the head."""
        decoder, out = self.prophetnet.decoder, ["prophetnet.word_embeddings"]
        for name, m in decoder.named_children():
            if m is decoder.layers:
                out += [f"{self.layers_prefix}.{i}" for i in range(len(m))]
            elif any(True for _ in m.parameters()):
                out.append(f"prophetnet.decoder.{name}")
        return [*out, "lm_head"]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):  # fmt: skip
        """logits: the first predicting stream's; logits_ngram: the further streams'; loss: transformers' n-gram
        loss (encoder_hidden_states refused: no encoder runs)."""
        for key in ("encoder_hidden_states", "encoder_attention_mask"):
            if kwargs.pop(key, None) is not None:
                raise GenerationError(f"ProphetNetForCausalLM.forward: {key} given, but autolm runs the decoder "
                                      "alone, without cross-attention: pass input_ids (or inputs_embeds) only")  # fmt: skip
        h, cache, hidden, attentions = self.decoder_states(input_ids, attention_mask, position_ids, past_key_values,
                                                           inputs_embeds, use_cache, cache_position,
                                                           output_hidden_states, output_attentions)  # fmt: skip
        n = self.config.ngram
        streams = h[:, h.shape[1] // (1 + n) :].unflatten(1, (n, -1))  # (B, n, T, h)
        if logits_to_keep:
            streams = streams[:, :, -logits_to_keep:]
        logits = self.logits(streams)
        loss = None if labels is None else self.ngram_loss(logits, labels.to(logits.device))
        out = ProphetNetDecoderLMOutput(loss, logits[:, 0], logits[:, 1:] if n > 1 else None, cache, hidden,
                                        attentions)  # fmt: skip
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def ngram_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """transformers' loss: each stream's logits (B, n, T, V) against the labels as given (streams past the
        first ignored under disable_ngram_loss), mean NLL over the labelled ones, label smoothing eps."""
        cfg, n = self.config, logits.shape[1]
        targets = labels[None].expand(n, -1, -1).clone()
        if cfg.disable_ngram_loss:
            targets[1:] = -100
        lprobs = F.log_softmax(
            logits.transpose(0, 1).reshape(-1, logits.shape[-1]), dim=-1, dtype=torch.float32
        )
        targets = targets.reshape(-1)
        loss = F.nll_loss(lprobs, targets, reduction="mean")
        if cfg.eps > 0.0:
            smooth = -lprobs.sum(-1)[targets.ne(-100)].mean()
            loss = (1.0 - cfg.eps) * loss + cfg.eps / lprobs.shape[-1] * smooth
        return loss
