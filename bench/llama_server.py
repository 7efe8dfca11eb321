"""llama.cpp's own server on the default model's GGUF, driven as `autolm bench --serve` drives autolm serve:
`python bench/llama_server.py PATH/TO/llama-server` (built from llama-cpp-python's source distribution,
vendor/llama.cpp: cmake -B build && cmake --build build --target llama-server). An anchor, never a dependency."""

import concurrent.futures
import socket
import statistics
import subprocess
import sys
import time

import httpx

from autolm.convert import default_gguf_path

BIN = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
proc = subprocess.Popen(
    [
        BIN,
        "-m",
        default_gguf_path(),
        "-np",
        "8",
        "-t",
        "2",
        "-c",
        "8192",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
base = f"http://127.0.0.1:{port}"
for _ in range(600):
    try:
        if httpx.get(base + "/health").status_code == 200:
            break
    except Exception:
        pass
    time.sleep(0.2)
tokens = 64


def ask(i):
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


try:
    ask(0)
    for c in (1, 8, 32):
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
            lat = list(pool.map(ask, range(c)))
        wall = time.perf_counter() - t
        print(
            f"llama-server -np 8: {c:>2} clients x {tokens} tokens: {c * tokens / wall:7.1f} tok/s in all, request latency median {statistics.median(lat):.2f} s, worst {max(lat):.2f} s",
            flush=True,
        )
finally:
    proc.terminate()
    proc.wait()
