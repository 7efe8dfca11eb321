"""Side-by-side benchmark of autolm and transformers: `autolm bench` (also `python bench/run.py`).

The measuring child is `autolm.bench.child`, run as its own process per repetition.

Every repetition is a fresh Python process that measures, in order: the import beyond
`import torch`, the load (warm page cache), peak RSS of the load, time from process start to the
first generated token, prefill tokens/s (a 512-token prompt, median of 3 calls after a warm-up
call) and decode tokens/s (batch 1, 128 greedy tokens). The parent takes medians and spreads and
prints ratios. transformers is only imported inside its own child processes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .moe import MOE_LABEL, active_expert_weights, moe_checkpoint, unused_expert_bytes
from .table import print_case

# llama.cpp's child lives outside the package (autolm never imports llama-cpp-python): in a source checkout.
LLAMACPP_CHILD = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "llamacpp_child.py"
)


@dataclass
class Case:
    label: str
    model: str
    dtype: str
    quantization: str | None = None
    libs: tuple[str, ...] = ("autolm", "transformers")
    compile: bool = True  # also measure autolm's compiled decode step (compile_decode)
    aot: bool = True  # also measure autolm's CPU decode step compiled ahead of time (precompile_decode)
    gguf: str | None = None  # the GGUF file llama.cpp runs, for the "llama.cpp" lib
    context: int = 0  # also time one-token steps after a prompt of this many tokens (GGUF rows)


def run_child(lib: str, case: Case, threads: int, prefill: int, decode: int) -> dict:
    args = {
        "lib": lib,
        "model": case.model,
        "dtype": case.dtype,
        "quantization": case.quantization,
        "threads": threads,
        "prefill": prefill,
        "decode": decode,
        "compile": lib == "autolm" and case.compile,
        "aot": lib == "autolm" and case.aot,
        "gguf": case.gguf,
        "context": case.context,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    # Python's default: the modules' bytecode cached once (as an install leaves it), not compiled in every start
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    child = [LLAMACPP_CHILD] if lib == "llama.cpp" else ["-m", "autolm.bench.child"]
    start = time.time()
    out = subprocess.run(
        [sys.executable, *child, json.dumps(args), repr(start)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{lib} on {case.label} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def memory_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Read bandwidth in bytes/s: the best of several sums over a buffer much larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(int(gib * 2**30) // 4)
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def matmul_rate(threads: int, dtype: str, m: int = 512, k: int = 2048, n: int = 2048) -> float:
    """FLOP/s of the faster of PyTorch's two CPU matmuls (F.linear, oneDNN) on an (m, k) x (k, n) product
    in this dtype: the rate a prefill's GEMMs can reach on this machine."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    x, w = torch.randn(m, k).to(dt), torch.randn(n, k).to(dt)
    kernels = [lambda: torch.nn.functional.linear(x, w)]
    if torch.backends.mkldnn.is_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    best = float("inf")
    for f in kernels:
        f()
        for _ in range(5):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def prefill_flops(model, tokens: int) -> float:
    """FLOPs of one prefill of this many tokens with logits for the last one only: 2 per weight of the
    decoder's matrices per token, plus causal attention (QK^T and PV over the keys each query sees)."""
    cfg = model.config
    layers = [model.get_submodule(b) for b in model.blocks() if b.startswith(model.layers_prefix + ".")]
    weights = sum(
        mod.in_features * mod.out_features
        for layer in layers
        for mod in layer.modules()
        if hasattr(mod, "in_features")
    ) + active_expert_weights(model)
    attention = (
        2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * tokens * (tokens + 1) / 2
    )
    return 2 * weights * tokens + attention + 2 * cfg.hidden_size * cfg.vocab_size


def checkpoint_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if f.endswith((".safetensors", ".bin"))
    )


def model_costs(case: Case, prefill: int) -> tuple[int, float]:
    """Bytes of weights one decode step reads (every matrix except the embedding table, a lookup),
    and the FLOPs of one prefill."""
    import autolm

    model = autolm.AutoModelForCausalLM.from_pretrained(
        case.model, dtype=case.dtype, quantization=case.quantization
    )
    from ..quant import memory_report

    total = memory_report(model)[0]
    emb = model.get_input_embeddings().weight
    tied = getattr(model.get_output_embeddings(), "weight", None) is emb
    unread = (0 if tied else emb.numel() * emb.element_size()) + unused_expert_bytes(model)
    return total - unread, prefill_flops(model, prefill)


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (max(xs) - min(xs)) / 2


def bench(
    cases: list[Case],
    reps: int = 3,
    threads: int | None = None,
    prefill: int = 512,
    decode: int = 128,
    out=sys.stdout,
) -> list[dict]:
    """Run every case, print a table per case, return the raw rows."""
    threads = threads or min(os.cpu_count() or 1, 8)
    bw = memory_bandwidth(threads)
    print(
        f"threads {threads}, memory read bandwidth {bw / 1e9:.1f} GB/s, {reps} fresh processes per row\n",
        file=out,
    )
    rows = []
    rates: dict[str, float] = {}
    for case in cases:
        ckpt = checkpoint_bytes(case.model)
        per_token, flops = model_costs(case, prefill)
        if case.dtype not in rates:
            rates[case.dtype] = matmul_rate(threads, case.dtype)
        peak = None if case.quantization else (flops, rates[case.dtype])
        results = {}
        for lib in case.libs:
            run_child(lib, case, threads, prefill, decode)  # warm the page cache
            runs = [run_child(lib, case, threads, prefill, decode) for _ in range(reps)]
            results[lib] = {k: _stats([r[k] for r in runs]) for k in runs[0]}
        rows.append(
            {
                "case": case.label,
                "checkpoint_bytes": ckpt,
                "bytes_per_token": per_token,
                "bandwidth": bw,
                "prefill_flops": flops,
                "matmul_rate": rates[case.dtype],
                "results": results,
            }
        )
        print_case(case, results, ckpt, per_token, bw, out, peak, prefill)
    return rows


def prepare_checkpoints(
    root: str, smol_dir: str, big: bool = True, gguf: str | None = None, moe: bool = True
) -> list[Case]:
    """SmolLM2 fp32 and bf16 directories, (big=True) a ~1B Llama-shaped bf16 sharded checkpoint and (moe=True) a
    Qwen3-MoE-shaped one (bench/moe.py). With
    llama-cpp-python installed and the GGUF given, the int4 row is against llama.cpp on that GGUF (autolm loads
    its 4-bit blocks into int4 layers as they are)."""
    import importlib.util

    import torch

    import autolm

    cases = [Case("SmolLM2-135M fp32", smol_dir, "float32")]
    bf16 = os.path.join(root, "smollm2-bf16")
    if not os.path.isdir(bf16):
        autolm.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.bfloat16).save_pretrained(bf16)
        autolm.AutoTokenizer.from_pretrained(smol_dir).save_pretrained(bf16)
    cases.append(Case("SmolLM2-135M bf16", bf16, "bfloat16"))
    cases.append(
        Case("SmolLM2-135M int8 (autolm only)", bf16, "bfloat16", "int8", ("autolm",), compile=False)
    )
    if gguf and importlib.util.find_spec("llama_cpp") is not None and os.path.isfile(LLAMACPP_CHILD):
        cases.append(
            Case(
                "SmolLM2-135M int4 vs llama.cpp Q4_1",
                bf16,
                "bfloat16",
                "int4",
                ("autolm", "llama.cpp"),
                compile=False,
                gguf=gguf,
            )
        )
    else:
        cases.append(
            Case("SmolLM2-135M int4 (autolm only)", bf16, "bfloat16", "int4", ("autolm",), compile=False)
        )
    if big:
        path = os.path.join(root, "llama-1b-bf16")
        if not os.path.isdir(path):
            _write_1b(path)
        cases.append(Case("Llama-shaped 1.1B bf16, sharded", path, "bfloat16"))
    if moe:
        cases.append(Case(MOE_LABEL, moe_checkpoint(root), "bfloat16"))
    return cases


def _write_1b(path: str) -> None:
    """A random ~1.1B-parameter Llama written by transformers itself (it must be installed)."""
    code = (
        "import sys, torch, transformers\n"
        "cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,"
        " num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)\n"
        "torch.manual_seed(0)\n"
        "with torch.device('meta'):\n    m = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "m = m.to_empty(device='cpu').to(torch.bfloat16)\n"
        "for p in m.parameters():\n    torch.nn.init.normal_(p, std=0.02)\n"
        "m.save_pretrained(sys.argv[1], max_shard_size='1GB')\n"
    )
    subprocess.run([sys.executable, "-c", code, path], check=True)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="autolm bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default=None, help="benchmark one checkpoint directory instead of the standard set"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-1b", action="store_true", help="skip the ~1B checkpoint (written once, 2.2 GB)")
    p.add_argument(
        "--no-moe", action="store_true", help="skip the mixture-of-experts checkpoint (written once)"
    )
    p.add_argument(
        "--work", default=None, help="where benchmark checkpoints are written (default $AUTOLM_HOME/bench)"
    )
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip autolm's compiled decode step (it costs each autolm process a compile)",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="skip autolm's CPU decode step compiled ahead of time (the first run compiles it, once)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="serving throughput instead: autolm serve with 1, 8 and 32 concurrent clients",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="where an eager decode step's time goes, by kernel (fp32, bf16, int8, int4)",
    )
    p.add_argument(
        "--speculative",
        action="store_true",
        help="speculative decoding against plain decoding on SmolLM2: prompt lookup, and its GGUF as a draft",
    )
    return p


def _standard_cases(args) -> list[Case]:
    if args.model:
        return [Case(os.path.basename(os.path.normpath(args.model)), args.model, args.dtype)]
    from .._util import autolm_home
    from ..convert import default_gguf_path, default_model_dir

    work = args.work or os.path.join(autolm_home(), "bench")
    os.makedirs(work, exist_ok=True)
    return prepare_checkpoints(
        work, default_model_dir("float32"), big=not args.no_1b, gguf=default_gguf_path(), moe=not args.no_moe
    )


def _rows(args) -> list[dict] | None:
    """The rows of the mode the arguments ask for (None: a mode that only prints)."""
    from ..convert import default_model_dir

    if args.speculative:
        from .speculative import speculative_bench

        return speculative_bench(threads=args.threads, reps=args.reps)
    if args.profile:
        from .profile import profile_decode

        profile_decode(args.model or default_model_dir("float32"), threads=args.threads)
        return None
    if args.serve:
        from .serving import serving_bench

        dtype = args.dtype if args.model else "auto"
        return serving_bench(args.model or default_model_dir(), threads=args.threads, dtype=dtype)
    cases = _standard_cases(args)
    for case in cases:
        case.compile = case.compile and not args.no_compile
        case.aot = not args.eager
    return bench(cases, reps=args.reps, threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows = _rows(args)
    if args.json and rows is not None:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
