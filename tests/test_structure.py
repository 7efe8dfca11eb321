"""The package's shape: imports run one way (no cycle, counting imports inside functions), no module over
400 lines, nothing imports the test-only oracles, and a library call changes no process-wide setting."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

import autolm

ROOT = os.path.dirname(autolm.__file__)


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the autolm modules it imports anywhere in its file (inside functions too). Importing
    a.b.c also runs a and a.b (package __init__ files), so those count as imported as well."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                while t:  # the module and every package above it run
                    if t != mod and not mod.startswith(t + "."):
                        graph[mod].add(t)
                    t = t.rpartition(".")[0]
    return graph


def test_imports_have_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "autolm.models.base" in graph and "autolm.generation" in graph["autolm.models.base"]
    # the building blocks and the fast paths derived from them know no family
    for low in ("autolm.nn", "autolm.step", "autolm.kernels"):
        assert not any(m.startswith("autolm.models") for m in graph[low]), (low, graph[low])


@pytest.mark.parametrize("module", ["autolm.nn", "autolm.kernels", "autolm.gguf_writer", "autolm.sources"])
def test_a_low_module_imports_first_in_a_fresh_process(module):
    """Importing a building block first (before autolm.models) works: autolm's lazy names never import the families
    for a submodule's name (a cycle through `from .. import kernels`)."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=300)


def test_no_module_over_400_lines_and_no_oracle_imports():
    for mod, path in _modules().items():
        text = open(path).read()
        assert text.count("\n") <= 400, f"{mod} has {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for n in names:
                assert n.split(".")[0] not in ("transformers", "peft", "langchain", "llama_cpp"), (mod, n)


def test_no_function_over_80_lines():
    long = []
    for mod, path in _modules().items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert not long, long


def test_from_pretrained_changes_no_process_wide_setting(checkpoint):
    """glibc's malloc settings and Python's collector stay as they were (the command line opts in to
    changing them)."""
    directory, _ = checkpoint("qwen2_tied_bias")
    code = (
        "import sys, torch, autolm\n"
        "before = (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())\n"
        "autolm.from_pretrained(sys.argv[1])\n"
        "import autolm.malloc as m\n"
        "assert m.keep_freed_memory.cache_info().currsize == 0, 'malloc tuned by a library call'\n"
        "import gc\n"
        "assert gc.get_freeze_count() == 0, 'objects frozen by a library call'\n"
        "assert gc.isenabled(), 'the collector left paused by the first use'\n"
        "assert before == (torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())\n"
    )
    subprocess.run([sys.executable, "-c", code, directory], check=True, timeout=300)


def test_first_use_pauses_the_collector_only_meanwhile():
    """autolm's first use imports its model code with the collector paused and leaves it as it was: on where it
    was on, off where the user had turned it off."""
    code = (
        "import gc, sys, autolm\n"
        "import autolm.malloc as m\n"
        "seen = []  # how many modules were imported at each collection's start\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and seen.append(len(sys.modules)))\n"
        "before = len(sys.modules)\n"
        "autolm.AutoModelForCausalLM\n"
        "after = len(sys.modules)\n"
        "assert after > before + 100 and gc.isenabled()\n"
        "assert not [n for n in seen if before < n < after], (before, after, seen)\n"
        "gc.disable()\n"
        "autolm.AutoTokenizer\n"
        "assert not gc.isenabled()\n"
        "gc.enable()\n"
        "with m.collector_paused():\n"
        "    assert not gc.isenabled()\n"
        "assert gc.isenabled()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
