"""autolm's own C++ kernels (ggml_mm.cpp: matmuls on llama.cpp's blocks with integer dot products, or from 16 rows
of x on, on a CPU with AMX, with the weight decoded to bf16 for the tile unit; cpu_ops.cpp:
the eager step's RMSNorm, RoPE and one-token attention in one call each), compiled once per machine with its C++
compiler and loaded as torch.ops.autolm.

The library is built for the machine's own instruction set (-march=native): with AVX-512 VNNI where the CPU has
it (ggml_avx512.h), else with AVX2, FMA and F16C (ggml_avx2.h); on other CPUs, and without a compiler, the other
kernels of kernels.ggml compute these types. AUTOLM_NATIVE=avx2 builds the AVX2 kernels on any CPU that has
those (x86-64-v3), as on a machine without AVX-512; AUTOLM_NATIVE=avxvnni the same with AVX-VNNI (as on Intel's
cores without AVX-512 from Alder Lake on); AUTOLM_NATIVE=avx512 the AVX-512 kernels without AMX's tiles;
AUTOLM_NATIVE=0 turns the library off. It is kept under
`$AUTOLM_HOME/kernels/<key>.so`, the key covering the sources, the -march, the torch version and the CPU (as
the compiled graphs' keys do: kernels.aot), written through a temporary file and a rename; the first use builds
it (about ten seconds), later processes load it (milliseconds). The matmuls on GGUF blocks build it where it is
not there; the eager step's small ops only use it once it is built (`ready`: no stall in a plain model's first
generation), as `precompile_decode()` and the command line's first run build it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import torch

from .._util import autolm_home, published_file
from .aot import _isa

logger = logging.getLogger("autolm")

# ggml types computed here -> (columns per weight block, columns per scale of the int8 activations):
# Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL MXFP4 (32, 32), Q2_K to Q6_K (256, 256), IQ4_XS (256, 32: scales per 32 weights)
KINDS = {
    **dict.fromkeys((2, 3, 6, 7, 8, 20, 39), (32, 32)),
    **dict.fromkeys((10, 11, 12, 13, 14), (256, 256)),
    23: (256, 32),
}
_SOURCES = [os.path.join(os.path.dirname(__file__), name) for name in ("ggml_mm.cpp", "cpu_ops.cpp")]
_HEADERS = [
    os.path.join(os.path.dirname(__file__), name) for name in ("ggml_avx512.h", "ggml_amx.h", "ggml_avx2.h")
]
_AVX2 = {"avx2", "fma", "f16c"}  # every CPU with AVX-512 VNNI has these too
_STATE: dict[str, bool] = {}
_PATHS: dict[tuple[str, str], str] = {}
_MISSING: set[tuple[str | None, str]] = (
    set()
)  # (AUTOLM_NATIVE, $AUTOLM_HOME) where ready() found no library  # (-march, $AUTOLM_HOME) -> the library's path
_OP: list = []  # torch.ops.autolm.ggml_mm, ggml_mm_id, rms_norm, decode_attention and rotary, looked up once
_LOCK = threading.Lock()


@functools.cache
def cpu_info(field: str) -> str:
    """The value of the first /proc/cpuinfo line naming `field` ("flags", "vendor_id"), read once; "" where there
    is none."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""
    return line.split(":", 1)[-1].strip()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags, read once (ready() asks for every eager op)."""
    return frozenset(cpu_info("flags").split())


def available() -> bool:
    """Whether torch.ops.autolm.ggml_mm is loaded (building it on first use); False, with a warning where
    building fails, or quietly where the CPU has neither AVX-512 VNNI nor AVX2 (see march) or AUTOLM_NATIVE=0."""
    if "ok" in _STATE:  # every matmul asks: no lock once decided
        return _STATE["ok"]
    with _LOCK:  # loading the library twice in one process would abort it (one registration per namespace)
        if "ok" not in _STATE:
            _STATE["ok"] = False
            arch = march()
            if arch is not None:
                try:
                    torch.ops.load_library(_build(arch))
                    ops = torch.ops.autolm
                    _OP.extend(
                        op.default
                        for op in (
                            ops.ggml_mm,
                            ops.ggml_mm_id,
                            ops.rms_norm,
                            ops.decode_attention,
                            ops.rotary,
                        )
                    )
                    _STATE["ok"] = True
                except Exception as e:
                    logger.warning(
                        "autolm: building its C++ kernels failed (%s); slower kernels run instead", e
                    )
        return _STATE["ok"]


def ready() -> bool:
    """Whether the library is loaded, or built for this machine already (then loaded now); never builds it. A
    library missing is remembered per AUTOLM_NATIVE and home (every eager op asks; one built by another process
    meanwhile serves the next process)."""
    if "ok" in _STATE:
        return _STATE["ok"]
    key = (os.environ.get("AUTOLM_NATIVE"), autolm_home())
    if key not in _MISSING:
        arch = march()
        if arch is not None and os.path.isfile(_library(arch)):
            return available()
        _MISSING.add(key)
    return False


def forget_missing() -> None:
    """Look for the library on disk again at the next ready(): another process (a background compile) may have
    built it since."""
    _MISSING.clear()


def computes(kind: int, columns: int) -> bool:
    """Whether a weight of ggml type `kind` with `columns` columns is computed here."""
    return kind in KINDS and columns % KINDS[kind][0] == 0 and available()


def march() -> str | None:
    """The compiler's -march for this CPU and AUTOLM_NATIVE: native (AVX-512 VNNI, or AVX2, FMA and F16C; AMX's
    tile unit where the CPU has it), native+no-amx-tile (AUTOLM_NATIVE=avx512: the AVX-512 kernels alone),
    x86-64-v3 (AUTOLM_NATIVE=avx2: the AVX2 kernels), x86-64-v3+avxvnni (AUTOLM_NATIVE=avxvnni: those with
    AVX-VNNI, where the CPU has it), or None (AUTOLM_NATIVE=0, or a CPU with neither)."""
    choice, flags = os.environ.get("AUTOLM_NATIVE", "1"), _cpu_flags()
    if choice == "0" or not _AVX2.issubset(flags):
        return None
    if choice == "avx512":
        return "native+no-amx-tile"
    if choice not in ("avx2", "avxvnni"):
        return "native"
    return "x86-64-v3+avxvnni" if choice == "avxvnni" and "avx_vnni" in flags else "x86-64-v3"


def _library(arch: str) -> str:
    """The library's path for `arch`: under $AUTOLM_HOME/kernels, keyed by the sources, the -march, the torch
    version and the CPU (worked out once per process and home)."""
    home = autolm_home()
    if (arch, home) not in _PATHS:
        sources = []
        for path in (*_SOURCES, *_HEADERS):
            with open(path, "rb") as f:
                sources.append(f.read())
        key = hashlib.sha256(repr((sources, arch, torch.__version__, _isa())).encode()).hexdigest()[:32]
        _PATHS[arch, home] = os.path.join(home, "kernels", f"ggml_mm-{key}.so")
    return _PATHS[arch, home]


def _build(arch: str) -> str:
    """The library's path for `arch` (-march, then + instruction sets added: x86-64-v3+avxvnni), compiling it
    first where it is not there yet."""
    path = _library(arch)
    if os.path.isfile(path):
        return path
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, or $CXX) on the PATH")
    logger.info("autolm: building its C++ kernels for this machine (once, about 10 s): %s", path)
    base = os.path.dirname(torch.__file__)
    lib = os.path.join(base, "lib")
    flags = [
        "-O3", f"-march={arch.split('+')[0]}", *(f"-m{extra}" for extra in arch.split("+")[1:]), "-std=c++20",
        "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-I", os.path.join(base, "include"), "-I", os.path.join(base, "include", "torch", "csrc", "api", "include"),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder, published_file(path, 0o755) as tmp:
        objects = [os.path.join(folder, f"{i}.o") for i in range(len(_SOURCES))]
        # the sources at once (most of each one's time is parsing torch's headers: 20 -> 10 s on 2 cores), then
        # linked
        _run(compiler, [["-c", src, "-o", obj, *flags] for src, obj in zip(_SOURCES, objects)])
        link = [*objects, "-o", tmp, "-shared", "-fopenmp", "-L", lib, f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu",
                "-ltorch"]  # fmt: skip
        _run(compiler, [link])
    return path


def _run(compiler: str, commands: list[list[str]]) -> None:
    """The compiler's commands, all at once; RuntimeError with the first failure's message."""
    procs = [
        subprocess.Popen([compiler, *c], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        messages = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()  # a timeout: the others too
    failed = [m for p, m in zip(procs, messages) if p.returncode]
    if failed:
        raise RuntimeError(f"{compiler} failed: {failed[0].strip()[-500:]}")


def ggml_mm(x: torch.Tensor, raw: torch.Tensor, kind: int, heads: int = 0) -> torch.Tensor:
    """x @ W.T for W's rows of `kind` blocks, raw uint8 (N, bytes per row); x's dtype and leading dimensions.
    `heads` > 0: W's rows are llama.cpp's permuted q/k rows of that many heads, the outputs come in the model's
    order (as ggml.llama_qk_order gives them)."""
    return _OP[0](x, raw, kind, heads)


def ggml_mm_id(x: torch.Tensor, raw: torch.Tensor, ids: torch.Tensor, kind: int) -> torch.Tensor:
    """Each row of x (..., K) times its own expert's weight: raw uint8 (experts, N, bytes per row), ids int64 one
    per row of x -> (..., N) (llama.cpp's mul_mat_id)."""
    return _OP[1](x, raw, ids, kind)


def tile_rows() -> int:
    """From how many rows of x ggml_mm computes on AMX's tile unit, in bf16 (the weight decoded to bf16, x rounded
    to bf16, float32 sums), where this CPU, the build and the OS allow it; 0 where not (then int8 activations, as
    llama.cpp's, for any number of rows)."""
    return torch.ops.autolm.ggml_tile_rows() if available() else 0


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dimension, in fp32 whatever x's float dtype."""
    return _OP[2](x, eps)


def decode_attention(
    q, keys, values, first: int, span: int, scale: float, softcap, sinks, starts
) -> torch.Tensor:
    """One query per row and head, q (B, nh, 1, hd), over the cache's slots first .. first + span (keys, values
    (B, n_kv, capacity, hd)); see kernels.attention.decode_attention. (B, 1, nh, hd) in q's dtype."""
    return _OP[3](q, keys, values, first, span, scale, softcap or 0.0, sinks, starts)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half) of x (B, H, T, hd) by tables broadcasting to (B, H, T, rotary_dim), as nn.rope's
    apply_rotary computes it in x's dtype; contiguous."""
    return _OP[4](x, cos, sin)


__all__ = [
    "KINDS",
    "available",
    "computes",
    "decode_attention",
    "forget_missing",
    "ggml_mm",
    "ggml_mm_id",
    "ready",
    "rms_norm",
    "rotary",
    "tile_rows",
]
