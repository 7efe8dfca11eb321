"""Speculative decoding against plain decoding, as `autolm bench --speculative` prints it: SmolLM2 on a copy/edit
task with prompt lookup, and with its int4 self (the GGUF's 4-bit blocks) drafting for the fp32 model, in one
process, greedy. Both sides decode the way the CLI does (the CPU one-token step compiled ahead of time where it
applies); each figure is the median of `reps` timed generations after a warm-up one. A row also says whether
the speculative tokens equal the plain ones and how many tokens each verifying forward of the model gave."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

PASSAGE = (
    "The old lighthouse stood on the northern cliff for two hundred years. Every night its keeper climbed the "
    "spiral stairs, trimmed the wick and watched the ships pass safely into the harbour below. In winter the "
    "storms came from the sea and the waves broke against the rocks, but the light never went out. The "
    "villagers said that as long as the lamp was burning, no sailor would be lost on their shore. When the "
    "last keeper retired, the light was made automatic, and the house at the foot of the tower became a small "
    "museum where children could see the great lens and the logbooks of every storm."
)
TASKS = {
    "copy/edit": f"Rewrite this passage, changing 'northern' to 'southern' and nothing else:\n\n{PASSAGE}",
    "chat": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


@contextlib.contextmanager
def counted_rounds():
    """The (accepted, proposed) candidates of each verifying forward run inside the block."""
    from ..generation import speculative

    seen, keep = [], speculative._keep

    def spy(run, n, k):
        seen.append((n, k))
        return keep(run, n, k)

    speculative._keep = spy
    try:
        yield seen
    finally:
        speculative._keep = keep


def _timed(model, ids, new_tokens: int, reps: int, **kw):
    """(the tokens of the last run, new tokens per second: the median of reps runs after a warm-up)."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, **kw)
    model.generate(ids, **kw)
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        times.append(time.perf_counter() - t)
    return out, (out.shape[1] - ids.shape[1]) / statistics.median(times)


def _row(label, model, tok, task, new_tokens, reps, **speculate) -> dict:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": TASKS[task]}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    plain, plain_tps = _timed(model, ids, new_tokens, reps)
    fast, fast_tps = _timed(model, ids, new_tokens, reps, **speculate)
    with counted_rounds() as rounds:
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **speculate)
    per_forward = (fast.shape[1] - ids.shape[1]) / max(len(rounds), 1)
    return {
        "row": label,
        "task": task,
        "new_tokens": fast.shape[1] - ids.shape[1],
        "plain_tps": plain_tps,
        "speculative_tps": fast_tps,
        "ratio": fast_tps / plain_tps,
        "identical": bool(plain.shape == fast.shape and (plain == fast).all()),
        "tokens_per_forward": per_forward,
    }


def speculative_bench(
    threads: int | None = None, new_tokens: int = 160, reps: int = 3, out=sys.stdout
) -> list:
    """The rows, printed as a markdown table (with the machine's load average before and after)."""
    import torch

    from ..convert import default_model_dir
    from ..load import from_pretrained
    from ..tokenizer import AutoTokenizer

    threads = threads or min(os.cpu_count() or 1, 8)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    fp32_dir = default_model_dir("float32", progress=False)
    tok = AutoTokenizer.from_pretrained(fp32_dir)
    fp32 = from_pretrained(fp32_dir)
    # the CLI's default model: the GGUF's 4-bit blocks in int4 layers, an int8 head; also fp32's draft
    int4 = draft = from_pretrained(default_model_dir(quantization="int4", progress=False))
    for m in (int4, fp32):
        m.precompile_decode(progress=sys.stderr.isatty())
    rows = []
    with torch.inference_mode():
        for label, model, task, kw in [
            ("int4 (the CLI's), prompt lookup 10", int4, "copy/edit", dict(prompt_lookup_num_tokens=10)),
            ("fp32, prompt lookup 10", fp32, "copy/edit", dict(prompt_lookup_num_tokens=10)),
            ("int4 (the CLI's), prompt lookup 10", int4, "chat", dict(prompt_lookup_num_tokens=10)),
            ("fp32, its int4 self as draft", fp32, "chat", dict(assistant_model=draft)),
            ("fp32, its int4 self as draft", fp32, "copy/edit", dict(assistant_model=draft)),
        ]:
            rows.append(_row(label, model, tok, task, new_tokens, reps, **kw))
    _print(rows, threads, load_before, os.getloadavg(), out)
    return rows


def _print(rows, threads, before, after, out) -> None:
    print(f"threads {threads}; load average (1, 5, 15 min) {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} before, "
          f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after\n", file=out)  # fmt: skip
    print("| SmolLM2-135M-Instruct | task | plain tok/s | speculative tok/s | ratio | same tokens | tokens per "
          "forward |\n|---|---|---|---|---|---|---|", file=out)  # fmt: skip
    for r in rows:
        print(f"| {r['row']} | {r['task']} ({r['new_tokens']} tokens) | {r['plain_tps']:.1f} | "
              f"{r['speculative_tps']:.1f} | {r['ratio']:.2f}x | {'yes' if r['identical'] else 'NO'} | "
              f"{r['tokens_per_forward']:.1f} |", file=out)  # fmt: skip
