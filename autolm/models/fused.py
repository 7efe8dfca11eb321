"""The one-token step of one sequence (batch-1 decoding on the CPU): the model's forward with fewer, larger ops.

A decode step reads every weight once, and on the CPU most of its time went to ~75 small ops per layer at
a few microseconds of dispatch each. Here q/k/v and gate/up run as one matmul each (fused weights whose
parts the model's modules view, so names, state dicts and memory are unchanged), RoPE turns q and k in one
go with the attention scale folded into q's tables, attention runs without masks over the real tokens,
and modules are called without the hook machinery (the step stands aside when hooks are registered).
The arithmetic is the forward's, except that attention runs in fp32 for bf16 models (PyTorch's bf16
batched matmuls on the CPU cost milliseconds whenever the shape changes): fp32 models give the same
tokens, bf16 ones the same logits within bf16 rounding.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .layers import KVCache, fuse_linears


_BUILDS = itertools.count(1)  # each plan gets a number; a cache remembers the number it was checked against


def fused_plan(model, cache: KVCache) -> list | None:
    """Per layer, the callables of the one-token step: q/k/v and gate/up fused into one matmul each (their
    weights become views of the fused ones, see fuse_linears), modules called without the hook machinery.
    None where that would change results: tensors that are not plain CPU tensors, forward hooks. Checked
    once per cache (a new generation) against the modules and weights it was built from; the cache keeps
    only (plan number, usable), so copying or pickling it copies nothing of the model."""
    if model._fused is not None and cache.fused is not None and cache.fused[0] == model._fused[2]:
        return model._fused[0] if cache.fused[1] else None
    if model._fused is None or model._fused[1] != _sources(model):
        # Under inference_mode the fused tensors (and the views the modules keep) would be inference tensors,
        # which autograd refuses later (fine-tuning after generating): build them as plain tensors.
        with torch.inference_mode(False), torch.no_grad():
            plan = _fuse(model)
        model._fused = plan, _sources(model), next(_BUILDS)  # after fusing: the weights live in the fused tensors
    plan = model._fused[0]
    usable = plan is not None and not (
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        or any(m._forward_hooks or m._forward_pre_hooks for m in model.layers.modules()))
    cache.fused = (model._fused[2], usable)
    return plan if usable else None


def _sources(model) -> list:
    """Each module the plan calls, and where its weight is: a replaced module or weight makes a plan stale."""
    out = []
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for m in (layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, getattr(a, "q_norm", None),
                  getattr(a, "k_norm", None), a.o_proj, layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj,
                  mlp.down_proj):
            w = getattr(m, "weight", None)
            out.append((m, w.data_ptr() if isinstance(w, torch.Tensor) else None))
    return out


def _fuse(model) -> list | None:
    plan = []
    dtype = model.embed_tokens.weight.dtype

    def row(m):
        return kernels.one_row(m, dtype)

    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        tensors = [*layer.parameters(), *layer.buffers()]
        if not all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" for t in tensors):
            return None
        qkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj]) or _Concat([a.q_proj, a.k_proj, a.v_proj])
        gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj]) or _Concat([mlp.gate_proj, mlp.up_proj])
        norms = (a.q_norm.forward, a.k_norm.forward) if hasattr(a, "q_norm") else None
        plan.append((layer.input_layernorm.forward, row(qkv), norms, row(a.o_proj),
                     layer.post_attention_layernorm.forward, row(gate_up), row(mlp.down_proj), a.sliding_window))
    return plan


def decode_token(model, x: torch.Tensor, cache: KVCache, slot: int, position: torch.Tensor) -> torch.Tensor | None:
    """One token of one sequence, x (1, 1, h), written at cache `slot` and attending to slots 0..slot (all
    real tokens) at RoPE `position`: the forward's arithmetic with q/k/v and gate/up fused into one matmul
    each, RoPE for q and k in one go (the attention scale folded into q's tables), attention in fp32 over the
    slots a layer sees (its sliding window) without masks, so a layer is ~25 ops instead of ~75. Returns the
    normed hidden state (1, 1, h), or None where it does not apply (see fused_plan)."""
    plan = fused_plan(model, cache)
    if plan is None:
        return None
    attn = model.layers[0].self_attn
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    nq, nk, half, group, S = nh * hd, nkv * hd, hd // 2, nh // nkv, slot + 1
    cos, sin = model.rope_tables(position.view(1, 1), x.dtype)
    cos, sin = cos.view(hd), sin.view(hd)
    sin = torch.cat((-sin[:half], sin[half:]))  # rotate_half(x) * sin == x.roll(half) * this
    scale = hd ** -0.5
    cos = torch.cat(((cos * scale).expand(nh, hd), cos.expand(nkv, hd)))  # (nh + n_kv, hd)
    sin = torch.cat(((sin * scale).expand(nh, hd), sin.expand(nkv, hd)))
    dtype = x.dtype
    x = x.view(1, -1)
    for keys, values, (norm1, qkv, qk_norms, o_proj, norm2, gate_up, down_proj, window) in zip(
            cache.keys, cache.values, plan):
        y = qkv(norm1(x))  # (1, nq + 2 nk)
        qk = y[0, :nq + nk].view(nh + nkv, hd)
        if qk_norms is not None:
            qk = torch.cat((qk_norms[0](qk[:nh]), qk_norms[1](qk[nh:])))
        qk = qk * cos + qk.roll(half, -1) * sin
        keys, values = keys[0], values[0]  # (n_kv, capacity, hd)
        keys[:, slot] = qk[nh:]
        values[:, slot] = y[0, nq + nk:].view(nkv, hd)
        first = 0 if window is None else max(0, S - window)
        # In fp32: PyTorch's bf16 batched matmuls on the CPU cost milliseconds whenever the shape changes.
        scores = torch.bmm(qk[:nh].float().view(nkv, group, hd), keys[:, first:S].float().transpose(1, 2))
        out = torch.bmm(torch.softmax(scores, -1), values[:, first:S].float())  # (n_kv, group, hd)
        x = x + o_proj(out.view(1, nq).to(dtype))
        g = gate_up(norm2(x))
        n = g.shape[-1] // 2
        x = x + down_proj(F.silu(g[:, :n]) * g[:, n:])
    return model.norm(x).view(1, 1, -1)


class _Concat(nn.Module):
    """The concatenated outputs of Linear layers that could not be fused (e.g. wrapped by LoRA)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], -1)
