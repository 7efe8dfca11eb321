"""One benchmark repetition in a fresh process: python -m autolm.bench.child ARGS_JSON START_TIME.

It imports the library under test by name (autolm, or transformers for comparison: autolm itself never
imports it), then measures import, load, peak RSS, time to first token, prefill and decode, and
prints one RESULT line of JSON."""

import json
import sys
import time

T0 = float(sys.argv[2])
args = json.loads(sys.argv[1])


def status(key):
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


def steps_after(model, context: int, n: int) -> float:
    """tok/s of n greedy one-token steps after a prompt of `context` tokens (the steps alone, as the llama.cpp
    child times its own: one token evaluated, the next one its logits' argmax)."""
    from autolm.step import decoder

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    cache = model.make_cache(1, context + n + 8)
    out = model(
        torch.randint(10, min(1000, vocab), (1, context), generator=g),
        past_key_values=cache,
        logits_to_keep=1,
    )
    token = out.logits[:, -1:].argmax(-1)
    step = decoder(model, cache)
    t = time.perf_counter()
    for _ in range(n):
        token = step(token, None, torch.tensor([[cache.length]]), cache).argmax(-1)[:, None]
    return n / (time.perf_counter() - t)


t = time.perf_counter()
# autolm starts as its command line does: torch imported with the collector paused, then frozen
if args["lib"] == "autolm":
    from autolm.malloc import keep_freed_memory, settle_imports

    keep_freed_memory()
    settle_imports()
import torch  # noqa: E402

torch.set_num_threads(args["threads"])
t_torch = time.perf_counter()
import importlib  # noqa: E402

lib = importlib.import_module(args["lib"])
AutoModelForCausalLM = lib.AutoModelForCausalLM  # autolm, or the library compared
t_import = time.perf_counter()
rss0 = status("VmRSS")
kw = {"dtype": getattr(torch, args["dtype"])}
if args.get("quantization"):
    kw["quantization"] = args["quantization"]
if args["lib"] == "autolm" and args.get(
    "gguf"
):  # the GGUF llama.cpp runs, its 4-bit blocks loaded as they are
    import os

    kw.update(gguf_file=os.path.basename(args["gguf"]), progress=False)
    args["model"] = os.path.dirname(os.path.abspath(args["gguf"]))
model = AutoModelForCausalLM.from_pretrained(args["model"], **kw)
model.eval()
t_load = time.perf_counter()
load_peak = status("VmHWM") - rss0
prompt = torch.arange(10, 42)[None]
with torch.inference_mode():
    model.generate(prompt, max_new_tokens=1, do_sample=False)
t_first = time.time() - T0
t_after_import = time.perf_counter() - t_import  # from_pretrained -> first token
first_peak = status("VmHWM")
res = {
    "import": t_import - t_torch,
    "load": t_load - t_import,
    "load_rss": load_peak,
    "ttft": t_first,
    "load_first": t_after_import,
    "first_token_rss": first_peak,
}
with torch.inference_mode():
    vocab = model.config.vocab_size
    long = torch.randint(
        10, min(1000, vocab), (1, args["prefill"]), generator=torch.Generator().manual_seed(0)
    )
    model(long, logits_to_keep=1)  # warm up: first calls at a new length set up kernels and buffers
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model(long, logits_to_keep=1)
        times.append(time.perf_counter() - t)
    res["prefill"] = args["prefill"] / sorted(times)[1]
    n = args["decode"]
    model.decode_mode = "eager"  # the eager step, even where compiled graphs for this model are cached
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    m = n  # without autolm's C++ kernels, eager GGUF blocks dequantize per token: 16 then
    if args.get("quantization") == "gguf":
        from autolm.kernels import native

        m = n if native.ready() else min(n, 16)
    res["decode_n"] = m
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=m, min_new_tokens=m, do_sample=False)
    res["decode"] = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
    if args.get(
        "aot"
    ):  # the one-token step compiled ahead of time, as the CLI runs it (loaded from the cache
        t = time.perf_counter()  # the page-cache warm-up run filled; that run paid the compile)
        model.decode_mode = "auto"
        compiled = model.precompile_decode()
        res["aot_load"] = time.perf_counter() - t
        if compiled:
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            t = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            res["decode_aot"] = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
            if args.get("context"):  # the compiled step
                res["decode_context"] = steps_after(model, args["context"], n // 2)
        model.decode_mode = "eager"
    if args.get("context") and "decode_context" not in res:  # the eager step
        res["decode_context"] = steps_after(model, args["context"], n // 2)
    if args.get("compile"):  # autolm's opt-in compiled decode step, measured after one compiling run
        importlib.import_module(args["lib"]).compile_decode(model)
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        res["decode_compiled"] = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
print("RESULT " + json.dumps(res))
