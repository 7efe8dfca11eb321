"""Where a decode step's time goes: `autolm bench --profile` runs batch-1 eager decode steps of a model
(fp32, bf16, int8, int4), through the general forward and through the one-token step (autolm.step), under
torch.profiler and prints the wall time per token, the ops per token and the kernels that take most of it."""

from __future__ import annotations

import time


def profile_decode(
    model_dir: str,
    configs=(("float32", None), ("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "int4")),
    prompt: int = 64,
    steps: int = 64,
    threads: int | None = None,
    top: int = 8,
) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..load import from_pretrained
    from ..step import decoder

    if threads:
        torch.set_num_threads(threads)
    rows = []
    for dtype, quantization in configs:
        model = from_pretrained(model_dir, dtype=dtype, quantization=quantization)
        label = f"{quantization or dtype}"
        for mode in ("forward", "eager"):  # the general forward, then the eager one-token step
            model.decode_mode = mode
            with torch.inference_mode():
                cache = model.make_cache(1, prompt + steps + 30)
                out = model(torch.ones(1, prompt, dtype=torch.long), past_key_values=cache)
                token = out.logits[:, -1:].argmax(-1)
                decode = decoder(model, cache)

                def step(cache=cache, decode=decode):
                    nonlocal token
                    token = decode(token, None, torch.tensor([[cache.length]]), cache).argmax(-1)[:, None]

                for _ in range(8):
                    step()
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                wall = (time.perf_counter() - t) / steps
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(20):
                        step()
            events = prof.key_averages()
            kernels = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
            ops = sum(e.count for e in events if e.key.startswith(("aten::", "mkldnn::"))) / 20
            name = f"{label} {'one-token step' if mode == 'eager' else 'general forward'}"
            print(f"{name}: {wall * 1e3:.2f} ms/token ({1 / wall:.1f} tok/s), {ops:.0f} aten ops per token")
            for e in kernels:
                print(
                    f"  {e.key[:48]:48s} {e.self_cpu_time_total / 20 / 1e3:7.3f} ms/token {e.count / 20:7.1f} calls"
                )
            rows.append(
                {
                    "config": label,
                    "mode": mode,
                    "ms_per_token": wall * 1e3,
                    "ops_per_token": ops,
                    "kernels": {e.key: e.self_cpu_time_total / 20 / 1e3 for e in kernels},
                }
            )
    return rows
