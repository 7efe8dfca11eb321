"""BLT's parts (models/blt.py): the hash n-gram byte embeddings, the entropy patcher and the patch boundaries it
draws, the local encoder (bytes -> patches by max-pooling and cross attention), the global transformer over patches
and the local decoder (bytes cross-attending to their patches), as transformers' modeling_blt computes them.

Every attention here is transformers' eager attention under an additive mask of 0 / the dtype's minimum: a query
that may see no key (a left-padding byte, an empty patch) then attends uniformly to every key, as transformers'
does. BLT's padding leaks (the patcher and the global transformer see no padding mask, a patch max-pools over its
bytes whatever they are), so these rows' values reach the real ones and must be transformers'."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import Attention, GatedMLP, Linear, RMSNorm, Rotary, embedding
from .llama import LlamaDecoderLayer

# transformers' primes for the hash functions, cycled through
PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
          2860486313, 5463458053, 3367900313)  # fmt: skip


def eager(q, k, v, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """transformers' eager_attention_forward: q (B, nh, T, hd), k, v (B, n_kv, S, hd), an additive mask
    (B, 1, T, S) -> (B, T, nh, hd)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask -> 0 where allowed, the dtype's minimum elsewhere (transformers' eager masks)."""
    return torch.zeros((), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).to(allowed.device)


def causal_mask(T: int, window: int | None, attention_mask, dtype, device) -> torch.Tensor:
    """(B or 1, 1, T, T) causal (within `window`) over the padding mask's real keys, additive."""
    q = torch.arange(T, device=device)[:, None]
    kv = torch.arange(T, device=device)[None, :]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & (kv > q - window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :T].bool()
    return additive(allowed, dtype)


class EagerContext:
    """The forward context autolm's Attention reads: RoPE tables and one mask, no cache."""

    def __init__(self, rope, mask: torch.Tensor | None):
        self.rope, self._mask = rope, mask

    def attend(self, layer_idx, q, k, v, window=None, scale=None, *rest, **kw) -> torch.Tensor:
        return eager(q, k, v, self._mask, scale)


class BltTransformerLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer; RoPE over interleaved pairs, head_dim hidden_size // num_attention_heads."""

    def __init__(self, part, layer_idx: int):
        nn.Module.__init__(self)
        h, eps, hd = part.hidden_size, part.rms_norm_eps, part.hidden_size // part.num_attention_heads
        self.self_attn = Attention(h, part.num_attention_heads, part.num_key_value_heads, hd, layer_idx,
                                   rope_interleaved=True)  # fmt: skip
        self.mlp = GatedMLP(h, part.intermediate_size, part.hidden_act)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)


class Stack(nn.Module):
    """A part's layers and its RoPE tables (not a module: no weights)."""

    def __init__(self, part):
        super().__init__()
        self.part = part
        self.layers = nn.ModuleList(BltTransformerLayer(part, i) for i in range(part.num_hidden_layers))
        self.rotary = Rotary({"default": part.rope_parameters}, part.hidden_size // part.num_attention_heads,
                             part.max_position_embeddings)  # fmt: skip

    def context(self, x: torch.Tensor, position_ids: torch.Tensor, mask) -> EagerContext:
        return EagerContext(self.rotary.tables(position_ids, x.dtype), mask)


class BltCrossAttention(nn.Module):
    """Queries (q_norm'd, then projected) over keys and values of k_norm'd states, no RoPE; the queries' input
    added to the output."""

    def __init__(self, part):
        super().__init__()
        h, nh, nkv = part.hidden_size, part.num_attention_heads, part.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, h // nh
        self.q_proj = Linear(h, nh * self.head_dim, bias=False)
        self.k_proj = Linear(h, nkv * self.head_dim, bias=False)
        self.v_proj = Linear(h, nkv * self.head_dim, bias=False)
        self.o_proj = Linear(nh * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(h, part.rms_norm_eps)
        self.k_norm = RMSNorm(h, part.rms_norm_eps)

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(self.q_norm(x)).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.k_norm(states)
        k = self.k_proj(kv).view(B, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(B, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        y = eager(q, k, v, mask, self.head_dim**-0.5).reshape(B, T, -1)
        return self.o_proj(y) + x


def cross_layers(part) -> nn.ModuleList:
    return nn.ModuleList(
        BltCrossAttention(part) for _ in range(part.num_hidden_layers if part.cross_attn_all_layers else 1)
    )


class BltLocalEncoder(Stack):
    """Byte layers; after the last (or each, cross_attn_all_layers) the bytes are max-pooled into their patches,
    projected to cross_attn_k vectors a patch, which cross-attend to their own bytes."""

    def __init__(self, part):
        super().__init__(part)
        h = part.hidden_size
        self.patch_embedding_projection = Linear(h, h * part.cross_attn_k, bias=False)
        self.embed_tokens = embedding(part.vocab_size, h)
        self.cross_attn_layers = cross_layers(part)

    def forward(self, x, position_ids, mask, cross_mask, num_patches: int, patch_ids):
        B, k, every = x.shape[0], self.part.cross_attn_k, self.part.cross_attn_all_layers
        ctx, patches = self.context(x, position_ids, mask), None
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx)
            if i == len(self.layers) - 1 or every:
                pooled = torch.zeros(
                    B, num_patches, x.shape[-1], dtype=x.dtype, device=x.device
                ).scatter_reduce(
                    1, patch_ids[..., None].expand(-1, -1, x.shape[-1]), x, reduce="amax", include_self=False
                )
                patches = self.patch_embedding_projection(pooled).reshape(B, num_patches * k, -1)
                patches = patches + self.cross_attn_layers[i if every else 0](patches, x, cross_mask)
        return x, patches


class BltGlobalTransformer(Stack):
    """Causal layers over the patches (no final norm), after a projection where the encoder's patch width
    (encoder hidden_size * cross_attn_k) is not the global hidden_size."""

    def __init__(self, part):
        super().__init__(part)
        width = part.encoder_cross_output_size
        self.token_embedding_projection = (
            Linear(width, part.hidden_size, bias=False) if width is not None else nn.Identity()
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding_projection(patches)
        B, P = x.shape[:2]
        pos = torch.arange(P, device=x.device)[None].expand(B, -1)
        ctx = self.context(x, pos, causal_mask(P, None, None, x.dtype, x.device))
        for layer in self.layers:
            x = layer(x, ctx)
        return x


class BltLocalDecoder(Stack):
    """Byte layers, each (or the first) after a cross attention to the global transformer's patches, then a norm."""

    def __init__(self, part):
        super().__init__(part)
        h = part.hidden_size
        self.patch_embedding_projection = Linear(part.hidden_size_global, h * part.cross_attn_k, bias=False)
        self.norm = RMSNorm(h, part.rms_norm_eps)
        self.cross_attn_layers = cross_layers(part)

    def forward(self, x, patches, position_ids, mask, cross_mask) -> torch.Tensor:
        B = x.shape[0]
        patches = self.patch_embedding_projection(patches).reshape(B, -1, self.part.hidden_size)
        ctx = self.context(x, position_ids, mask)
        for i, layer in enumerate(self.layers):
            if i == 0 or self.part.cross_attn_all_layers:
                x = x + self.cross_attn_layers[i](x, patches, cross_mask)
            x = layer(x, ctx)
        return self.norm(x)


class BltPatcher(Stack):
    """A small causal byte LM (no padding mask, positions from 0): its next-byte entropies place the patches."""

    def __init__(self, part):
        super().__init__(part)
        self.embed_tokens = embedding(part.vocab_size, part.hidden_size)
        self.norm = RMSNorm(part.hidden_size, part.rms_norm_eps)
        self.lm_head = Linear(part.hidden_size, part.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each byte's next-byte entropy (B, T)."""
        x = self.embed_tokens(input_ids)
        B, T = input_ids.shape
        pos = torch.arange(T, device=x.device)[None].expand(B, -1)
        ctx = self.context(x, pos, causal_mask(T, self.part.sliding_window, None, x.dtype, x.device))
        for layer in self.layers:
            x = layer(x, ctx)
        logits = self.lm_head(self.norm(x))
        return torch.distributions.Categorical(logits=logits).entropy()


def lengths_from_entropies(entropies: torch.Tensor, T: int, threshold: float) -> torch.Tensor:
    """transformers' patch_lengths_from_entropies: patches start at bytes 0 and 1 and after each byte (past the
    first) whose entropy exceeds the threshold; rows padded with empty patches to the longest count."""
    B = entropies.shape[0]
    init = torch.tensor([0, 1], dtype=torch.long, device=entropies.device)[None].repeat(B, 1)
    above = entropies[:, 1:] > threshold
    n = above.shape[1]
    idx = torch.arange(n, device=entropies.device)[None].expand(B, -1)
    padded = torch.cat([idx, torch.full_like(idx, n)], dim=1)
    starts = padded[torch.cat([above, ~above], dim=1)].reshape(B, n)[:, : above.sum(dim=1).max()]
    starts = torch.cat((init, starts + 2), dim=1)
    ends = torch.cat((starts[:, 1:] - 1, torch.full_like(starts[:, :1], T - 1)), dim=1)
    return ends - starts + 1


def split_long(lengths: torch.Tensor, max_len: int | None) -> torch.Tensor:
    """transformers' process_patch_lengths: patches longer than max_len split into max_len pieces (and the rest),
    rows packed to the left and padded with zeros to the longest."""
    if max_len is None:
        return lengths
    B = lengths.shape[0]
    positive = lengths > 0
    full = torch.where(positive, lengths // max_len, 0)
    rest = torch.where(positive, lengths % max_len, 0)
    counts = full + (rest > 0).to(full.dtype)
    most = int(counts.max().item())
    if most == 0:
        return torch.zeros((B, 0), dtype=lengths.dtype, device=lengths.device)
    seg = torch.arange(most, dtype=lengths.dtype, device=lengths.device)
    pieces = torch.where(seg < full[..., None], torch.full_like(seg, max_len), torch.zeros_like(seg))
    pieces = torch.where((seg == full[..., None]) & (rest[..., None] > 0), rest[..., None], pieces).reshape(
        B, -1
    )
    keep = torch.arange(pieces.shape[1], device=lengths.device) < counts.sum(dim=1)[:, None]
    packed = torch.zeros_like(pieces)
    packed.masked_scatter_(keep, pieces[pieces > 0])
    return packed[:, : int(counts.sum(dim=1).max().item())]


def patch_ids_of(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) the patch each byte falls in, for patch lengths (B, P)."""
    starts = torch.cat([torch.zeros_like(lengths[:, :1]), lengths.cumsum(dim=-1)[:, :-1]], dim=-1)
    return (starts[:, None] <= torch.arange(T, device=lengths.device)[None, :, None]).sum(dim=-1) - 1


def cross_mask(patch_ids: torch.Tensor, P: int, k: int, patches_as_queries: bool, dtype) -> torch.Tensor:
    """transformers' _prepare_patch_cross_attention_mask: a patch's k vectors and its bytes see each other only
    (B, 1, queries, keys), additive."""
    ids = torch.arange(P, device=patch_ids.device)
    if patches_as_queries:
        same = (ids[None, :, None] == patch_ids[:, None, :]).repeat_interleave(k, dim=1)
    else:
        same = (patch_ids[:, :, None] == ids[None, None, :]).repeat_interleave(k, dim=-1)
    return additive(same[:, None], dtype)


def hash_embeddings(
    input_ids: torch.Tensor, bytes_emb: nn.Module, hash_emb: nn.Module, config
) -> torch.Tensor:
    """Byte embeddings plus, per hash function and n-gram size n, the embedding of the hash of the n bytes ending
    at each byte (zeros before the first): sum(b_i * prime^i) mod encoder_hash_byte_group_vocab, each (function,
    n) its own slice of the one hash table (int64 arithmetic wrapping around, as transformers')."""
    x = bytes_emb(input_ids)
    vocab, slot = config.encoder_hash_byte_group_vocab, 0
    for f in range(config.encoder_hash_byte_group_nb_functions):
        prime = torch.tensor(PRIMES[f % len(PRIMES)], dtype=torch.int64, device=input_ids.device)
        for n in config.encoder_hash_byte_group_size:
            pad = torch.zeros(input_ids.shape[0], n - 1, dtype=torch.int64, device=input_ids.device)
            windows = torch.cat([pad, input_ids], dim=1).unfold(1, n, 1)
            hashes = torch.sum(windows * prime ** torch.arange(n, device=input_ids.device), dim=-1) % vocab
            x = x + hash_emb(hashes + slot * vocab)
            slot += 1
    return x
