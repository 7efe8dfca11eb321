"""Attention: one entry point for a batch of queries over cached keys (`attention`) and one for a single token
of a single sequence over its cache (`decode_attention`), each with the scale, tanh soft-capping and attention
sinks some families use; PyTorch's SDPA where it is fast and exact, autolm's own kernels elsewhere."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native
from .core import needs_grad


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    weights: list | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q (B, nh, T, hd) over k, v (B, n_kv, S, hd), n_kv dividing nh; mask a boolean
    (B, 1, T, S) or None for plain causal attention; scale defaults to hd^-0.5; softcap: scores become
    softcap * tanh(scores / softcap); sinks (nh,): a learned logit per head that joins the softmax and takes
    its share of the probability; alibi (nh,): ALiBi's slopes, each head's scores biased by its slope times the
    key's slot counted back from the last one (see `_alibi`), in float32, or a RowALiBi. Returns (B, T, nh, hd), the layout o_proj reads. With a `weights` list the eager path runs and
    appends its probabilities (B, nh, T, S)."""
    _, nh, T, hd = q.shape
    scale = hd**-0.5 if scale is None else scale
    if weights is not None or softcap is not None or sinks is not None or alibi is not None:
        return eager_attention(q, k, v, mask, scale, softcap, sinks, weights, alibi)
    shared = mask is None or mask.shape[1] == 1  # one mask for every head (else per-head: SDPA below)
    if T == 1 and mask is not None and shared:
        return grouped_attention(q, k, v, mask, scale)
    if T > 1 and shared and q.dtype is torch.bfloat16 and q.device.type == "cpu" and not needs_grad(q, k, v):
        return blocked_attention(q, k, v, mask, scale)
    # grouped heads as transformers' SDPA path: SDPA's own GQA without a mask, K and V repeated with one (the same
    # values either way; under autocast the two round the K/V gradients apart, so each follows transformers)
    gqa = k.shape[1] != nh and mask is None and hd <= 256
    if k.shape[1] != nh and not gqa:
        k, v = k.repeat_interleave(nh // k.shape[1], dim=1), v.repeat_interleave(nh // k.shape[1], dim=1)
    causal = mask is None and T > 1
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)


def eager_attention(
    q, k, v, mask, scale: float, softcap=None, sinks=None, weights: list | None = None, alibi=None
):
    """softmax(q k^T * scale (soft-capped) (+ ALiBi's bias) + mask (+ sink)) v written out, as transformers' eager
    attention; appends the probabilities to `weights` when given."""
    nh, T, S = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != nh:
        k, v = k.repeat_interleave(nh // k.shape[1], dim=1), v.repeat_interleave(nh // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:  # in float32: bf16 would round large biases
        # each row's first real slot: the first key its last query sees
        starts = None if mask is None else mask[:, 0, -1].int().argmax(-1)
        scores = scores.float() + _alibi(alibi, torch.arange(S, device=q.device), S - 1, starts)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    if sinks is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(scores.shape[0], -1, T, 1)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.amax(dim=-1, keepdim=True)
        probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(q.dtype)
    if weights is not None:
        weights.append(probs)
    return (probs @ v).transpose(1, 2)


def alibi_bias(slopes: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """ALiBi's bias (nh, 1, W) in float32: each head's slope times each key's slot."""
    return slopes.float()[:, None, None] * slots.float()


class RowALiBi(NamedTuple):
    """ALiBi as transformers' Falcon (Falcon-RW) computes it, passed as `alibi` in place of the slopes: a key at
    position p of its row (counted from the row's first real token) adds bf16(bf16(slope) * p) / divisor to each
    head's scaled scores, the product rounded to bfloat16 whatever the model's dtype."""

    slopes: torch.Tensor  # (nh,) float32
    divisor: float  # sqrt(head_dim)

    def bias(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (B, W) int64 -> the bias (B, nh, 1, W) in float32."""
        rounded = (
            self.slopes.bfloat16()[None, :, None] * positions[:, None, :]
        )  # a bf16 product, as transformers'
        return (rounded.float() / self.divisor)[:, :, None, :]


def _alibi(alibi, slots: torch.Tensor, last: int, starts: torch.Tensor | None) -> torch.Tensor:
    """ALiBi's bias over the key slots `slots` (W,) for queries whose newest key is slot `last`: slopes times the
    slots counted back from `last` (nh, 1, W) (softmax does not see a row's constant: the same as positions
    counted from the row's first real token); a RowALiBi's from each row's own positions (B, nh, 1, W), row b's
    real slots starting at starts[b] (None: at 0)."""
    if isinstance(alibi, RowALiBi):
        positions = slots[None, :] - (0 if starts is None else starts[:, None])
        return alibi.bias(positions.clamp(min=0))
    return alibi_bias(alibi, slots - last)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row (q (B, nh, 1, hd)) over k, v (B, n_kv, S, hd) under a boolean mask (B, 1, 1, S):
    each group of query heads against its KV head without repeating K and V; softmax in fp32.
    Returns (B, 1, nh, hd)."""
    B, nh, _, hd = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, nh // n_kv, hd)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, n_kv, group, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1).to(v.dtype) @ v  # (B, n_kv, group, hd)
    return y.reshape(B, 1, nh, hd)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    block: int = 128,
) -> torch.Tensor:
    """Attention of T queries (q (B, nh, T, hd)) over S = past + T keys (k, v (B, n_kv, S, hd)) in
    blocks of `block` queries, each against only the keys it can see; mask is a boolean (B, 1, T, S)
    or None for plain causal. Each group of query heads meets its KV head in one matmul, without
    repeating K and V. The arithmetic is transformers' eager attention (scores in the model's dtype,
    scaled after the matmul; softmax in fp32). Used for bf16 inference on CPU: there it runs 2.5-2.8x
    faster than PyTorch's flash attention for 128-4096 tokens, as the matmuls are whole-block oneDNN calls."""
    B, nh, T, hd = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    group, past = nh // n_kv, S - T
    q = q.view(B, n_kv, group, T, hd)
    out = q.new_empty(B, T, n_kv, group, hd)  # the layout o_proj reads: the final transpose is a view
    for start in range(0, T, block):
        stop = min(start + block, T)
        n, keys = stop - start, past + stop  # queries in this block; keys the last of them can see
        scores = q[:, :, :, start:stop].reshape(B, n_kv, group * n, hd) @ k[:, :, :keys].transpose(-1, -2)
        scores = scores.view(B, n_kv, group, n, keys).mul_(scale)
        if mask is None:  # only the block's own keys need the causal triangle
            causal = torch.full((n, n), float("-inf"), dtype=scores.dtype, device=q.device).triu(1)
            scores[..., past + start :].add_(causal)
        else:
            scores.masked_fill_(~mask[:, None, :, start:stop, :keys], float("-inf"))
        probs = scores.softmax(-1).view(B, n_kv, group * n, keys)
        out[:, start:stop] = (probs @ v[:, :, :keys]).view(B, n_kv, group, n, hd).permute(0, 3, 1, 2, 4)
    return out.view(B, T, nh, hd)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    seen,
    span,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row: write its k, v (B, n_kv, 1, hd) into the cache buffers keys, values
    (B, n_kv, capacity, hd) at slot seen - 1, then attend with q (B, nh, 1, hd) over the last `span` of the
    `seen` slots; row b's slots before starts[b] are padding (starts None: none are). In fp32 whatever the
    model's dtype: PyTorch's bf16 batched matmuls on the CPU cost milliseconds whenever the length changes.
    On the CPU autolm's C++ kernel (native.py, cpu_ops.cpp) where it is built, eagerly and inside the compiled
    step's graphs (an op they call): one call for what is a dozen ops here, each key and value read once for the
    query heads that share it. Otherwise, inside a compiler, the same arithmetic as products and sums, which fuse
    into loops over the cache (inductor would otherwise match them to its SDPA kernel, which does not take these
    strided views). alibi (nh,): ALiBi's slopes, as in `attention` (the Python arithmetic; not the C++ kernel).
    Returns (B, 1, nh, hd)."""
    B, nh, _, hd = q.shape
    n_kv = keys.shape[1]
    scale = hd**-0.5 if scale is None else scale
    first = seen - span
    keys.narrow(2, seen - 1, 1).copy_(k)
    values.narrow(2, seen - 1, 1).copy_(v)
    if alibi is None and _native(q, keys):
        return native.decode_attention(q, keys, values, first, span, scale, softcap, sinks, starts)
    qg = q.float().view(B, n_kv, nh // n_kv, hd) * scale
    kk = keys.narrow(2, first, span).float()  # (B, n_kv, W, hd)
    vv = values.narrow(2, first, span).float()
    if torch.compiler.is_compiling():
        scores = (qg.unsqueeze(3) * kk.unsqueeze(2)).sum(-1)  # (B, n_kv, group, W)
    else:
        scores = torch.matmul(qg, kk.transpose(-1, -2))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if alibi is not None:
        slots = torch.arange(span, device=scores.device) + first
        scores = scores + _alibi(alibi, slots, seen - 1, starts).view(-1, n_kv, nh // n_kv, span)
    if starts is not None:  # each row's padding slots, as a -inf bias (W slots from `first`)
        slots = torch.arange(span, device=scores.device) + first
        scores = scores.masked_fill((slots[None, :] < starts[:, None])[:, None, None, :], float("-inf"))
    probs = _softmax(scores, None if sinks is None else sinks.float().view(1, n_kv, nh // n_kv, 1))
    if torch.compiler.is_compiling():
        out = (probs.unsqueeze(-1) * vv.unsqueeze(2)).sum(-2)  # (B, n_kv, group, hd)
    else:
        out = torch.matmul(probs, vv)
    return out.view(B, 1, nh, hd).to(q.dtype)


def _native(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether autolm's C++ kernel takes this one-token attention: on the CPU outside autograd and autocast
    (eagerly, or traced into a graph), each cache slot's values contiguous, where the library is built."""
    cpu = q.device.type == "cpu" and not needs_grad(q) and not torch.is_autocast_enabled("cpu")
    return cpu and keys.stride(-1) == 1 and native.ready()


def _softmax(scores: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """softmax over the last dimension, with a sink logit joining the normalisation where given."""
    if sink is None and not torch.compiler.is_compiling():
        return torch.softmax(scores, -1)
    top = scores.amax(-1, keepdim=True)
    if sink is not None:
        top = torch.maximum(top, sink)
    probs = (scores - top).exp()
    total = probs.sum(-1, keepdim=True)
    if sink is not None:
        total = total + (sink - top).exp()
    return probs / total
