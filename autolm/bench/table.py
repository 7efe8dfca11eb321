"""The table `autolm bench` prints for one case: each metric for autolm and the library it is compared with,
the ratio, and the share of the machine's bandwidth and matmul rate autolm reaches."""

from __future__ import annotations

import os


def print_case(
    case,
    results: dict,
    ckpt: int,
    per_token: int,
    bw: float,
    out,
    peak: tuple[float, float] | None = None,
    prefill: int = 512,
) -> None:
    other = next((lib for lib in case.libs if lib != "autolm"), "transformers")
    a, t = results.get("autolm"), results.get(other)
    print(
        f"### {case.label} (checkpoint {ckpt / 1e6:.0f} MB, {per_token / 1e6:.0f} MB of weights read per token)",
        file=out,
    )
    if other == "llama.cpp":
        print(f"(llama.cpp runs {os.path.basename(case.gguf)} itself)", file=out)
    print(f"| metric | autolm | {other} | ratio |", file=out)
    print("|---|---|---|---|", file=out)
    metrics = [
        ("import s (beyond torch)", "import", 1, "{:.3f}", True),
        ("load s", "load", 1, "{:.2f}", True),
        ("peak RSS of load / checkpoint", "load_rss", 1 / ckpt, "{:.2f}", True),
        ("process start -> first token s", "ttft", 1, "{:.2f}", True),
        ("peak RSS to first token MB", "first_token_rss", 1e-6, "{:.0f}", True),
        ("prefill tok/s (512)", "prefill", 1, "{:.0f}", False),
        ("decode tok/s (128)", "decode", 1, "{:.1f}", False),
    ]
    if a and "decode_aot" in a:  # compared with the other library's plain decode
        metrics.append(
            (
                "decode tok/s (128), autolm compiled ahead of time",
                ("decode_aot", "decode"),
                1,
                "{:.1f}",
                False,
            )
        )
        metrics.append(("load the compiled step s (autolm)", "aot_load", 1, "{:.3f}", True))
    if a and "decode_compiled" in a:  # compared with the other library's plain decode
        metrics.append(
            ("decode tok/s (128), autolm compile_decode", ("decode_compiled", "decode"), 1, "{:.1f}", False)
        )
    for name, key, scale, fmt, _lower_better in metrics:
        mine, theirs = key if isinstance(key, tuple) else (key, key)

        def cell(r, k, fmt=fmt, scale=scale):
            if r is None or k not in r:
                return "n/a"
            m, s = r[k]
            return (fmt + " ± " + fmt).format(m * scale, s * scale)

        ratio = "n/a"
        if a and t and mine in a and theirs in t and a[mine][0] and t[theirs][0]:
            ratio = f"{a[mine][0] / t[theirs][0]:.2f}x"
        print(f"| {name} | {cell(a, mine)} | {cell(t, mine)} | {ratio} |", file=out)
    if a:
        for key, what in (
            ("decode", "decode"),
            ("decode_aot", "decode compiled ahead of time"),
            ("decode_compiled", "compiled decode"),
        ):
            if key in a:
                frac = a[key][0] * per_token / bw
                print(
                    f"\nautolm {what} reads {a[key][0] * per_token / 1e9:.1f} GB/s of weights: {frac:.0%} of the "
                    f"measured {bw / 1e9:.1f} GB/s.",
                    file=out,
                )
        if peak:
            flops, rate = peak
            done = a["prefill"][0] / prefill * flops
            print(
                f"\nautolm prefill computes {done / 1e9:.0f} GFLOP/s: {done / rate:.0%} of the {rate / 1e9:.0f} GFLOP/s "
                f"of a 512x2048x2048 {case.dtype} matmul here.",
                file=out,
            )
        print(file=out)
