"""Graphs compiled ahead of time with AOTInductor and cached on disk, so only the first run on a machine
waits for the compiler.

A graph is a small nn.Module whose forward takes one list of tensors. `compile_graph` exports it
(torch.export, with the dynamic dimensions given), compiles it to a shared library with AOTInductor and
keeps the package under `$AUTOLM_HOME/compiled/<key>.pt2`; `cached_graph` loads a package compiled
before (a dlopen, milliseconds). The key covers everything the machine code depends on: the caller's
description of the graph (its code and the shapes and dtypes of its inputs), the torch version, the
CPU's vector instruction set and the thread count (inductor writes the thread count into its OpenMP
loops). Packages are written through a temporary file and a rename.

Packages load through torch's C++ loader (`torch._C._aoti.AOTIModelPackageLoader`; importing
`torch._inductor` for its Python wrapper costs seconds), with `torch._inductor.aoti_load_package` as the
fallback. Without `torch._inductor.aoti_compile_and_package`, or without a C++ compiler, compiling fails
once with a warning and callers keep their eager path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings

import torch

from .._util import autolm_home, published_file

logger = logging.getLogger("autolm")

_LOADED: dict[str, Graph | None] = {}  # key -> loaded package (None: compiling it failed in this process)


class Graph:
    """A loaded package: call it with the list of input tensors, get the list of outputs."""

    def __init__(self, loader, path: str):
        self._run = loader.run
        self.path = path

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._run(inputs)


def graph_key(description) -> str:
    """The cache key of a graph: `description` (any repr-able value naming its code, shapes and dtypes)
    plus what the compiled code depends on beyond it."""
    parts = (description, torch.__version__, _isa(), torch.get_num_threads())
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _isa() -> str:
    """What the machine code may use: ATen's CPU capability and the CPU's feature flags (cheap to read,
    unlike inductor's own probe, which compiles test programs)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def _path(key: str) -> str:
    return os.path.join(autolm_home(), "compiled", f"{key}.pt2")


def _api():
    """(compile_and_package, load_package) from torch._inductor, or None where this torch lacks them."""
    try:
        import torch._inductor as inductor

        return inductor.aoti_compile_and_package, inductor.aoti_load_package
    except (ImportError, AttributeError):
        return None


def _load(path: str):
    """The package's runner. The C++ loader directly: importing torch._inductor for its Python wrapper costs
    seconds; that wrapper where the binding's signature changed."""
    loader = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader is not None:
        try:
            return loader(path, "model", False, 1, -1)  # model name, single-threaded, runners, device index
        except TypeError:
            pass
    api = _api()
    if api is None:
        raise RuntimeError("this torch has no AOTInductor")
    return api[1](path).loader


def cached_graph(key: str) -> Graph | None:
    """The graph compiled before under `key` (this process or a package on disk), else None."""
    if key in _LOADED:
        return _LOADED[key]
    path = _path(key)
    if not os.path.isfile(path):
        return None
    try:
        graph = Graph(_load(path), path)
    except Exception as e:  # a truncated or foreign file: compile it again when asked
        logger.warning(
            "autolm: could not load the compiled graph %s (%s); it will be compiled again", path, e
        )
        return None
    _LOADED[key] = graph
    return graph


def export(module: torch.nn.Module, inputs: list[torch.Tensor], dynamic: list | None = None):
    """torch.export of `module` (forward(inputs: list)) for inputs like these, as compile_graph exports it."""
    # torch's own deprecation notices from inside export and inductor say nothing to our users
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.export.export(
            module, (inputs,), dynamic_shapes=(dynamic,) if dynamic else None, strict=False
        )


def compile_graph(
    key: str,
    module: torch.nn.Module,
    inputs: list[torch.Tensor],
    dynamic: list | None = None,
    inductor_configs: dict | None = None,
) -> Graph | None:
    """Compile `module` (forward(inputs: list)) for inputs like these, with the dynamic dimensions `dynamic`
    (one dict {dim: torch.export.Dim} or None per input), store it under `key` and load it. None, with a
    warning, where compiling fails (no C++ compiler, an op inductor cannot export); not retried in this
    process."""
    graph = cached_graph(key)
    if graph is not None or key in _LOADED:
        return graph
    api = _api()
    path = _path(key)
    try:
        if api is None:
            raise RuntimeError("this torch has no AOTInductor")
        with published_file(path) as tmp:
            exported = export(module, inputs, dynamic)
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                api[0](exported, package_path=tmp, inductor_configs=inductor_configs or {})
    except Exception as e:
        logger.warning(
            "autolm: compiling a graph ahead of time failed (%s: %s); the eager path runs instead",
            type(e).__name__,
            str(e).strip().splitlines()[0][:300] if str(e).strip() else "",
        )
        _LOADED[key] = None
        return None
    return cached_graph(key)


__all__ = ["Graph", "cached_graph", "compile_graph", "export", "graph_key"]
