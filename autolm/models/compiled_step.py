"""The one-token step compiled ahead of time (see fused.py): one AOTInductor graph per layer boundary, cached
on disk by kernels.aot.

The weights are inputs, so one compiled graph serves every layer of the same shape and kind and the model
keeps its own tensors: `_First` is layer 0's norm, q/k/v and RoPE; `_Layer` is layer i's attention (writing
the new key and value into its cache, attending over the last `span` of the first `seen` slots; both
lengths are dynamic), o_proj, MLP and residuals, then layer i+1's norm, q/k/v and RoPE, or for the last
layer the final norm and lm_head. The eager step's arithmetic with other summation orders; bf16
intermediates inside a fused loop stay in fp32 (inductor's emulate_precision_casts would round them as
the eager ops do, at a third of the matrix-vector speed). The layers' own `graph_kernel()` give each
matmul's arithmetic (kernels.linear_graph, int8_graph, int4_graph).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import aot
from .layers import KVCache

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

    def _matvec(self, name: str, x, inputs: list, realized: list):
        """The layer `name` on x. x is also returned from the graph: inductor then writes it to a buffer once,
        where it would otherwise recompute it (a norm, a SiLU) inside the matrix-vector loop, once per row."""
        realized.append(x)
        return self.fns[name][1](x, *self._take(inputs, name))

    def _pre(self, x, inputs, cos, sin, realized):
        nh, nkv, hd = self.dims
        (n1,) = self._take(inputs, "norm1")
        y = self._matvec("qkv", self._norm(x, n1, self.eps["norm1"]), inputs, realized)
        qk = y[0, : (nh + nkv) * hd].view(nh + nkv, hd)
        if "qk_norms" in self.fns:
            qn, kn = self._take(inputs, "qk_norms")
            qk = torch.cat(
                (self._norm(qk[:nh], qn, self.eps["q_norm"]), self._norm(qk[nh:], kn, self.eps["k_norm"]))
            )
        qk = qk * cos + qk.roll(hd // 2, -1) * sin
        return qk, y[0, (nh + nkv) * hd :].view(nkv, hd)


class _First(_Graph):
    def forward(self, inputs: list):
        inputs = list(inputs)
        x, cos, sin = inputs[0], inputs[-2], inputs[-1]
        rest, realized = inputs[1:-2], []
        return [*self._pre(x, rest, cos, sin, realized), *realized]


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
        torch._check(keys.shape[2] >= S)
        keys.narrow(2, S - 1, 1).copy_(qk[nh:].view(1, nkv, 1, hd))
        values.narrow(2, S - 1, 1).copy_(v.view(1, nkv, 1, hd))
        # Products and sums rather than bmm and softmax: inductor would match those to its SDPA kernel, which
        # does not take these strided views of the cache; as loops they fuse with the rest.
        k = keys[0].narrow(1, S - W, W).float().unsqueeze(1)  # (n_kv, 1, W, hd)
        scores = (qk[:nh].float().view(nkv, nh // nkv, 1, hd) * k).sum(-1)  # (n_kv, group, W)
        probs = (scores - scores.amax(-1, keepdim=True)).exp()
        probs = probs / probs.sum(-1, keepdim=True)
        out = (probs.unsqueeze(-1) * values[0].narrow(1, S - W, W).float().unsqueeze(1)).sum(
            -2
        )  # (n_kv, group, hd)
        dtype, realized = x.dtype, []
        x = x + self._matvec("o_proj", out.view(1, nh * hd).to(dtype), rest, realized)
        (n2,) = self._take(rest, "norm2")
        g = self._matvec("gate_up", self._norm(x, n2, self.eps["norm2"]), rest, realized)
        n = g.shape[-1] // 2
        x = x + self._matvec("down_proj", F.silu(g[:, :n]) * g[:, n:], rest, realized)
        if self.last:
            (nw,) = self._take(rest, "norm")
            return [self._matvec("lm_head", self._norm(x, nw, self.eps["norm"]), rest, realized), *realized]
        return [x, *self._pre(x, rest, cos, sin, realized), *realized]


def graph_kernel(m) -> tuple | None:
    """(tensors, fn) computing module m on (1, K) inputs inside a graph (its own graph_kernel), or None."""
    make = getattr(m, "graph_kernel", None)
    return make() if make is not None else None


def graphs(model, lm_head, parts: list, compile_missing: bool, progress: bool) -> tuple | None:
    """(layer 0's inputs and graph, [(graph, inputs, window) per layer]) where every graph is compiled (or
    compile_missing compiles it now), else None."""
    attn = model.layers[0].self_attn
    dims = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
    dtype = model.embed_tokens.weight.dtype

    def pre_part(layer_parts):
        norm1, qkv, qk_norms, *_ = layer_parts
        k = graph_kernel(qkv)
        if k is None:
            return None
        fns, eps, tensors = (
            {"norm1": (1, None), "qkv": (len(k[0]), k[1])},
            {"norm1": norm1.eps},
            [norm1.weight, *k[0]],
        )
        if qk_norms is not None:
            fns["qk_norms"] = (2, None)
            eps.update(q_norm=qk_norms[0].eps, k_norm=qk_norms[1].eps)
            tensors += [qk_norms[0].weight, qk_norms[1].weight]
        return fns, eps, tensors

    def post_part(layer_parts):
        _, _, _, o_proj, norm2, gate_up, down_proj, _ = layer_parts
        ks = [graph_kernel(m) for m in (o_proj, gate_up, down_proj)]
        if any(k is None for k in ks):
            return None
        fns = {
            "o_proj": (len(ks[0][0]), ks[0][1]),
            "norm2": (1, None),
            "gate_up": (len(ks[1][0]), ks[1][1]),
            "down_proj": (len(ks[2][0]), ks[2][1]),
        }
        return fns, {"norm2": norm2.eps}, [*ks[0][0], norm2.weight, *ks[1][0], *ks[2][0]]

    head = graph_kernel(lm_head)
    pres, posts = [pre_part(p) for p in parts], [post_part(p) for p in parts]
    if head is None or any(p is None for p in pres + posts):
        return None
    jobs = []  # (module, example inputs, dynamic dims, runtime inputs or None for layer 0, window)
    cos, sin = (
        torch.zeros(dims[0] + dims[1], dims[2], dtype=dtype) for _ in range(2)
    )  # distinct: export dedups aliases
    x = torch.zeros(1, model.embed_tokens.weight.shape[1], dtype=dtype)
    fns, eps, tensors = pres[0]
    jobs.append((_First(dims, fns, eps), [x, *tensors, cos, sin], None, tensors, None))
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
        dynamic = (
            [None] * 3 + [{2: "capacity"}] * 2 + [{0: "seen"}, {0: "span"}] + [None] * (len(tensors) + 2)
        )
        jobs.append((_Layer(dims, fns, eps, last), example, dynamic, tensors, layer_parts[-1]))
    code = _code_hash(__file__, kernels.__file__)
    loaded = []
    todo = []
    for job in jobs:
        module, example = job[0], job[1]
        description = (
            type(module).__name__,
            code,
            module.dims,
            repr(sorted(module.eps.items())),
            getattr(module, "last", None),
            [(tuple(t.shape), str(t.dtype)) for t in example],
            sorted(module.fns),
        )
        key = aot.graph_key(description)
        graph = aot.cached_graph(key)
        loaded.append(graph)
        if graph is None:
            todo.append((len(loaded) - 1, key))
    if todo and not compile_missing:
        return None
    if todo:
        from tqdm.auto import tqdm

        dims_by_name = {n: torch.export.Dim(n, min=1, max=1 << 30) for n in ("seen", "span", "capacity")}
        keys = {}
        for index, key in todo:
            keys.setdefault(key, []).append(index)
        bar = tqdm(
            keys.items(),
            desc="autolm: compiling the CPU decode step (once)",
            unit="graph",
            disable=not progress,
        )
        for key, indices in bar:
            module, example, dynamic = jobs[indices[0]][:3]
            graph = aot.compile_graph(
                key,
                module,
                example,
                dynamic and [d and {i: dims_by_name[n] for i, n in d.items()} for d in dynamic],
            )
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
        h = hashlib.sha256()
        for p in paths:
            with open(p, "rb") as f:
                h.update(f.read())
        _CODE[paths] = h.hexdigest()[:16]
    return _CODE[paths]


def run_graphs(
    graphs: tuple, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, slot: int
) -> torch.Tensor:
    (first, first_inputs), layers = graphs
    S = slot + 1
    seen = _ONE.expand(S)
    spans = {}
    x = x.view(1, -1)
    qk, v = first([x, *first_inputs, cos, sin])[:2]
    last = len(layers) - 1
    for i, (graph, inputs, window) in enumerate(layers):
        span = seen if window is None or window >= S else spans.get(window)
        if span is None:
            span = spans[window] = _ONE.expand(window)
        out = graph([x, qk, v, cache.keys[i], cache.values[i], seen, span, *inputs, cos, sin])
        if i == last:
            return out[0].view(1, 1, -1)
        x, qk, v = out[:3]
