"""XLNet (transformers' XLNetLMHeadModel): post-LN layers of two-stream relative attention (per-head parameters
q, k, v, o, r of shape (d_model, n_head, d_head); content, position (`r_r_bias`, sinusoidal relative encodings
shifted into place) and segment (`r_s_bias`, `seg_embed`) scores) and a feed-forward (layer_1 -> ff_activation ->
layer_2) each normed over the residual sum; `lm_loss` (biased, tied to the word embeddings).

The forward computes what transformers' does, in its (length, batch) layout and order:
- `attn_type` "bi" (the default): every token attends every key not masked; "uni": causal (`same_length` also
  limits the past); attention_mask (or its negation `input_mask`) masks padded keys (a query always sees its own
  slot); `perm_mask` (B, T, T) and `target_mapping` (B, M, T) as transformers takes them: with target_mapping the
  query stream (`mask_emb`) runs too and the logits are its M targets';
- no absolute positions: relative encodings over klen (`clamp_len`, `bi_data`: forward and backward halves of the
  batch), so left padding shifts a row's distances as in transformers;
- `mems` (a tuple of each layer's input states) extend the keys; with use_mems (`use_mems_eval` by default) the
  output's `mems` hold the last `mem_len` (all where null; the first `reuse_len` new ones where set) states.

generate() does what transformers' generate does (its prepare_inputs_for_generation): a dummy token 0 appended
that no query sees (perm_mask) and that the query stream predicts (target_mapping); after the first step, the
last two tokens and the dummy again over the mems less their last two states (the whole sequence again where
use_mems_eval is false); no attention_mask (transformers drops it). An `XLNetState` stands in for the KV cache;
beam search and speculative decoding are refused by name. There is no KV cache, one-token or compiled step, and
no `past_key_values` in the forward (pass `mems`); position_ids are accepted and ignored, as transformers'
forward ignores them; output_attentions is refused. transformers' "uni" attention fails with a padding or
permutation mask over more than one row (its in-place mask sum cannot broadcast): autolm computes such a batch's
rows as transformers computes each row alone. llama.cpp has no XLNet: no GGUF.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import GenerationError
from ..nn import ACTIVATIONS, CheckpointRules, Linear, Rename, embedding, transformers_state_dict
from .base import CausalLM, DecoderModel
from .output import CausalLMOutput
from .xlm import XLMSequence
from .xlnet_config import XLNetConfig


def _rel_shift(x: torch.Tensor, klen: int) -> torch.Tensor:
    """transformers' rel_shift_bnij: (b, n, i, R) scores over relative encodings -> (b, n, i, klen) per key."""
    b, n, i, r = x.shape
    x = x.reshape(b, n, r, i)[:, :, 1:, :].reshape(b, n, i, r - 1)
    return x[..., :klen]


class XLNetRelativeAttention(nn.Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        d, n, dh = config.hidden_size, config.num_attention_heads, config.head_dim
        self.scale = 1 / dh**0.5
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.zeros(d, n, dh)))
        for name in ("r_r_bias", "r_s_bias", "r_w_bias"):
            setattr(self, name, nn.Parameter(torch.zeros(n, dh)))
        self.seg_embed = nn.Parameter(torch.zeros(2, n, dh))
        self.layer_norm = nn.LayerNorm(d, eps=config.rms_norm_eps)

    def core(self, q, k, v, kr, seg_mat, mask) -> torch.Tensor:
        """transformers' rel_attn_core: q (i, b, n, d) over k, v (j, b, n, d); kr (R, b, n, d); mask (i, j, b, 1)."""
        ac = torch.einsum("ibnd,jbnd->bnij", q + self.r_w_bias, k)
        bd = _rel_shift(torch.einsum("ibnd,jbnd->bnij", q + self.r_r_bias, kr), ac.shape[3])
        ef = 0
        if seg_mat is not None:
            ef = torch.einsum("ibnd,snd->ibns", q + self.r_s_bias, self.seg_embed)
            ef = torch.einsum("ijbs,ibns->bnij", seg_mat, ef)
        score = (ac + bd + ef) * self.scale
        if mask is not None:
            big = 65500 if mask.dtype == torch.float16 else 1e30
            score = score - big * torch.einsum("ijbn->bnij", mask)
        return torch.einsum("bnij,jbnd->ibnd", torch.softmax(score, dim=3), v)

    def post(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(torch.einsum("ibnd,hnd->ibh", vec, self.o) + x)

    def forward(self, h, g, mask_h, mask_g, r, seg_mat, mem, target_mapping):
        cat = torch.cat([mem, h], 0) if mem is not None and mem.dim() > 1 else h
        k, v = torch.einsum("ibh,hnd->ibnd", cat, self.k), torch.einsum("ibh,hnd->ibnd", cat, self.v)
        kr = torch.einsum("ibh,hnd->ibnd", r.type(self.r.dtype), self.r)
        out_h = self.post(h, self.core(torch.einsum("ibh,hnd->ibnd", h, self.q), k, v, kr, seg_mat, mask_h))
        if g is None:
            return out_h, None
        qg = torch.einsum("ibh,hnd->ibnd", g, self.q)
        if target_mapping is not None:
            qg = torch.einsum("mbnd,mlb->lbnd", qg, target_mapping)
        vec = self.core(qg, k, v, kr, seg_mat, mask_g)
        if target_mapping is not None:
            vec = torch.einsum("lbnd,mlb->mbnd", vec, target_mapping)
        return out_h, self.post(g, vec)


class XLNetFeedForward(nn.Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layer_1 = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.layer_2 = Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.layer_2(self.act(self.layer_1(x))) + x)


class XLNetLayer(nn.Module):
    def __init__(self, config: XLNetConfig, layer_idx: int):
        super().__init__()
        self.rel_attn = XLNetRelativeAttention(config)
        self.ff = XLNetFeedForward(config)

    def forward(self, h, g, *args):
        h, g = self.rel_attn(h, g, *args)
        return self.ff(h), None if g is None else self.ff(g)


class XLNetModel(DecoderModel):
    """transformers' XLNetModel: word_embedding (autolm's embed_tokens), mask_emb, layer (autolm's layers)."""

    _ALIASES: ClassVar[dict[str, str]] = {"embed_tokens": "word_embedding", "layers": "layer"}

    def __init__(self, config: XLNetConfig):
        nn.Module.__init__(self)
        self.config = config
        self.word_embedding = embedding(config.vocab_size, config.hidden_size)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layer = nn.ModuleList(XLNetLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = None
        self.gradient_checkpointing = False

    def masks(self, qlen: int, mlen: int, bsz: int, input_mask, perm_mask, dtype, device):
        """transformers' (content stream's, query stream's) float masks (i, j, b, 1), 1 where masked; or Nones."""
        attn_mask = None
        if self.config.attn_type == "uni":
            attn_mask = torch.ones((qlen, qlen + mlen), device=device)
            low = attn_mask[:, :qlen].tril(-1) if self.config.same_length else None
            attn_mask.triu_(mlen + 1)
            if low is not None:
                attn_mask[:, :qlen] += low
            attn_mask = attn_mask[:, :, None, None]
        data = None if input_mask is None else input_mask[None]
        if perm_mask is not None:
            data = perm_mask if data is None else data + perm_mask
        if data is not None:
            if mlen > 0:  # all mems can be attended to
                data = torch.cat(
                    [torch.zeros([data.shape[0], mlen, bsz], device=device, dtype=data.dtype), data], 1
                )
            attn_mask = data[:, :, :, None] if attn_mask is None else attn_mask + data[:, :, :, None]
        if attn_mask is None:
            return None, None
        attn_mask = (attn_mask > 0).to(dtype)
        eye = -torch.eye(qlen, device=device, dtype=dtype)
        if mlen > 0:
            eye = torch.cat([torch.zeros([qlen, mlen], device=device, dtype=dtype), eye], dim=-1)
        return ((attn_mask + eye[:, :, None, None]) > 0).to(attn_mask), attn_mask

    def relative_encoding(self, qlen: int, klen: int, bsz: int, device) -> torch.Tensor:
        """transformers' relative_positional_encoding: sinusoids of klen .. -qlen (bi) or klen .. 0 (uni)."""
        d = self.config.hidden_size
        inv_freq = 1 / torch.pow(10000, torch.arange(0, d, 2.0, dtype=torch.int64, device=device).float() / d)
        beg, end = klen, (-qlen if self.config.attn_type == "bi" else -1)
        clamp = self.config.clamp_len

        def sinusoids(seq: torch.Tensor, rows: int) -> torch.Tensor:
            seq = seq.clamp(-clamp, clamp) if clamp > 0 else seq
            x = seq[:, None] * inv_freq
            return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)[:, None, :].expand(-1, rows, -1)

        fwd = torch.arange(beg, end, -1.0, dtype=torch.int64, device=device).float()
        if not self.config.bi_data:
            return sinusoids(fwd, bsz)
        bwd = torch.arange(-beg, -end, 1.0, dtype=torch.int64, device=device).float()
        return torch.cat([sinusoids(fwd, bsz // 2), sinusoids(bwd, bsz // 2)], dim=1)

    def cache_mem(self, out: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        reuse, mem_len = self.config.reuse_len, self.config.mem_len
        out = out[:reuse] if reuse is not None and reuse > 0 else out
        cutoff = 0 if not mem_len else -mem_len
        return (out if prev is None else torch.cat([prev, out], dim=0))[cutoff:].detach()

    def forward(self, x, input_mask, mems, perm_mask, target_mapping, token_type_ids, use_mems, hidden=None):
        """x: input vectors (B, T, h); the rest as transformers' XLNetModel.forward takes them (batch first).
        (last states (B, T or M, h), new mems or None)."""
        h = x.transpose(0, 1)
        qlen, bsz = h.shape[:2]
        t = [None if a is None else a.transpose(0, 1) for a in (input_mask, token_type_ids)]
        input_mask, token_type_ids = t
        perm_mask = None if perm_mask is None else perm_mask.permute(1, 2, 0)
        target_mapping = None if target_mapping is None else target_mapping.permute(1, 2, 0)
        mlen = mems[0].shape[0] if mems is not None and mems[0] is not None else 0
        mask_h, mask_g = self.masks(qlen, mlen, bsz, input_mask, perm_mask, x.dtype, x.device)
        g = None if target_mapping is None else self.mask_emb.expand(target_mapping.shape[0], bsz, -1)
        seg_mat = None
        if token_type_ids is not None:
            cat = token_type_ids
            if mlen > 0:
                cat = torch.cat(
                    [torch.zeros([mlen, bsz], dtype=torch.long, device=x.device), token_type_ids], 0
                )
            seg_mat = nn.functional.one_hot((token_type_ids[:, None] != cat[None, :]).long(), 2).to(x.dtype)
        r = self.relative_encoding(qlen, mlen + qlen, bsz, x.device)
        new_mems, mems = (), mems if mems is not None else [None] * len(self.layer)
        for i, layer in enumerate(self.layer):
            if use_mems:
                new_mems += (self.cache_mem(h, mems[i]),)
            if hidden is not None:
                hidden.append(h.transpose(0, 1))
            h, g = layer(h, g, mask_h, mask_g, r, seg_mat, mems[i], target_mapping)
        out = (g if g is not None else h).transpose(0, 1)
        if hidden is not None:
            hidden.append(out)
        return out, (new_mems if use_mems else None)


class XLNetState(XLMSequence):
    """generate()'s state in place of a KV cache: the sequence so far and the mems of the last step."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size)
        self.mems: tuple | None = None


_RULES = CheckpointRules([Rename(r"^lm_loss\.", "lm_head.", r"^lm_head\.", "lm_loss.")])


class XLNetLMHeadModel(CausalLM):
    """transformers' XLNetLMHeadModel: the body `transformer`, the head lm_loss (autolm's lm_head)."""

    config_class = XLNetConfig
    base_model_prefix = "transformer"
    layers_prefix = "transformer.layer"
    embeddings_name = "transformer.word_embedding"
    checkpoint_rules = _RULES
    one_token_step: ClassVar[bool] = False
    unservable: ClassVar[str] = (
        "its generation reruns the last tokens over its mems at each token (no KV cache)"
    )
    tp_patterns: ClassVar[dict[str, str]] = {}  # none: transformers declares no tensor-parallel plan

    def __init__(self, config: XLNetConfig):
        super().__init__(config, XLNetModel(config))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=True)
        transformers_state_dict(self)  # state_dict() in transformers' names

    @property
    def model(self) -> XLNetModel:
        return self.transformer

    def adapter_key(self, key: str) -> str:
        return self.checkpoint_rules._back(key)

    def blocks(self) -> list[str]:
        return ["transformer.word_embedding", *(f"transformer.layer.{i}" for i in range(len(self.model.layer))),
                "lm_head"]  # fmt: skip

    def forward(self, input_ids=None, attention_mask=None, mems=None, perm_mask=None, target_mapping=None,
                token_type_ids=None, input_mask=None, inputs_embeds=None, use_mems=None, labels=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, past_key_values=None, **kwargs):  # fmt: skip
        """transformers' forward (see the module's doc); past_key_values: generate()'s XLNetState only."""
        if isinstance(past_key_values, XLNetState):
            return self._generation_step(input_ids, past_key_values, output_hidden_states)
        if past_key_values is not None:
            raise GenerationError("XLNetLMHeadModel.forward: past_key_values is not supported (XLNet's relative "
                                  "attention keeps `mems`: pass mems)")  # fmt: skip
        if kwargs.get("output_attentions"):
            raise GenerationError("XLNetLMHeadModel.forward: output_attentions is not supported by autolm")
        kwargs.pop(
            "position_ids", None
        )  # accepted and ignored, as transformers' (no positions: relative ones)
        if input_ids is not None and inputs_embeds is not None:
            raise GenerationError("XLNetLMHeadModel.forward: give input_ids or inputs_embeds, not both")
        if input_mask is not None and attention_mask is not None:
            raise GenerationError("XLNetLMHeadModel.forward: give attention_mask or input_mask, not both")
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.bi_data and len(x) % 2:
            raise GenerationError(f"XLNetLMHeadModel.forward: the config's bi_data splits the batch in halves (forward "
                                  f"and backward encodings): give an even number of rows, not {len(x)}")  # fmt: skip
        if input_mask is None and attention_mask is not None:
            input_mask = 1.0 - attention_mask.to(x.dtype)
        if use_mems is None:
            use_mems = self.config.use_mems_train if self.training else self.config.use_mems_eval
        hidden = (
            []
            if (self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
            else None
        )
        out, new_mems = self.model(
            x, input_mask, mems, perm_mask, target_mapping, token_type_ids, use_mems, hidden
        )
        logits = self.lm_head(out[:, -logits_to_keep:] if logits_to_keep else out)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
            )
        result = CausalLMOutput(loss, logits, None, None if hidden is None else tuple(hidden), None)
        result.mems = new_mems
        return (
            result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()
        )

    def _generation_step(self, input_ids, state: XLNetState, output_hidden_states=None):
        """transformers' prepare_inputs_for_generation and forward for one step (see the module's doc)."""
        if input_ids is None:
            raise GenerationError("XLNet's generation needs input_ids (inputs_embeds are not taken)")
        state.ids = (
            input_ids if state.ids is None else torch.cat([state.ids, input_ids.to(state.ids.device)], 1)
        )
        ids, mems = state.ids, None
        if state.mems:
            ids, mems = ids[:, -2:], tuple(m[:-2] for m in state.mems)
        ids = torch.cat([ids, ids.new_zeros(len(ids), 1)], 1)
        B, L = ids.shape
        perm = torch.zeros(B, L, L, device=ids.device)
        perm[:, :, -1] = 1.0
        target = torch.zeros(B, 1, L, device=ids.device)
        target[:, 0, -1] = 1.0
        out = self(
            ids, mems=mems, perm_mask=perm, target_mapping=target, output_hidden_states=output_hidden_states
        )
        state.mems = out.mems
        return CausalLMOutput(None, out.logits, state, out.hidden_states, None)

    def make_cache(self, batch_size: int, capacity: int) -> XLNetState:
        """generate()'s state (see the module's doc)."""
        return XLNetState(batch_size)

    def generate(self, *args, **kwargs):
        """GenerationMixin's, as transformers' XLNet generates (see the module's doc)."""
        if (kwargs.get("num_beams") or 1) > 1:
            raise GenerationError("XLNetLMHeadModel.generate: num_beams > 1 is not supported (autolm's beam "
                                  "search keeps a KV cache; XLNet keeps mems)")  # fmt: skip
        for key in ("assistant_model", "prompt_lookup_num_tokens", "past_key_values", "inputs_embeds"):
            if kwargs.get(key) is not None:
                raise GenerationError(f"XLNetLMHeadModel.generate: {key} is not supported (XLNet keeps mems)")
        return super().generate(*args, **kwargs)

    def precompile_decode(self, progress: bool = False, batched: bool = False) -> bool:
        return False  # no one-token step
