"""Prefill in the serving engine. Prefix caching (autolm/serve/prefix.py): prompts that start with tokens seen
before reuse their keys and values, with the same tokens and log-probabilities as without the cache; blocks
are evicted within a small budget; requests sharing a prefix at once; the reuse reported as OpenAI does.
Chunked prefill: a long prompt is read a chunk per forward with the running streams stepping between."""

from __future__ import annotations

import queue
import shutil

import pytest
import torch
from conftest import write_char_tokenizer

import autolm
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished, PromptLogprobs
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


@pytest.mark.parametrize("prefix_cache", [0, 1 << 20])
def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_flow(tiny, prefix_cache):
    """A 200-token prompt arrives while a request streams: read 32 tokens per forward (after its cached
    blocks, with a prefix cache), the stream gets a token between two chunks; both outputs (tokens,
    logprobs, and without the prefix cache the prompt's logprobs) are those of one forward."""
    model, tok = tiny
    short, long = tok.encode("Name a fish."), tok.encode(SYSTEM + "x" * (200 - len(SYSTEM)))
    chunked = Engine(model, tok, max_batch=4, prefill_chunk=32, prefix_cache=prefix_cache)
    whole = Engine(model, tok, max_batch=4, prefill_chunk=4096)
    prompt_logprobs = None if prefix_cache else 2  # (prompt logprobs are computed afresh, never cached)
    try:
        if prefix_cache:  # the long prompt's first blocks cached: the rest is read in chunks after them
            run(chunked, [long[:64]], new=1)
        order: list[tuple[int, object]] = []
        events: queue.Queue = queue.Queue()
        cfg = GenerationConfig(max_new_tokens=30, eos_token_id=2)

        def emit(k, ev):
            order.append((k, ev))
            events.put((k, ev))
            if k == 0 and len(order) == 2:  # the stream is running: the long prompt arrives
                late = Sequence(
                    long, cfg, [], lambda e: emit(1, e), logprobs=3, prompt_logprobs=prompt_logprobs
                )
                chunked.submit(late)

        chunked.submit(Sequence(short, cfg, [], lambda e: emit(0, e), logprobs=3))
        done: dict[int, Finished] = {}
        while len(done) < 2:
            k, ev = events.get(timeout=300)
            assert not isinstance(ev, Failed), ev.message
            if isinstance(ev, Finished):
                done[k] = ev
        first_of_long = next(i for i, (k, _) in enumerate(order) if k == 1)
        steps_meanwhile = sum(1 for k, _ in order[2:first_of_long] if k == 0)
        chunks = -(-(len(long) - done[1].cached_tokens) // 32)
        assert steps_meanwhile >= chunks - 1 >= 3, (steps_meanwhile, chunks)
        if prefix_cache:
            assert done[1].cached_tokens == 64
        for k, prompt in ((0, short), (1, long)):
            ev_logprobs = [e for kk, ev in order if kk == k for e in getattr(ev, "logprobs", [])]
            done[k].logprobs = ev_logprobs
            reference = run(whole, [prompt], new=30)[0]
            same(done[k], reference)
        if prompt_logprobs:
            got = next(ev.entries for k, ev in order if k == 1 and isinstance(ev, PromptLogprobs))
            expected = whole_prompt_logprobs(whole, long, prompt_logprobs)
            assert got[0] is None and len(got) == len(expected) == len(long)
            for x, y in zip(got[1:], expected[1:]):
                assert x[0] == y[0] and abs(x[1] - y[1]) < 1e-4
    finally:
        chunked.stop()
        whole.stop()


def whole_prompt_logprobs(engine: Engine, prompt: list[int], top: int) -> list:
    events: queue.Queue = queue.Queue()
    cfg = GenerationConfig(max_new_tokens=1, eos_token_id=2)
    engine.submit(Sequence(prompt, cfg, [], events.put, prompt_logprobs=top))
    while not isinstance(ev := events.get(timeout=300), PromptLogprobs):
        assert not isinstance(ev, Failed), ev.message
    return ev.entries


@pytest.mark.parametrize("name", ["qwen3_5_text", "lfm2"])
def test_a_recurrent_model_continues_an_earlier_prompt_from_its_snapshot(checkpoint, tmp_path, name):
    """Hybrids (Qwen3.5: linear attention beside full attention; LFM2: short convolutions beside it): the
    next turn of a conversation starts from the earlier prompt's snapshot (its states after its last token, its
    keys and values), with the same tokens and logprobs as without the cache; a prompt that shares only some
    blocks with an earlier one, or repeats it exactly, reuses nothing (no state exists where the reuse would end)."""
    directory, _ = checkpoint(name)
    d = tmp_path / "model"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(d)
    assert model.recurrent
    turn1 = tok.encode(SYSTEM + "What is red?")
    turns = [turn1 + tok.encode(" Red is a colour. And blue?"), tok.encode(SYSTEM + "Name a fish."), turn1]
    plain = Engine(model, tok, max_batch=4)
    cached = Engine(model, tok, max_batch=4, prefix_cache=1 << 24)
    try:
        run(cached, [turn1])
        again = run(cached, turns)
        for a, b in zip(again, run(plain, turns)):
            same(a, b)
        assert [e.cached_tokens for e in again] == [len(turn1), 0, 0]
        third = turns[0] + tok.encode(" Blue is a colour too. Green?")
        assert run(cached, [third])[0].cached_tokens == len(turns[0])  # the second turn left its own snapshot
    finally:
        plain.stop()
        cached.stop()


def test_a_recurrent_model_reuses_a_shared_system_prompt_from_its_chunk_boundaries(checkpoint, tmp_path):
    """Qwen3.5 prefilled 32 tokens per forward: each prompt leaves its states at every chunk's end (a block
    boundary), so a prompt sharing only the system prompt with an earlier one starts from the last boundary
    within it, and a prompt repeated exactly from its last boundary; tokens and logprobs as without the cache."""
    directory, _ = checkpoint("qwen3_5_text")
    shutil.copytree(directory, tmp_path / "model")
    write_char_tokenizer(str(tmp_path / "model"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path / "model")
    first = tok.encode(SYSTEM + "What is red?")
    prompts = [tok.encode(SYSTEM + "Name a fish."), first]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    plain = Engine(model, tok, prefill_chunk=32)
    cached = Engine(model, tok, prefill_chunk=32, prefix_cache=1 << 24)
    try:
        run(cached, [first])
        again = [run(cached, [p])[0] for p in prompts]
        for a, b in zip(again, [run(plain, [p])[0] for p in prompts]):
            same(a, b)
        assert shared >= 64 and [e.cached_tokens for e in again] == [
            shared - shared % 32,
            len(first) - 1 - (len(first) - 1) % 32,
        ]
    finally:
        plain.stop()
        cached.stop()
