"""Two builds of autolm's GGUF kernel in one process: python bench/kernel_ab.py REF [--threads N].

Builds autolm/kernels/ggml_mm.cpp (with its headers) as the work tree has it and as git REF has it, each under an
op namespace of its own, loads both into one process and times their one-row products (decode's) over random
blocks of each type, the two builds alternating, best of 15, after checking that both give the same numbers. On a
shared machine whose speed moves 20-30% with the hour, separate processes cannot tell a 10% change from noise;
this can (the types a change leaves alone are the control). x86 with AVX-512 VNNI or AVX2; needs git and a C++
compiler. About a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["ggml_mm.cpp", "ggml_avx512.h", "ggml_avx2.h", "ggml_amx.h"]
# ggml type: (columns per block, bytes per block, offsets of its fp16 scales), and (rows, columns) to time
TYPES = {
    "Q4_0": (2, 32, 18, [0], (24576, 2048)),
    "Q4_1": (3, 32, 20, [0, 2], (49152, 576)),
    "Q5_0": (6, 32, 22, [0], (46080, 576)),
    "Q8_0": (8, 32, 34, [0], (49152, 576)),
    "Q4_K": (12, 256, 144, [0, 2], (17280, 1536)),
    "Q6_K": (14, 256, 210, [208], (49152, 1024)),
}


def build(folder: str, namespace: str) -> str:
    """folder's ggml_mm.cpp compiled as native.py compiles it, its ops registered under `namespace`."""
    src = os.path.join(folder, "ggml_mm.cpp")
    with open(src) as f:
        text = f.read()
    text = text.replace("TORCH_LIBRARY(autolm,", f"TORCH_LIBRARY({namespace},")
    with open(src, "w") as f:
        f.write(text.replace("TORCH_LIBRARY_IMPL(autolm,", f"TORCH_LIBRARY_IMPL({namespace},"))
    base = os.path.dirname(torch.__file__)
    lib, out = os.path.join(base, "lib"), os.path.join(folder, f"{namespace}.so")
    subprocess.run(
        [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-std=c++20", "-fPIC", "-fopenmp", "-shared",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-I", os.path.join(base, "include"),
         "-I", os.path.join(base, "include", "torch", "csrc", "api", "include"), src, "-o", out, "-L", lib,
         f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"],
        check=True,
    )  # fmt: skip
    return out


def sources(ref: str | None, folder: str) -> str:
    """The kernel's sources in `folder`: the work tree's (ref None) or git ref's."""
    os.makedirs(folder)
    for name in SOURCES:
        path = f"autolm/kernels/{name}"
        if ref is None:
            with open(os.path.join(ROOT, path), "rb") as f:
                data = f.read()
        else:
            data = subprocess.run(
                ["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, check=True
            ).stdout
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


def blocks(kind: tuple, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks of a type (scales 0.01) and one row of x."""
    _, columns, size, scales, (rows, K) = kind
    raw = torch.randint(0, 256, (rows, K // columns, size), dtype=torch.uint8, generator=generator)
    half = torch.from_numpy(np.frombuffer(np.float16(0.01).tobytes(), np.uint8).copy())
    for at in scales:
        raw[:, :, at : at + 2] = half
    return raw.reshape(rows, -1).contiguous(), torch.randn(1, K, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "ref", help="the git ref to compare the work tree's kernel with (HEAD, HEAD~1, a commit)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for ref, namespace in ((args.ref, "autolm_ref"), (None, "autolm_new")):
            torch.ops.load_library(build(sources(ref, os.path.join(tmp, namespace)), namespace))
    torch.set_num_threads(args.threads)
    ops = {"ref": torch.ops.autolm_ref.ggml_mm, "new": torch.ops.autolm_new.ggml_mm}
    print(f"one row of x, {args.threads} threads, weights streamed from memory: GB/s of blocks, best of 15")
    print(f"| type | rows x columns | {args.ref} | work tree | time new / ref |\n|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, kind in TYPES.items():
        raw, x = blocks(kind, g)
        if not torch.equal(ops["ref"](x, raw, kind[0], 0), ops["new"](x, raw, kind[0], 0)):
            print(f"| {name} | the two builds' products differ |")
        best = dict.fromkeys(ops, float("inf"))
        for _ in range(15):
            for key, op in ops.items():
                t = time.perf_counter()
                for _ in range(10):
                    op(x, raw, kind[0], 0)
                best[key] = min(best[key], (time.perf_counter() - t) / 10)
        rate = {k: raw.numel() / v / 1e9 for k, v in best.items()}
        rows, K = kind[4]
        print(
            f"| {name} | {rows} x {K} | {rate['ref']:.1f} | {rate['new']:.1f} | {best['new'] / best['ref']:.3f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
