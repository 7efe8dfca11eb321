"""The one-token step compiled ahead of time, derived from any model's own modules.

Each decoder layer's forward runs under a `OneToken` context and is exported with its tensors as inputs
(`torch.func.functional_call`), so one compiled graph serves every layer of the same structure and the model
keeps its own weights; the final norm and the LM head are one more graph. Inside the graphs the matrix-vector
products become loops that stream the weights once (kernels.matvec; int4 calls PyTorch's kernel from the
compiled code), attention runs over the cache's dynamic length, and everything between them fuses. Each
matmul's input is also returned from its graph (kernels.realized_inputs): inductor then writes it once instead
of recomputing a norm or an activation inside the loop for every row.

Graphs are cached on disk by kernels.aot under a key made of the layer's structure (module classes, their
settings, tensor shapes and dtypes) and the source of the code it runs, so any model of the same shape finds
them and an edit to the code compiles new ones.
"""

from __future__ import annotations

import hashlib
import inspect
import os

import torch
from torch import nn

from .. import kernels
from ..kernels import aot, native
from ..nn import OneToken

_ONE = torch.empty(1)
# inductor's C++ flags for the step's graphs: multiply-adds fused (-ffp-contract=fast). Measured on an int8
# matrix-vector loop over 4096x4096 weights, 2 threads: 22.6 -> 24.6 GB/s (median of 8); results move within float
# rounding. Not -funsafe-math-optimizations (26.3 GB/s): gcc then links crtfastmath.o into the library, whose
# loading flushes subnormal floats to zero for the whole process.
_FLAGS = {"cpp.enable_floating_point_contract_flag": "fast"}
# settings that do not change a module's compiled code (the layer's index; the model's bookkeeping)
_SKIP = ("training", "layer_idx", "config", "name_or_path", "decode_mode", "decode_step", "load_report",
         "generation_config", "hf_device_map", "gradient_checkpointing", "kv_cache_dtype")  # fmt: skip


class _State(dict):
    """A layer graph's recurrent state, whatever layer index the layer asks under (one graph serves every layer
    of the same structure): OneToken's `states` with one entry."""

    def __init__(self, state: tuple[torch.Tensor, ...]):
        super().__init__()
        self.value = state

    def get(self, key, default=None):
        return self.value

    def __setitem__(self, key, value) -> None:
        self.value = tuple(value)


class _LayerGraph(nn.Module):
    """forward([x, keys, values, seen, span, (starts,) cos/sin per RoPE kind..., the body's layer inputs..., its
    recurrent state's tensors..., the layer's tensors...]) -> [x after the layer, the state after the token...,
    the matmul inputs...]; `seen` and `span` are tensors whose lengths are the slots. A batched graph takes a
    dynamic number of rows and each row's first real slot (`starts`). The layer inputs (`inputs`, their names:
    context_inputs) are set on the context as the body's run sets them."""

    def __init__(
        self, layer: nn.Module, names: list[str], kinds: list[str], batched: bool, states: int = 0, inputs=()
    ):
        super().__init__()
        self._layer = [layer]  # not a submodule: its tensors are inputs, never constants of the graph
        self.names, self.kinds, self.batched, self.states = names, kinds, batched, states
        self.inputs = tuple(inputs)

    def forward(self, inputs: list):
        x, keys, values, seen, span = inputs[:5]
        i = 6 if self.batched else 5
        starts = inputs[5] if self.batched else None
        n = len(self.kinds)
        tables = inputs[i : i + 2 * n]
        rope = {k: (tables[2 * j], tables[2 * j + 1]) for j, k in enumerate(self.kinds)}
        torch._check(span.shape[0] <= seen.shape[0])
        torch._check(seen.shape[0] <= keys.shape[2])
        i += 2 * n
        shared = dict(zip(self.inputs, inputs[i : i + len(self.inputs)]))
        i += len(self.inputs)
        state = _State(tuple(inputs[i : i + self.states])) if self.states else None
        ctx = OneToken(rope, keys, values, seen.shape[0], span.shape[0], starts, states=state)
        for name, t in shared.items():
            setattr(ctx, name, t)
        params = dict(zip(self.names, inputs[i + self.states :]))
        with kernels.realized_inputs(self.batched) as realized:
            out = torch.func.functional_call(self._layer[0], params, (x, ctx))
        return [out, *(state.value if state is not None else ()), *realized]


class _Head(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.logits(self.model.model.final_norm(x))


class _HeadGraph(nn.Module):
    """forward([x, the body's and head's tensors...]) -> [logits, the matmul inputs...]."""

    def __init__(self, model: nn.Module, names: list[str], batched: bool):
        super().__init__()
        self._head = [_Head(model)]
        self.names, self.batched = names, batched

    def forward(self, inputs: list):
        params = {f"model.{n}": t for n, t in zip(self.names, inputs[1:])}
        with kernels.realized_inputs(self.batched) as realized:
            out = torch.func.functional_call(self._head[0], params, (inputs[0],))
        return [out, *realized]


class Plan:
    """Loaded graphs and the tensors each is called with: per layer (graph, tensors, (window, chunk), the number
    of its recurrent state's tensors), then the head."""

    def __init__(self, layers: list, head: tuple, kinds: list[str]):
        self.layers, self.head, self.kinds = layers, head, kinds


def context_inputs(body: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every layer reads from its context beside its input, by name, from the first layer's input x: the body's
    `context_inputs(x)` (Zamba's embeddings), none for most models. The graphs take them as inputs."""
    inputs = getattr(body, "context_inputs", None)
    return dict(sorted(inputs(x).items())) if inputs is not None else {}


def tensors_of(module: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [
        *module.named_parameters(),
        *module.named_buffers(),
    ]  # tied tensors once: functional_call re-ties
    return [n for n, _ in named], [t.detach() for _, t in named]


def _plain(v):
    """A setting as it goes into a graph's key: stable across processes (functions by name, not address)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x) for x in v)
    if isinstance(v, torch.dtype):
        return str(v)
    if callable(v):
        return f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
    return type(v).__qualname__


def structure(module: nn.Module) -> tuple:
    """What a module's compiled code depends on: each submodule's class and settings."""
    out = []
    for name, m in module.named_modules():
        settings = sorted(
            (k, _plain(v)) for k, v in vars(m).items() if not k.startswith("_") and k not in _SKIP
        )
        out.append((name, f"{type(m).__module__}.{type(m).__qualname__}", tuple(settings)))
    return tuple(out)


_CODE: dict = {}


def code_hash(module: nn.Module) -> str:
    """A hash of the source files a module's forward runs: its classes' files, autolm.nn, kernels (the C++
    kernel's sources too: the graphs call its op) and this package. Editing any of them compiles new graphs."""
    files = {
        inspect.getsourcefile(c)
        for m in module.modules()
        for c in type(m).__mro__
        if c.__module__ != "builtins"
    }
    here = os.path.dirname(os.path.dirname(__file__))
    for pkg in ("nn", "kernels", "step"):
        d = os.path.join(here, pkg)
        files |= {os.path.join(d, f) for f in os.listdir(d) if f.endswith((".py", ".cpp", ".h"))}
    files = tuple(sorted(f for f in files if f and f.startswith(here)))
    if files not in _CODE:
        h = hashlib.sha256()
        for p in files:
            with open(p, "rb") as f:
                h.update(f.read())
        _CODE[files] = h.hexdigest()[:16]
    return _CODE[files]


def _describe(kind: str, module: nn.Module, example: list[torch.Tensor], extra=()) -> str:
    shapes = [(tuple(t.shape), str(t.dtype), tuple(t.stride())) for t in example]
    # the graphs call autolm's C++ kernels where they are built (attention): a process without them needs others
    return aot.graph_key((kind, code_hash(module), structure(module), shapes, tuple(extra), native.ready()))


def _jobs(model, batched: bool) -> tuple[list, list[str]]:
    """Per layer, then for the head: (graph module, example inputs, dynamic dims, runtime tensors, key, (window,
    chunk) of its attention).
    Batched graphs take any number of rows from 2 up (dimension 0 of x, the cache, starts and RoPE tables)."""
    body = model.model
    dtype = body.embed_tokens.weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    rows = 2 if batched else 1
    width = getattr(body, "carried_width", model.config.hidden_size)  # what the layers carry (Inkling 2)
    x = torch.zeros(rows, 1, width, dtype=dtype)  # the layers' width
    kinds = sorted(body.rotary.kinds)
    tables = body.rotary.tables(torch.zeros(rows, 1, dtype=torch.long), dtype)
    example_tables = [t.clone() for k in kinds for t in tables[k]]  # distinct tensors: export dedups aliases
    starts = [torch.zeros(rows, dtype=torch.long)] if batched else []
    b = {0: "batch"} if batched else None
    states = _example_states(model, x, tables, starts)
    shared = {k: t.clone() for k, t in context_inputs(body, x).items()}  # not x itself: export dedups aliases
    jobs = []
    for i, (layer, (n_kv, hd)) in enumerate(zip(body.layers, model.attention_shapes())):
        names, tensors = tensors_of(layer)
        attn = next((m for m in layer.modules() if hasattr(m, "num_kv_heads")), None)
        cache = torch.zeros(rows, n_kv, 6, hd, dtype=model.cache_dtype())
        state = [t.clone() for t in states.get(i, ())]
        example = [x, cache, cache.clone(), _ONE.expand(5), _ONE.expand(3), *starts, *example_tables]
        example += [*shared.values(), *state]
        dynamic = [b, {2: "capacity", **(b or {})}, {2: "capacity", **(b or {})}, {0: "seen"}, {0: "span"}]
        dynamic += [b] * (len(starts) + len(example_tables) + len(shared) + len(state))
        example += tensors
        dynamic += [None] * len(tensors)
        graph = _LayerGraph(layer, names, kinds, batched, len(state), shared)
        key = _describe("layer", layer, example, (kinds, batched, *shared))
        local = (
            (getattr(attn, "sliding_window", None), getattr(attn, "chunk", None))
            if not state
            else (None,) * 2
        )
        jobs.append((graph, example, dynamic, tensors, key, (*local, len(state))))
    named = [(n, t) for n, t in zip(*tensors_of(model)) if not n.startswith(model.layers_prefix + ".")]
    tensors = [t for _, t in named]
    graph = _HeadGraph(model, [n for n, _ in named], batched)
    example = [x, *tensors]
    dynamic = [b] + [None] * len(tensors) if batched else None
    jobs.append(
        (graph, example, dynamic, tensors, _describe("head", model, example, (batched,)), (None, None))
    )
    return jobs, kinds


def _example_states(
    model, x: torch.Tensor, tables: dict, starts: list
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Each recurrent layer's state after a first token, by layer: what its graph takes and gives (one eager
    one-token step of the model's own layers, on zeros)."""
    if not getattr(model, "recurrent", False):
        return {}
    cache, states = model.make_cache(x.shape[0], 6), {}
    ctx = OneToken(tables, cache.keys, cache.values, 1, starts=starts[0] if starts else None, states=states)
    with torch.no_grad():
        model.model.run(x, ctx)
    return states


def build(model, compile_missing: bool, progress: bool = False, batched: bool = False) -> Plan | None:
    """The compiled step's plan (for one row, or `batched` for 2 and more): every graph loaded from the cache, or
    (compile_missing) compiled now with a progress bar. None where a graph is missing and not compiled, or
    compiling failed (with a warning)."""
    jobs, kinds = _jobs(model, batched)
    graphs: dict[str, aot.Graph | None] = {}
    todo = {}
    for job in jobs:
        key = job[4]
        if key not in graphs:
            graphs[key] = aot.cached_graph(key)
            if graphs[key] is None:
                todo[key] = job
    if todo and not compile_missing:
        return None
    if todo:
        from tqdm.auto import tqdm

        desc = "autolm: compiling the CPU decode step (once)"
        for key, (module, example, dynamic, *_) in tqdm(
            todo.items(), desc=desc, unit="graph", disable=not progress
        ):
            graphs[key] = aot.compile_graph(key, module, example, _dims(dynamic), _FLAGS)
            if graphs[key] is None:
                return None
    layers = [(graphs[key], tensors, local) for _, _, _, tensors, key, local in jobs[:-1]]
    return Plan(layers, (graphs[jobs[-1][4]], jobs[-1][3]), kinds)


def _dims(dynamic: list | None) -> list | None:
    """The jobs' named dynamic dimensions as torch.export.Dim objects."""
    dims = {n: torch.export.Dim(n, min=1, max=1 << 30) for n in ("seen", "span", "capacity")}
    dims["batch"] = torch.export.Dim("batch", min=2, max=1 << 16)
    return dynamic and [d and {i: dims[n] for i, n in d.items()} for d in dynamic]


def exported(model, batched: bool = False) -> Plan:
    """The graphs build() compiles, exported but not compiled: what the compiled code computes, run by Python.
    Tests check every family's derived graphs this way; compiling exported graphs is inductor's part."""
    jobs, kinds = _jobs(model, batched)
    done: dict = {}
    with torch.inference_mode(False), torch.no_grad():
        for module, example, dynamic, _, key, _ in jobs:
            if key not in done:
                program = aot.export(module, example, _dims(dynamic)).module()
                done[key] = lambda inputs, program=program: program(inputs)
    layers = [(done[key], tensors, local) for _, _, _, tensors, key, local in jobs[:-1]]
    return Plan(layers, (done[jobs[-1][4]], jobs[-1][3]), kinds)


def run(
    plan: Plan, x: torch.Tensor, tables: dict, cache, slot: int, starts=None, inputs=None
) -> torch.Tensor:
    """One token x (1, 1, h) written at cache `slot` through the compiled layers and head -> logits (1, 1, V);
    `inputs`: the body's layer inputs for this token (context_inputs)."""
    seen = _ONE.expand(slot + 1)
    flat = [t for k in plan.kinds for t in tables[k]]
    if x.shape[0] > 1:  # a batched plan: each row's first real slot
        flat = [starts if starts is not None else torch.zeros(x.shape[0], dtype=torch.long), *flat]
    flat += list((inputs or {}).values())
    for i, (graph, tensors, (window, chunk, states)) in enumerate(plan.layers):
        span = seen if window is None or window > slot else _ONE.expand(window)
        if chunk is not None and x.shape[0] == 1:  # a batched graph masks each row's chunk by its start
            span = _ONE.expand(slot % chunk + 1)
        # contiguous: compiled code reads its inputs with the example's strides (a scan's last state is a view)
        state = tuple(t.contiguous() for t in cache.states[i]) if states else ()
        out = graph([x, cache.keys[i], cache.values[i], seen, span, *flat, *state, *tensors])
        x = out[0]
        if states:
            cache.states[i] = tuple(out[1 : 1 + states])
    graph, tensors = plan.head
    return graph([x, *tensors])[0]
