"""Serving throughput: `autolm serve` in its own process, driven by 1, 8 and 32 concurrent clients that
each ask for the same number of tokens (ignore_eos), as `autolm bench --serve` prints it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], wait_s: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`autolm serve ARGS --port P` in its own process until it answers /health: (http://127.0.0.1:P, process);
    terminated on exit. Its stderr goes to a file (a pipe nobody reads would fill and stall it), whose
    text `process.log()` returns."""
    import httpx

    port = _free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autolm.cli", "serve", *args, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        proc.log = lambda: (log.flush(), log.seek(0), log.read())[-1]
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    if httpx.get(base + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"autolm serve did not start: {proc.log()[-2000:]}")
                time.sleep(0.1)
            yield base, proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def serving_bench(
    model: str,
    clients: tuple[int, ...] = (1, 8, 32),
    tokens: int = 64,
    max_batch: int = 32,
    threads: int | None = None,
    dtype: str = "auto",
) -> list[dict]:
    """One row per client count: aggregate generated tokens/s, and the median and worst request latency."""
    import httpx

    args = [model, "--max-batch", str(max_batch), "--dtype", dtype] + (
        ["--threads", str(threads)] if threads else []
    )
    rows = []
    with running_server(args, wait_s=600) as (base, _):

        def ask(i: int) -> float:
            t = time.perf_counter()
            r = httpx.post(
                base + "/v1/chat/completions",
                timeout=600,
                json={
                    "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
                    "max_tokens": tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == tokens
            return time.perf_counter() - t

        ask(0)  # warm-up
        for c in clients:
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                latencies = list(pool.map(ask, range(c)))
            wall = time.perf_counter() - t
            rows.append(
                {
                    "clients": c,
                    "tokens_per_s": c * tokens / wall,
                    "median_latency_s": statistics.median(latencies),
                    "max_latency_s": max(latencies),
                }
            )
            print(
                f"serve {os.path.basename(os.path.normpath(model))}: {c:>2} clients x {tokens} tokens: "
                f"{rows[-1]['tokens_per_s']:7.1f} tok/s in all, request latency median "
                f"{rows[-1]['median_latency_s']:.2f} s, worst {rows[-1]['max_latency_s']:.2f} s",
                flush=True,
            )
    return rows
