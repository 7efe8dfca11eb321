"""One llama.cpp repetition for `autolm bench`, in a fresh process (python bench/llamacpp_child.py ARGS START):
llama-cpp-python (optional, never a dependency of autolm, and imported only here, outside the package)
on the GGUF file itself, measured as autolm's child measures: import, load, peak RSS, process start ->
first token, prefill and decode."""

import json
import sys
import time

T0 = float(sys.argv[2])
args = json.loads(sys.argv[1])


def status(key):
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


t = time.perf_counter()
import llama_cpp  # noqa: E402

t_import = time.perf_counter()
rss0 = status("VmRSS")
llm = llama_cpp.Llama(
    model_path=args["gguf"],
    n_threads=args["threads"],
    n_threads_batch=args["threads"],
    n_ctx=max(1024, args["prefill"] + args["decode"] + 64),
    n_batch=512,
    verbose=False,
)
t_load = time.perf_counter()
load_peak = status("VmHWM") - rss0
prompt = list(range(10, 42))


def greedy(tokens, n):
    llm.reset()
    out = []
    for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) >= n:
            break
    return out


greedy(prompt, 1)
t_first = time.time() - T0
t_after_import = time.perf_counter() - t_import  # Llama() -> first token
res = {
    "import": t_import - t,
    "load": t_load - t_import,
    "load_rss": load_peak,
    "ttft": t_first,
    "load_first": t_after_import,
    "first_token_rss": status("VmHWM"),
}
import random  # noqa: E402

rng = random.Random(0)
long = [rng.randrange(10, min(1000, llm.n_vocab())) for _ in range(args["prefill"])]  # as autolm's child
times = []
for _ in range(4):
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    times.append(time.perf_counter() - t)
res["prefill"] = args["prefill"] / sorted(times[1:])[1]  # the first call warms up
n = args["decode"]
greedy(prompt, 4)
t = time.perf_counter()
out = greedy(prompt, n)
res["decode"] = len(out) / (time.perf_counter() - t)
if args.get("context"):  # one-token steps after a long prompt, as autolm's child times its own
    import numpy as np

    n_ctx = args["context"] + n + 64  # a context of its own: the rows above ran (and peaked) with the first
    del llm
    llm = llama_cpp.Llama(model_path=args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"],
                          n_ctx=n_ctx, n_batch=512, verbose=False)  # fmt: skip
    llm.eval([rng.randrange(10, min(1000, llm.n_vocab())) for _ in range(args["context"])])
    vocab = llm.n_vocab()
    t = time.perf_counter()
    for _ in range(n // 2):  # the last token's logits, which eval() does not keep without logits_all
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        llm.eval([int(np.argmax(logits))])
    res["decode_context"] = (n // 2) / (time.perf_counter() - t)
print("RESULT " + json.dumps(res))
