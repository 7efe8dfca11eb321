"""The one-token step of one sequence (batch-1 decoding on the CPU): the model's forward with fewer, larger ops.

A decode step reads every weight once, and on the CPU most of its time went to ~75 small ops per layer at
a few microseconds of dispatch each. Here q/k/v and gate/up run as one matmul each (fused weights whose
parts the model's modules view, so names, state dicts and memory are unchanged), RoPE turns q and k in one
go with the attention scale folded into q's tables, attention runs without masks over the real tokens,
and modules are called without the hook machinery (the step stands aside when hooks are registered).
The arithmetic is the forward's, except that attention runs in fp32 for bf16 models (PyTorch's bf16
batched matmuls on the CPU cost milliseconds whenever the shape changes): fp32 models give the same
tokens, bf16 ones the same logits within bf16 rounding.

After `precompile` (LlamaForCausalLM.precompile_decode; the CLI does it) each layer is one call of a graph
compiled ahead of time by AOTInductor (compiled_step.py), cached on disk: the matrix-vector products become loops
that stream the weights at close to the memory bandwidth (int4 calls PyTorch's kernel from the compiled
code), and everything between them fuses. fp32 models give the same tokens as the forward; in bf16 the
compiled loops keep intermediates in fp32 where the eager ops round them to bf16, so logits differ within
bf16 rounding (and are no further from the fp32 model's).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .compiled_step import graph_kernel, graphs, run_graphs
from .layers import KVCache, fuse_linears

_BUILDS = itertools.count(1)  # each plan gets a number; a cache remembers the number it was checked against


class _Plan:
    """The one-token step of a model: per layer the eager callables, and the compiled graphs where they are
    in the cache (`graphs`: (first layer's inputs, [(graph, inputs, sliding window) per layer]) or None)."""

    def __init__(self, layers: list, graphs: tuple | None):
        self.layers, self.graphs = layers, graphs


def fused_plan(model, lm_head, cache: KVCache) -> _Plan | None:
    """The plan of the one-token step: q/k/v and gate/up fused into one matmul each (their weights become
    views of the fused ones, see fuse_linears), modules called without the hook machinery, and the graphs
    compiled for it ahead of time where `precompile` stored them. None where that would change results:
    tensors that are not plain CPU tensors, forward hooks. Checked once per cache (a new generation) against
    the modules and weights it was built from; the cache keeps only (plan number, usable), so copying or
    pickling it copies nothing of the model."""
    if model._fused is not None and cache.fused is not None and cache.fused[0] == model._fused[2]:
        return model._fused[0] if cache.fused[1] else None
    if model._fused is None or model._fused[1] != _sources(model, lm_head):
        _build(model, lm_head, compile_missing=False)
    plan = model._fused[0]
    usable = plan is not None and not (
        nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
        or any(
            m._forward_hooks or m._forward_pre_hooks
            for m in itertools.chain(model.layers.modules(), model.norm.modules(), lm_head.modules())
        )
    )
    cache.fused = (model._fused[2], usable)
    return plan if usable else None


def precompile(model, lm_head, progress: bool = False) -> bool:
    """Compile the graphs of the one-token step ahead of time (kernels.aot; cached in $AUTOLM_HOME/compiled,
    so later processes load them in milliseconds). Returns whether the step now runs compiled."""
    _build(model, lm_head, compile_missing=True, progress=progress)
    plan = model._fused[0]
    return plan is not None and plan.graphs is not None


def _build(model, lm_head, compile_missing: bool, progress: bool = False) -> None:
    # Under inference_mode the fused tensors (and the views the modules keep) would be inference tensors,
    # which autograd refuses later (fine-tuning after generating): build them as plain tensors.
    with torch.inference_mode(False), torch.no_grad():
        fused = _fuse(model)
        plan = None
        if fused is not None:
            eager, parts = fused
            compiled = (
                graphs(model, lm_head, parts, compile_missing, progress) if model.compiled_decode else None
            )
            plan = _Plan(eager, compiled)
    model._fused = (
        plan,
        _sources(model, lm_head),
        next(_BUILDS),
    )  # after fusing: the weights live in the fused tensors


def _sources(model, lm_head) -> list:
    """Each module the plan calls, and where its weight is: a replaced module or weight makes a plan stale."""
    out = []
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for m in (
            layer.input_layernorm,
            a.q_proj,
            a.k_proj,
            a.v_proj,
            getattr(a, "q_norm", None),
            getattr(a, "k_norm", None),
            a.o_proj,
            layer.post_attention_layernorm,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        ):
            w = getattr(m, "weight", None)
            out.append((m, w.data_ptr() if isinstance(w, torch.Tensor) else None))
    for m in (model.norm, lm_head):
        w = getattr(m, "weight", None)
        out.append((m, w.data_ptr() if isinstance(w, torch.Tensor) else None))
    return out + [model.compiled_decode]


def _fuse(model) -> tuple[list, list] | None:
    """(per layer the eager callables, per layer the modules they call) or None."""
    plan, parts = [], []
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
        plan.append(
            (
                layer.input_layernorm.forward,
                row(qkv),
                norms,
                row(a.o_proj),
                layer.post_attention_layernorm.forward,
                row(gate_up),
                row(mlp.down_proj),
                a.sliding_window,
            )
        )
        parts.append(
            (
                layer.input_layernorm,
                qkv,
                (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None,
                a.o_proj,
                layer.post_attention_layernorm,
                gate_up,
                mlp.down_proj,
                a.sliding_window,
            )
        )
    return plan, parts


def _tables(model, position: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for q's and k's heads (nh + n_kv, hd), the attention scale folded into q's rows and
    the sign of rotate_half into sin: x * cos + x.roll(hd / 2) * sin turns q and k in one go."""
    attn = model.layers[0].self_attn
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    cos, sin = model.rope_tables(position.view(1, 1), dtype)
    cos, sin = cos.view(hd), sin.view(hd)
    sin = torch.cat((-sin[: hd // 2], sin[hd // 2 :]))  # rotate_half(x) * sin == x.roll(half) * this
    scale = hd**-0.5
    cos = torch.cat(((cos * scale).expand(nh, hd), cos.expand(nkv, hd)))
    sin = torch.cat(((sin * scale).expand(nh, hd), sin.expand(nkv, hd)))
    return cos, sin


def decode_token(
    model, lm_head, x: torch.Tensor, cache: KVCache, slot: int, position: torch.Tensor
) -> torch.Tensor | None:
    """One token of one sequence, x (1, 1, h), written at cache `slot` and attending to slots 0..slot (all
    real tokens) at RoPE `position`: the forward's arithmetic with q/k/v and gate/up fused into one matmul
    each, RoPE for q and k in one go (the attention scale folded into q's tables), attention in fp32 over the
    slots a layer sees (its sliding window) without masks, so a layer is ~25 ops instead of ~75, or one call
    of a compiled graph. Returns the logits (1, 1, vocab), or None where it does not apply (see fused_plan)."""
    plan = fused_plan(model, lm_head, cache)
    if plan is None:
        return None
    cos, sin = _tables(model, position, x.dtype)
    if plan.graphs is not None and slot < cache.capacity:  # the compiled code writes the slot unchecked
        return run_graphs(plan.graphs, x, cos, sin, cache, slot)
    attn = model.layers[0].self_attn
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    nq, nk, half, group, S = nh * hd, nkv * hd, hd // 2, nh // nkv, slot + 1
    dtype = x.dtype
    x = x.view(1, -1)
    for keys, values, (norm1, qkv, qk_norms, o_proj, norm2, gate_up, down_proj, window) in zip(
        cache.keys, cache.values, plan.layers
    ):
        y = qkv(norm1(x))  # (1, nq + 2 nk)
        qk = y[0, : nq + nk].view(nh + nkv, hd)
        if qk_norms is not None:
            qk = torch.cat((qk_norms[0](qk[:nh]), qk_norms[1](qk[nh:])))
        qk = qk * cos + qk.roll(half, -1) * sin
        keys, values = keys[0], values[0]  # (n_kv, capacity, hd)
        keys[:, slot] = qk[nh:]
        values[:, slot] = y[0, nq + nk :].view(nkv, hd)
        first = 0 if window is None else max(0, S - window)
        # In fp32: PyTorch's bf16 batched matmuls on the CPU cost milliseconds whenever the shape changes.
        scores = torch.bmm(qk[:nh].float().view(nkv, group, hd), keys[:, first:S].float().transpose(1, 2))
        out = torch.bmm(torch.softmax(scores, -1), values[:, first:S].float())  # (n_kv, group, hd)
        x = x + o_proj(out.view(1, nq).to(dtype))
        g = gate_up(norm2(x))
        n = g.shape[-1] // 2
        x = x + down_proj(F.silu(g[:, :n]) * g[:, n:])
    return lm_head(model.norm(x)).view(1, 1, -1)


class _Concat(nn.Module):
    """The concatenated outputs of Linear layers that could not be fused (e.g. wrapped by LoRA)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], -1)

    def graph_kernel(self):
        parts = [graph_kernel(m) for m in self.parts]
        return None if any(k is None for k in parts) else kernels.concat_graph(parts)
