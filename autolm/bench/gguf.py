"""GGUF files as llama.cpp runs them: `python -m autolm.bench.gguf FILE.gguf [FILE.gguf ...]`.

For each file, autolm keeping its blocks (quantization="gguf", its CPU decode step compiled ahead of time) against
llama.cpp (llama-cpp-python, bench/llamacpp_child.py) on the same file, each repetition a fresh process measured
as `autolm bench` measures: load, peak RSS, process start -> first token (and from the load on, the imports
done), prefill and decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from . import Case, _stats, memory_bandwidth, run_child

_ROWS = [  # (label, key, scale, format); the compiled decode is compared with llama.cpp's decode
    ("load s", "load", 1, "{:.2f}"),
    ("process start -> first token s", "ttft", 1, "{:.2f}"),
    ("load -> first token s (imports done)", "load_first", 1, "{:.2f}"),
    ("peak RSS to first token MB", "first_token_rss", 1e-6, "{:.0f}"),
    ("prefill tok/s (512)", "prefill", 1, "{:.0f}"),
    ("decode tok/s, eager ({n})", "decode", 1, "{:.1f}"),
    ("decode tok/s (128), compiled ahead of time", "decode_aot", 1, "{:.1f}"),
    ("one-token steps/s after {context} tokens, compiled (llama.cpp's own)", "decode_context", 1, "{:.1f}"),
]


def print_rows(label: str, results: dict, size: int, per_token: int, out, context: int = 0) -> None:
    """One table: each metric for autolm and llama.cpp (its decode against both of autolm's), and the ratio."""
    a, b = results["autolm"], results["llama.cpp"]
    print(
        f"### {label} ({size / 1e6:.0f} MB file, {per_token / 1e6:.0f} MB of weights read per token)",
        file=out,
    )
    print("| metric | autolm | llama.cpp | ratio |\n|---|---|---|---|", file=out)
    for name, key, scale, fmt in _ROWS:
        if key not in a:
            continue
        (x, dx), (y, dy) = a[key], b["decode" if key == "decode_aot" else key]
        name = name.format(n=int(a.get("decode_n", (128, 0))[0]), context=context)
        ours, theirs = (f"{fmt.format(v * scale)} ± {fmt.format(d * scale)}" for v, d in ((x, dx), (y, dy)))
        print(f"| {name} | {ours} | {theirs} | {x / y:.2f}x |", file=out)
    print(file=out)


def kept_bytes(path: str) -> int:
    """Bytes of weights one decode step reads with the file's blocks kept (every matrix but the embeddings and
    the experts a token does not use)."""
    import autolm

    from .moe import unused_expert_bytes

    model = autolm.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), quantization="gguf", progress=False
    )
    emb = model.model.embed_tokens
    skip = (
        {id(t) for t in emb.buffers()} if model.lm_head.weight is not getattr(emb, "blocks", None) else set()
    )
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in skip}
    return sum(t.numel() * t.element_size() for t in tensors.values()) - unused_expert_bytes(model)


def gguf_bench(
    files: list[str], reps: int = 3, threads: int = 2, out=sys.stdout, context: int = 0
) -> list[dict]:
    bw = memory_bandwidth(threads)
    print(
        f"threads {threads}, memory read bandwidth {bw / 1e9:.1f} GB/s, {reps} fresh processes per row\n",
        file=out,
    )
    rows = []
    for path in files:
        path = os.path.abspath(path)
        with (
            tempfile.TemporaryDirectory() as folder
        ):  # the file alone in a folder: its size is the checkpoint's
            os.symlink(path, os.path.join(folder, os.path.basename(path)))
            case = Case(f"{os.path.basename(path)}: autolm keeping its blocks vs llama.cpp", folder, "float32",
                        "gguf", ("autolm", "llama.cpp"), compile=False, gguf=path, context=context)  # fmt: skip
            for lib in case.libs:  # warm the page cache (and compile autolm's step once)
                run_child(lib, case, threads, 512, 128)
            # the libraries' runs alternate, so a machine that gets busier or quieter moves both alike
            runs = {lib: [] for lib in case.libs}
            for _ in range(reps):
                for lib in case.libs:
                    runs[lib].append(run_child(lib, case, threads, 512, 128))
            results = {lib: {k: _stats([r[k] for r in rs]) for k in rs[0]} for lib, rs in runs.items()}
            size, per_token = os.path.getsize(path), kept_bytes(path)
            print_rows(case.label, results, size, per_token, out, context)
            rows.append({"case": case.label, "checkpoint_bytes": size, "bytes_per_token": per_token,
                         "results": results})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autolm.bench.gguf", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="GGUF files")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the raw rows here")
    p.add_argument(
        "--context", type=int, default=0, help="also time one-token steps after a prompt this long"
    )
    args = p.parse_args(argv)
    rows = gguf_bench(args.files, args.reps, args.threads, context=args.context)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
