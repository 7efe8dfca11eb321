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
compiled ahead of time by AOTInductor (kernels.aot), cached on disk: the matrix-vector products become loops
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
from ..kernels import aot
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
        nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        or any(m._forward_hooks or m._forward_pre_hooks
               for m in itertools.chain(model.layers.modules(), model.norm.modules(), lm_head.modules())))
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
            graphs = _graphs(model, lm_head, parts, compile_missing, progress) if model.compiled_decode else None
            plan = _Plan(eager, graphs)
    model._fused = plan, _sources(model, lm_head), next(_BUILDS)  # after fusing: the weights live in the fused tensors


def _sources(model, lm_head) -> list:
    """Each module the plan calls, and where its weight is: a replaced module or weight makes a plan stale."""
    out = []
    for layer in model.layers:
        a, mlp = layer.self_attn, layer.mlp
        for m in (layer.input_layernorm, a.q_proj, a.k_proj, a.v_proj, getattr(a, "q_norm", None),
                  getattr(a, "k_norm", None), a.o_proj, layer.post_attention_layernorm, mlp.gate_proj, mlp.up_proj,
                  mlp.down_proj):
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
        plan.append((layer.input_layernorm.forward, row(qkv), norms, row(a.o_proj),
                     layer.post_attention_layernorm.forward, row(gate_up), row(mlp.down_proj), a.sliding_window))
        parts.append((layer.input_layernorm, qkv, (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None, a.o_proj,
                      layer.post_attention_layernorm, gate_up, mlp.down_proj, a.sliding_window))
    return plan, parts


def _tables(model, position: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin for q's and k's heads (nh + n_kv, hd), the attention scale folded into q's rows and
    the sign of rotate_half into sin: x * cos + x.roll(hd / 2) * sin turns q and k in one go."""
    attn = model.layers[0].self_attn
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    cos, sin = model.rope_tables(position.view(1, 1), dtype)
    cos, sin = cos.view(hd), sin.view(hd)
    sin = torch.cat((-sin[:hd // 2], sin[hd // 2:]))  # rotate_half(x) * sin == x.roll(half) * this
    scale = hd ** -0.5
    cos = torch.cat(((cos * scale).expand(nh, hd), cos.expand(nkv, hd)))
    sin = torch.cat(((sin * scale).expand(nh, hd), sin.expand(nkv, hd)))
    return cos, sin


def decode_token(model, lm_head, x: torch.Tensor, cache: KVCache, slot: int,
                 position: torch.Tensor) -> torch.Tensor | None:
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
        return _run_graphs(plan.graphs, x, cos, sin, cache, slot)
    attn = model.layers[0].self_attn
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    nq, nk, half, group, S = nh * hd, nkv * hd, hd // 2, nh // nkv, slot + 1
    dtype = x.dtype
    x = x.view(1, -1)
    for keys, values, (norm1, qkv, qk_norms, o_proj, norm2, gate_up, down_proj, window) in zip(
            cache.keys, cache.values, plan.layers):
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
    return lm_head(model.norm(x)).view(1, 1, -1)


# --- the step compiled ahead of time -------------------------------------------------------------------------
#
# One graph per layer boundary, with the weights as inputs (so one compiled graph serves every layer of the
# same shape and kind, and the model keeps its own tensors): `_First` is layer 0's norm, q/k/v and RoPE;
# `_Layer` is layer i's attention (writing the new key and value into its cache, attending over the last
# `span` of the first `seen` slots; both lengths are dynamic), o_proj, MLP and residuals, then layer i+1's
# norm, q/k/v and RoPE, or for the last layer the final norm and lm_head. The eager step's arithmetic with
# other summation orders; bf16 intermediates inside a fused loop stay in fp32 (inductor's
# emulate_precision_casts would round them as the eager ops do, at a third of the matrix-vector speed).

_ONE = torch.empty(1)


class _Graph(nn.Module):
    def __init__(self, dims: tuple, fns: dict, eps: dict):
        super().__init__()
        self.dims, self.fns, self.eps = dims, fns, eps

    def _norm(self, x, w, eps):
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    def _take(self, inputs: list, name: str) -> list:
        n = self.fns[name][0]
        out, inputs[:] = inputs[:n], inputs[n:]
        return out

    def _pre(self, x, inputs, cos, sin):
        nh, nkv, hd = self.dims
        n1, = self._take(inputs, "norm1")
        y = self.fns["qkv"][1](self._norm(x, n1, self.eps["norm1"]), *self._take(inputs, "qkv"))
        qk = y[0, :(nh + nkv) * hd].view(nh + nkv, hd)
        if "qk_norms" in self.fns:
            qn, kn = self._take(inputs, "qk_norms")
            qk = torch.cat((self._norm(qk[:nh], qn, self.eps["q_norm"]), self._norm(qk[nh:], kn, self.eps["k_norm"])))
        qk = qk * cos + qk.roll(hd // 2, -1) * sin
        return qk, y[0, (nh + nkv) * hd:].view(nkv, hd)


class _First(_Graph):
    def forward(self, inputs: list):
        inputs = list(inputs)
        x, cos, sin = inputs[0], inputs[-2], inputs[-1]
        rest = inputs[1:-2]
        return list(self._pre(x, rest, cos, sin))


class _Layer(_Graph):
    def __init__(self, dims, fns, eps, last: bool):
        super().__init__(dims, fns, eps)
        self.last = last

    def forward(self, inputs: list):
        nh, nkv, hd = self.dims
        x, qk, v, keys, values, seen, span = inputs[:7]
        cos, sin = inputs[-2], inputs[-1]
        rest = list(inputs[7:-2])
        S, W = seen.shape[0], span.shape[0]
        torch._check(W <= S)
        torch._check(S <= keys.shape[2])
        keys.narrow(2, S - 1, 1).copy_(qk[nh:].view(1, nkv, 1, hd))
        values.narrow(2, S - 1, 1).copy_(v.view(1, nkv, 1, hd))
        # Products and sums rather than bmm and softmax: inductor would match those to its SDPA kernel, which
        # does not take these strided views of the cache; as loops they fuse with the rest.
        k = keys[0].narrow(1, S - W, W).float().unsqueeze(1)  # (n_kv, 1, W, hd)
        scores = (qk[:nh].float().view(nkv, nh // nkv, 1, hd) * k).sum(-1)  # (n_kv, group, W)
        probs = (scores - scores.amax(-1, keepdim=True)).exp()
        probs = probs / probs.sum(-1, keepdim=True)
        out = (probs.unsqueeze(-1) * values[0].narrow(1, S - W, W).float().unsqueeze(1)).sum(-2)  # (n_kv, group, hd)
        dtype = x.dtype
        x = x + self.fns["o_proj"][1](out.view(1, nh * hd).to(dtype), *self._take(rest, "o_proj"))
        n2, = self._take(rest, "norm2")
        g = self.fns["gate_up"][1](self._norm(x, n2, self.eps["norm2"]), *self._take(rest, "gate_up"))
        n = g.shape[-1] // 2
        x = x + self.fns["down_proj"][1](F.silu(g[:, :n]) * g[:, n:], *self._take(rest, "down_proj"))
        if self.last:
            nw, = self._take(rest, "norm")
            return [self.fns["lm_head"][1](self._norm(x, nw, self.eps["norm"]), *self._take(rest, "lm_head"))]
        return [x, *self._pre(x, rest, cos, sin)]


def _kernel(m) -> tuple | None:
    make = getattr(m, "graph_kernel", None)
    return make() if make is not None else None


def _graphs(model, lm_head, parts: list, compile_missing: bool, progress: bool) -> tuple | None:
    """(layer 0's inputs and graph, [(graph, inputs, window) per layer]) where every graph is compiled (or
    compile_missing compiles it now), else None."""
    attn = model.layers[0].self_attn
    dims = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
    dtype = model.embed_tokens.weight.dtype

    def pre_part(layer_parts):
        norm1, qkv, qk_norms, *_ = layer_parts
        k = _kernel(qkv)
        if k is None:
            return None
        fns, eps, tensors = {"norm1": (1, None), "qkv": (len(k[0]), k[1])}, {"norm1": norm1.eps}, [norm1.weight, *k[0]]
        if qk_norms is not None:
            fns["qk_norms"] = (2, None)
            eps.update(q_norm=qk_norms[0].eps, k_norm=qk_norms[1].eps)
            tensors += [qk_norms[0].weight, qk_norms[1].weight]
        return fns, eps, tensors

    def post_part(layer_parts):
        _, _, _, o_proj, norm2, gate_up, down_proj, _ = layer_parts
        ks = [_kernel(m) for m in (o_proj, gate_up, down_proj)]
        if any(k is None for k in ks):
            return None
        fns = {"o_proj": (len(ks[0][0]), ks[0][1]), "norm2": (1, None), "gate_up": (len(ks[1][0]), ks[1][1]),
               "down_proj": (len(ks[2][0]), ks[2][1])}
        return fns, {"norm2": norm2.eps}, [*ks[0][0], norm2.weight, *ks[1][0], *ks[2][0]]

    head = _kernel(lm_head)
    pres, posts = [pre_part(p) for p in parts], [post_part(p) for p in parts]
    if head is None or any(p is None for p in pres + posts):
        return None
    jobs = []  # (module, example inputs, dynamic dims, runtime inputs or None for layer 0, window)
    cos, sin = (torch.zeros(dims[0] + dims[1], dims[2], dtype=dtype) for _ in range(2))  # distinct: export dedups aliases
    x = torch.zeros(1, model.embed_tokens.weight.shape[1], dtype=dtype)
    fns, eps, tensors = pres[0]
    jobs.append((_First(dims, fns, eps), [x, *tensors, cos, sin], None, tensors, None))
    seen, span, capacity = (torch.export.Dim(n, min=1, max=1 << 30) for n in ("seen", "span", "capacity"))
    for i, layer_parts in enumerate(parts):
        fns, eps, tensors = dict(posts[i][0]), dict(posts[i][1]), list(posts[i][2])
        last = i == len(parts) - 1
        if last:
            fns.update(norm=(1, None), lm_head=(len(head[0]), head[1]))
            eps["norm"] = model.norm.eps
            tensors += [model.norm.weight, *head[0]]
        else:
            fns.update(pres[i + 1][0])
            eps.update(pres[i + 1][1])
            tensors += pres[i + 1][2]
        cache = torch.zeros(1, dims[1], 6, dims[2], dtype=dtype)
        qk = torch.zeros(dims[0] + dims[1], dims[2], dtype=dtype)
        v = torch.zeros(dims[1], dims[2], dtype=dtype)
        example = [x, qk, v, cache, cache.clone(), _ONE.expand(5), _ONE.expand(3), *tensors, cos, sin]
        dynamic = [None] * 3 + [{2: capacity}] * 2 + [{0: seen}, {0: span}] + [None] * (len(tensors) + 2)
        jobs.append((_Layer(dims, fns, eps, last), example, dynamic, tensors, layer_parts[-1]))
    code = _code_hash(__file__, kernels.__file__)
    loaded = []
    todo = []
    for job in jobs:
        module, example = job[0], job[1]
        description = (type(module).__name__, code, module.dims, repr(sorted(module.eps.items())),
                       getattr(module, "last", None),
                       [(tuple(t.shape), str(t.dtype)) for t in example], sorted(module.fns))
        key = aot.graph_key(description)
        graph = aot.cached_graph(key)
        loaded.append(graph)
        if graph is None:
            todo.append((len(loaded) - 1, key))
    if todo and not compile_missing:
        return None
    if todo:
        from tqdm.auto import tqdm

        keys = {}
        for index, key in todo:
            keys.setdefault(key, []).append(index)
        bar = tqdm(keys.items(), desc="autolm: compiling the CPU decode step (once)", unit="graph",
                   disable=not progress)
        for key, indices in bar:
            module, example, dynamic = jobs[indices[0]][:3]
            graph = aot.compile_graph(key, module, example, dynamic)
            if graph is None:
                return None
            for index in indices:
                loaded[index] = graph
    first = (loaded[0], jobs[0][3])
    return first, [(g, job[3], job[4]) for g, job in zip(loaded[1:], jobs[1:])]


_CODE: dict = {}


def _code_hash(*paths: str) -> str:
    """A hash of the source files the graphs are made of: editing them compiles new graphs."""
    if paths not in _CODE:
        import hashlib

        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                h.update(f.read())
        _CODE[paths] = h.hexdigest()[:16]
    return _CODE[paths]


def _run_graphs(graphs: tuple, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                slot: int) -> torch.Tensor:
    (first, first_inputs), layers = graphs
    S = slot + 1
    seen = _ONE.expand(S)
    spans = {}
    x = x.view(1, -1)
    qk, v = first([x, *first_inputs, cos, sin])
    for i, (graph, inputs, window) in enumerate(layers):
        span = seen if window is None or window >= S else spans.get(window)
        if span is None:
            span = spans[window] = _ONE.expand(window)
        out = graph([x, qk, v, cache.keys[i], cache.values[i], seen, span, *inputs, cos, sin])
        if len(out) == 1:
            return out[0].view(1, 1, -1)
        x, qk, v = out
    raise AssertionError("the last layer's graph returns the logits")


class _Concat(nn.Module):
    """The concatenated outputs of Linear layers that could not be fused (e.g. wrapped by LoRA)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.parts = modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], -1)

    def graph_kernel(self):
        parts = [_kernel(m) for m in self.parts]
        return None if any(k is None for k in parts) else kernels.concat_graph(parts)
