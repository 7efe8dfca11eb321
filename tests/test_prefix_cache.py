"""Prefix caching in the serving engine (autolm/serve/prefix.py): prompts that start with tokens seen before
reuse their keys and values, with the same tokens and log-probabilities as without the cache; blocks are
evicted within a small budget; requests sharing a prefix at once; the reuse reported as OpenAI does."""

from __future__ import annotations

import queue
import shutil

import pytest
import torch
from conftest import write_char_tokenizer

import autolm
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished
from autolm.serve.prefix import PrefixCache

SYSTEM = "You are a careful assistant. Answer in one short sentence, and never repeat the question. "


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    d = tmp_path_factory.mktemp("prefix") / "model"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    return autolm.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32
    ), autolm.AutoTokenizer.from_pretrained(d)


def run(engine: Engine, prompts: list[list[int]], new: int = 6) -> list[Finished]:
    """Submit the prompts together (greedy, logprobs of 3 alternatives); their Finished events in order."""
    events: queue.Queue = queue.Queue()
    cfg = GenerationConfig(max_new_tokens=new, eos_token_id=2)
    for k, p in enumerate(prompts):
        engine.submit(Sequence(p, cfg, [], lambda ev, k=k: events.put((k, ev)), logprobs=3))
    done: dict[int, Finished] = {}
    logprobs: dict[int, list] = {k: [] for k in range(len(prompts))}
    while len(done) < len(prompts):
        k, ev = events.get(timeout=300)
        assert not isinstance(ev, Failed), ev.message
        logprobs[k] += getattr(ev, "logprobs", [])
        if isinstance(ev, Finished):
            done[k] = ev
            ev.logprobs = logprobs[k]
    return [done[k] for k in range(len(prompts))]


def same(a: Finished, b: Finished) -> None:
    assert a.all_token_ids == b.all_token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x[0] == y[0] and abs(x[1] - y[1]) < 1e-4
        assert [i for i, _ in x[3]] == [i for i, _ in y[3]]


def test_reused_prefixes_give_the_same_tokens_and_logprobs(tiny):
    model, tok = tiny
    turn1 = tok.encode(SYSTEM + "What is red?")
    turns = [turn1, turn1 + tok.encode(" Red is a colour. And blue?"), tok.encode(SYSTEM + "Name a fish.")]
    plain = Engine(model, tok, max_batch=4)
    cached = Engine(model, tok, max_batch=4, prefix_cache=1 << 20)
    try:
        first = run(cached, [turn1])
        assert first[0].cached_tokens == 0
        again = run(cached, turns)
        expected = run(plain, turns)
        for a, b in zip(again, expected):
            same(a, b)
        block = cached.prefix.block
        # the whole blocks of the earlier prompt (all but its last token), then the shared system prompt
        assert again[0].cached_tokens == (len(turn1) - 1) // block * block
        assert again[1].cached_tokens == len(turn1) // block * block
        assert again[2].cached_tokens == len(tok.encode(SYSTEM)) // block * block > 0
        assert all(e.cached_tokens == 0 for e in expected)
    finally:
        plain.stop()
        cached.stop()


def test_a_small_budget_evicts_the_least_recently_used_blocks(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, prefix_cache=1)  # replaced below by a budget of two blocks
    try:
        bytes_per_block = (
            2 * len(model.model.layers) * 2 * 32 * 24 * 4
        )  # k and v, layers, kv heads, block, hd
        engine.prefix = PrefixCache(2 * bytes_per_block, block=32)
        a, b = tok.encode("a" * 70), tok.encode("b" * 70)
        run(engine, [a])
        assert engine.prefix.bytes <= engine.prefix.budget and len(engine.prefix.blocks) == 2
        run(engine, [b])  # b's two blocks push a's out
        assert len(engine.prefix.blocks) == 2 and engine.prefix.bytes <= engine.prefix.budget
        assert not engine.prefix.lookup(a) and len(engine.prefix.lookup(b)) == 2
        again = run(engine, [b])
        assert again[0].cached_tokens == 64
        plain = Engine(model, tok, max_batch=2)
        try:
            same(again[0], run(plain, [b])[0])
        finally:
            plain.stop()
    finally:
        engine.stop()


def test_requests_sharing_a_prefix_at_once(tiny):
    model, tok = tiny
    prompts = [tok.encode(SYSTEM + q) for q in ("Why?", "How far is it?", "When?", "Who is there?")]
    cached = Engine(model, tok, max_batch=4, prefix_cache=1 << 20)
    plain = Engine(model, tok, max_batch=4)
    try:
        run(cached, prompts[:1])
        together = run(cached, prompts)
        assert all(e.cached_tokens > 0 for e in together)
        for a, b in zip(together, run(plain, prompts)):
            same(a, b)
    finally:
        cached.stop()
        plain.stop()
