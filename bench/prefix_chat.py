"""Time to the first token at each turn of a 10-turn chat, autolm serve with and without prefix caching.
`python bench/prefix_chat.py [MODEL_DIR]` (default: the CLI's int4 SmolLM2)."""

import os
import sys
import time

import openai

from autolm.bench.serving import running_server

model = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.path.expanduser("~/.cache/autolm/models/SmolLM2-135M-Instruct-int4")
)


def chat(mb):
    with running_server([model, "--threads", "2", "--prefix-cache-mb", str(mb)], wait_s=600) as (base, _):
        c = openai.OpenAI(base_url=base + "/v1", api_key="x")
        msgs = [{"role": "system", "content": "You are a helpful assistant who answers in detail. " * 8}]
        ttft, cached = [], []
        for turn in range(10):
            msgs.append(
                {"role": "user", "content": f"Tell me fact number {turn} about the sea, in a few sentences."}
            )
            t = time.perf_counter()
            first = None
            text = ""
            for ch in c.chat.completions.create(
                model=os.path.basename(model.rstrip("/")),
                messages=msgs,
                max_tokens=48,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},  # 48 tokens each turn, whatever the model
            ):
                if ch.choices and ch.choices[0].delta.content and first is None:
                    first = time.perf_counter() - t
                if ch.choices and ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
                if ch.usage:
                    cached.append(
                        getattr(ch.usage.prompt_tokens_details, "cached_tokens", 0)
                        if ch.usage.prompt_tokens_details
                        else 0
                    )
                    prompt = ch.usage.prompt_tokens
            ttft.append(first)
            msgs.append({"role": "assistant", "content": text})
        return ttft, cached, prompt


for mb in (0, 256):
    ttft, cached, prompt = chat(mb)
    print(
        f"--prefix-cache-mb {mb}: TTFT per turn (s) "
        + " ".join(f"{x:.3f}" for x in ttft)
        + f"; turn 10: {prompt} prompt tokens, {cached[-1]} cached",
        flush=True,
    )
