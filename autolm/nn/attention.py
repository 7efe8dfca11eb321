"""Self-attention as families configure it, and the two contexts a forward gives its layers.

`Attention` covers the variants of the supported families as parameters: biases, per-head or whole-projection
q/k norms, full, partial or no RoPE (which RoPE table, for families with several; rotate-half or interleaved
pairs), the score scale, tanh soft-capping, a sliding window, chunked attention (Llama 4: a query sees only the
keys of its own chunk of `chunk` positions) and attention sinks. Where its keys and values go and what they attend
to is the context's business:

- `Forward`: a batch of T new tokens per row, written into the KV cache at `cache_position`, attending under a
  padding and causal (or sliding-window, or chunked) mask over the first `kv_length` slots; the general forward.
- `OneToken`: one new token per row, every row's real tokens ending at the same slot (one sequence, or a
  left-padded / right-aligned batch): no masks beyond each row's first real slot, the cache written and read
  in place. The fast decode steps (autolm.step) run the same layers under it, eager or compiled ahead of time.

A layer's window may be a `ReferenceWindow` (transformers' reference sliding window, Unlimited-OCR): the general
forward then also lets it see the keys of its cache's prefill (KVCache.prefill); the one-token step refuses it.

A layer that shares another layer's keys and values (KV sharing: it computes neither) calls `attend_shared` with
that layer's index; the layer that computes them passes `keep=True` to `attend`, so that, in a forward without a
cache too, the keys and values it attended over stay in the context for the layers that read them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .cache import KVCache
from .linear import Linear, packed
from .rope import apply_rotary

Tables = dict[str, tuple[torch.Tensor, torch.Tensor]]  # RoPE kind -> (cos, sin) (B, 1, T, rotary_dim)


class ReferenceWindow(int):
    """A sliding window of this many slots (the query's own and the window - 1 before it) that also sees every
    key of the cache's prefill, the tokens its first forward wrote (transformers' "reference_sliding_attention";
    without a cache, every key is the prompt's: causal attention)."""


@dataclass
class Forward:
    """What the layers of one general forward share: RoPE tables, the cache and where the new tokens go in it,
    the padding mask, and (when asked) a list collecting attention probabilities."""

    rope: Tables
    cache: KVCache | None
    cache_position: torch.Tensor  # (T,) slots of the new tokens
    kv_length: int  # key slots attended over
    attention_mask: torch.Tensor | None  # (B, >= kv_length), 1 for real tokens
    batch: int
    attentions: list | None = None
    # (B, >= kv_length) each key slot's block (transformers' block_sequence_ids): the slots of a block >= 0 attend
    # each other both ways on top of the causal mask (a bidirectional prefix: models.image_text.prompt_blocks)
    block_ids: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)  # layer -> (keys, values) it attended over, where it kept them

    def mask(self, window: int | None, chunk: int | None = None) -> torch.Tensor | None:
        """The boolean (B, 1, T, S) mask for a window size (None: full attention) or a chunk size, made once per
        forward."""
        key = (window, chunk, type(window))
        if key not in self._masks:
            rest = (self.batch, self.kv_length, chunk, self.block_ids, self.reference(window))
            self._masks[key] = build_mask(window, self.attention_mask, self.cache_position, *rest)
        return self._masks[key]

    def reference(self, window: int | None) -> int | None:
        """The key slots a ReferenceWindow layer always sees: the cache's prefill (every key without a cache)."""
        if not isinstance(window, ReferenceWindow):
            return None
        prefill = None if self.cache is None else self.cache.prefill
        return self.kv_length if prefill is None else prefill

    def attend(
        self,
        layer_idx: int,
        q,
        k,
        v,
        window=None,
        scale=None,
        softcap=None,
        sinks=None,
        chunk=None,
        alibi=None,
        keep: bool = False,
    ) -> torch.Tensor:
        """q (B, nh, T, hd), k, v (B, n_kv, T, hd) -> (B, T, nh, hd). keep: the keys and values attended over
        (the cache's, or these) stay in `kept` for layers that share them (attend_shared)."""
        if self.cache is not None:
            k, v = self.cache.update(layer_idx, k, v, self.cache_position, self.kv_length)
            if k.dtype != q.dtype:  # a cache kept in another dtype (a GGUF model's float16 one)
                k, v = k.to(q.dtype), v.to(q.dtype)
        if keep:
            self.kept[layer_idx] = (k, v)
        mask = self.mask(window, chunk)
        return kernels.attention(q, k, v, mask, scale, softcap, sinks, self.attentions, alibi)

    def attend_shared(
        self, source: int, q, window=None, scale=None, softcap=None, sinks=None, chunk=None, alibi=None
    ) -> torch.Tensor:
        """q (B, nh, T, hd) over the keys and values layer `source` kept in this forward (attend(keep=True)),
        read only -> (B, T, nh, hd)."""
        k, v = (t.to(q.device) for t in self.kept[source])
        mask = self.mask(window, chunk)
        return kernels.attention(q, k, v, mask, scale, softcap, sinks, self.attentions, alibi)

    def real_tokens(self) -> torch.Tensor | None:
        """(B, T) 1 where a new token is real, 0 where it is padding; None where every one is real. A recurrent
        layer zeroes the padding's inputs, so a left-padded row's state is its unpadded one."""
        if self.attention_mask is None:
            return None
        real = self.attention_mask.index_select(1, self.cache_position)
        return None if bool(real.all()) else real

    def state(self, layer_idx: int) -> tuple[torch.Tensor, ...] | None:
        """A recurrent layer's state after the cached tokens; None with no cache or before the first token."""
        return None if self.cache is None else self.cache.state(layer_idx)

    def keep_state(self, layer_idx: int, state: tuple[torch.Tensor, ...]) -> None:
        """A recurrent layer's state after the new tokens, kept in the cache where there is one."""
        if self.cache is not None:
            self.cache.set_state(layer_idx, state)


@dataclass
class OneToken:
    """One new token per row, written at slot seen - 1; row b's real tokens are slots starts[b] .. seen - 1
    (starts None: all of them, as for one sequence). `keys` and `values` are the cache's per-layer buffers, or
    one layer's buffers inside a compiled graph, which also gives `span`, the slots its layer attends over
    (the window, the slots since the chunk's start, or all). A chunked layer's row attends from its chunk's first
    slot: a multiple of `chunk` slots after the row's first real slot."""

    rope: Tables
    keys: list[torch.Tensor] | torch.Tensor
    values: list[torch.Tensor] | torch.Tensor
    seen: int
    span: int | None = None
    starts: torch.Tensor | None = None  # (B,) the first real slot of each row
    states: dict | None = None  # the cache's recurrent states (layer -> tuple), which recurrent layers update

    def real_tokens(self) -> None:
        """Every row's one new token is real (see Forward.real_tokens)."""
        return None

    def state(self, layer_idx: int) -> tuple[torch.Tensor, ...] | None:
        return None if self.states is None else self.states.get(layer_idx)

    def keep_state(self, layer_idx: int, state: tuple[torch.Tensor, ...]) -> None:
        if self.states is not None:
            self.states[layer_idx] = state

    def attend(
        self,
        layer_idx: int,
        q,
        k,
        v,
        window=None,
        scale=None,
        softcap=None,
        sinks=None,
        chunk=None,
        alibi=None,
        keep: bool = False,
    ) -> torch.Tensor:
        """keep: nothing to do (layers that share these keys and values read the cache's buffers)."""
        if isinstance(self.keys, list):
            keys, values = self.keys[layer_idx], self.values[layer_idx]
        else:
            keys, values = self.keys, self.values
        span, starts = self._span(window, chunk)
        return kernels.decode_attention(
            q, k, v, keys, values, self.seen, span, scale, softcap, sinks, starts, alibi
        )

    def attend_shared(
        self, source: int, q, window=None, scale=None, softcap=None, sinks=None, chunk=None, alibi=None
    ) -> torch.Tensor:
        """q (B, nh, 1, hd) over layer `source`'s cache buffers, read only (that layer wrote the new token's
        keys and values at slot seen - 1 already). Needs every layer's buffers (not one layer's graph)."""
        if not isinstance(self.keys, list):
            raise NotImplementedError("a layer sharing another layer's keys and values needs the whole cache")
        keys, values = self.keys[source], self.values[source]
        k, v = (b.narrow(2, self.seen - 1, 1).clone() for b in (keys, values))  # written back as they are
        span, starts = self._span(window, chunk)
        return kernels.decode_attention(
            q, k, v, keys, values, self.seen, span, scale, softcap, sinks, starts, alibi
        )

    def _span(self, window, chunk) -> tuple[int, torch.Tensor | None]:
        """The slots a layer with this window or chunk attends over, and each row's first real slot."""
        if isinstance(window, ReferenceWindow):
            raise NotImplementedError("the one-token step has no reference sliding window (the forward has)")
        span, starts = self.span, self.starts
        if chunk is not None:
            if starts is not None:  # rows of their own lengths: each row's chunk start masks what precedes it
                starts = starts + (self.seen - 1 - starts) // chunk * chunk
            elif span is None:
                span = (self.seen - 1) % chunk + 1
        if span is None:
            span = self.seen if window is None else min(window, self.seen)
        return span, starts


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads and transformers' module names (q_proj, k_proj, v_proj,
    o_proj, q_norm, k_norm, sinks). `norm` builds a q/k norm for a given width; `qk_norm` is "head" (per head,
    Qwen 3, Gemma 3) or "full" (over the whole projection, OLMo 2). `rope` names the RoPE table the layer
    reads (None: no RoPE); `rope_interleaved` rotates adjacent pairs (Cohere) instead of the two halves.
    `chunk`: chunked attention (Llama 4), each query seeing only the keys of its own `chunk` positions. `alibi`:
    ALiBi's slopes, one per head (BLOOM, MPT, Falcon-RW; no RoPE then), each head's scores biased by its slope
    times the key's position."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        *,
        bias: bool = False,
        o_bias: bool | None = None,
        scale: float | None = None,
        window: int | None = None,
        rope: str | None = "default",
        qk_norm: str | None = None,
        norm: Callable[[int], nn.Module] | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        rope_interleaved: bool = False,
        chunk: int | None = None,
        alibi: Sequence[float] | None = None,
    ):
        super().__init__()
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_idx,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.scaling = head_dim**-0.5 if scale is None else scale
        self.sliding_window, self.rope, self.softcap = window, rope, softcap
        self.rope_interleaved, self.chunk = rope_interleaved, chunk
        self.alibi = (
            None if alibi is None else tuple(float(x) for x in alibi)
        )  # kept in float32 whatever the dtype
        self.make_projections(hidden, bias, bias if o_bias is None else o_bias)
        if qk_norm is not None:
            full = qk_norm == "full"
            self.q_norm = norm(num_heads * head_dim if full else head_dim)
            self.k_norm = norm(num_kv_heads * head_dim if full else head_dim)
        self.qk_norm = qk_norm
        if sinks:
            self.sinks = nn.Parameter(torch.empty(num_heads))

    def make_projections(self, hidden: int, bias: bool, o_bias: bool) -> None:
        """q/k/v/o as four Linear layers; families that store q/k/v packed override this and project()."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = Linear(hidden, nh * hd, bias=bias)
        self.k_proj = Linear(hidden, nkv * hd, bias=bias)
        self.v_proj = Linear(hidden, nkv * hd, bias=bias)
        self.o_proj = Linear(nh * hd, hidden, bias=o_bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, nh * hd), k and v (B, T, n_kv * hd)."""
        q, k, v = packed(x, (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: Forward | OneToken) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, nh, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if self.rope is not None:
            cos, sin = ctx.rope[self.rope]
            q = apply_rotary(q, cos, sin, self.rope_interleaved)
            k = apply_rotary(k, cos, sin, self.rope_interleaved)
        sinks = getattr(self, "sinks", None)
        alibi = self.alibi_bias(q.device)
        y = ctx.attend(
            self.layer_idx, q, k, v, self.sliding_window, self.scaling, self.softcap, sinks, self.chunk, alibi
        )
        return self.o_proj(self.gate(x, y.reshape(B, T, nh * hd)))

    def alibi_bias(self, device: torch.device):
        """The kernels' `alibi`: the slopes in float32 (None without ALiBi); Falcon-RW's is a kernels.RowALiBi."""
        return None if self.alibi is None else torch.tensor(self.alibi, dtype=torch.float32, device=device)

    def gate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The heads' output y (B, T, heads * head_dim) before o_proj, given the layer's input x: as it is here;
        the families with a gated output (AFMoE, Laguna, LFM3) scale it by a gate computed from x."""
        return y


def default_positions(
    attention_mask: torch.Tensor | None, cache_position: torch.Tensor, B: int
) -> torch.Tensor:
    """Positions (B, T) of the new tokens: counted over real tokens when a padding mask is given."""
    if attention_mask is None:
        return cache_position.unsqueeze(0).expand(B, -1)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.index_select(1, cache_position)


def build_mask(
    window: int | None,
    attention_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    B: int,
    S: int,
    chunk: int | None = None,
    block_ids: torch.Tensor | None = None,
    reference: int | None = None,
) -> torch.Tensor | None:
    """The boolean mask (B, 1, T, S) for queries at cache_position over S key slots, causal and within the
    window (None: full attention) or the query's chunk (positions counted from each row's first real slot, after
    its left padding), or in the query's block (block_ids (B, >= S), see Forward); the first `reference` slots
    (ReferenceWindow's prefill) seen whatever the window; None where plain causal attention does (eager only)."""
    T = cache_position.shape[0]
    device = cache_position.device
    if block_ids is None and not torch.compiler.is_compiling():
        has_padding = attention_mask is not None and not bool(attention_mask[:, :S].all())
        starts_at_zero = T == S  # a prompt with no past: the causal kernel applies as is
        local = (window is None or window >= S) and (chunk is None or chunk >= S)
        if not has_padding and (starts_at_zero or T == 1) and local:
            return None
    q = cache_position[:, None]  # slot index of each query (T, 1)
    kv = torch.arange(S, device=device)[None, :]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & ((kv > q - window) | (kv < (0 if reference is None else reference)))
    allowed = allowed[None, None].expand(B, 1, T, S)
    if chunk is not None:
        pads = (
            (attention_mask[:, :S].cumsum(-1) == 0).sum(-1, keepdim=True)[:, :, None]  # (B, 1, 1)
            if attention_mask is not None
            else torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        )
        same = (q[None] - pads) // chunk == (kv[None] - pads) // chunk  # (B, T, S)
        allowed = allowed & same[:, None]
    if block_ids is not None:  # transformers' blockwise overlay: or'ed with the causal (window, chunk) mask
        keys = block_ids[:, :S].to(device)
        queries = keys.index_select(1, cache_position)[:, :, None]  # (B, T, 1)
        allowed = allowed | ((queries == keys[:, None, :]) & (queries >= 0))[:, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :S].bool()
        # A padding query would see nothing and give NaN: let it see itself (its output is never used).
        allowed = allowed | (kv == q)[None, None]
    return allowed


def pad_mask_to(attention_mask: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, n) padding mask widened with zeros to (B, S) key slots."""
    return F.pad(attention_mask, (0, S - attention_mask.shape[-1]))
