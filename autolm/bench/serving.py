"""Serving throughput: `autolm serve` in its own process, driven by 1, 8 and 32 concurrent clients that
each ask for the same number of tokens (ignore_eos), as `autolm bench --serve` prints it."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_bench(model: str, clients: tuple[int, ...] = (1, 8, 32), tokens: int = 64, max_batch: int = 32,
                  threads: int | None = None, dtype: str = "auto") -> list[dict]:
    """One row per client count: aggregate generated tokens/s, and the median and worst request latency."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "autolm.cli", "serve", model, "--port", str(port), "--max-batch", str(max_batch),
           "--dtype", dtype] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for _ in range(1200):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"autolm serve exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.1)

        def ask(i: int) -> float:
            t = time.perf_counter()
            r = httpx.post(base + "/v1/chat/completions", timeout=600, json={
                "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == tokens
            return time.perf_counter() - t

        ask(0)  # warm-up
        for c in clients:
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                latencies = list(pool.map(ask, range(c)))
            wall = time.perf_counter() - t
            rows.append({"clients": c, "tokens_per_s": c * tokens / wall, "median_latency_s": statistics.median(latencies),
                         "max_latency_s": max(latencies)})
            print(f"serve {os.path.basename(os.path.normpath(model))}: {c:>2} clients x {tokens} tokens: "
                  f"{rows[-1]['tokens_per_s']:7.1f} tok/s in all, request latency median "
                  f"{rows[-1]['median_latency_s']:.2f} s, worst {rows[-1]['max_latency_s']:.2f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows
