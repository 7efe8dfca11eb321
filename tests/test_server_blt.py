"""BLT in the serving engine (autolm/serve/rows.py). BLT's padding reaches its real bytes' results (its patcher and
global transformer see no padding mask), so its rows run apart: each prompt prefilled alone and each decode step
run row by row on the row's own cache (the bytes seen). Concurrent requests of several lengths, joining and leaving
the batch, with chunked prefill, prefix caching, LoRA adapters per row and speculation for a lone row, each get
generate()'s greedy tokens on their prompt alone (and transformers')."""

from __future__ import annotations

import copy
import queue
import shutil

import pytest
import torch
from conftest import write_char_tokenizer
from test_family_blt import ENTROPY

import autolm
import autolm.generation.speculative as speculative
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished
from autolm.serve.speculation import Speculation

SYSTEM = (
    "You are a terse assistant; answer briefly. "  # 42 bytes: a whole 32-byte block, then a chunk boundary
)


@pytest.fixture(scope="module")
def blt(tmp_path_factory):
    directory, hf = ENTROPY.checkpoint(tmp_path_factory)
    d = tmp_path_factory.mktemp("server_blt") / "model"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model, autolm.AutoTokenizer.from_pretrained(d), hf


def run(
    engine: Engine, prompts: list[list[int]], new: list[int], adapters=None, **settings
) -> list[Finished]:
    """Submit the prompts together (greedy, max_new_tokens new[k], adapters[k]); their Finished events in order."""
    events: queue.Queue = queue.Queue()
    for k, p in enumerate(prompts):
        cfg = GenerationConfig(max_new_tokens=new[k], eos_token_id=2, **settings)
        adapter = adapters[k] if adapters else None
        engine.submit(
            Sequence(p, cfg, [], lambda ev, k=k: events.put((k, ev)), ignore_eos=True, adapter=adapter)
        )
    done: dict[int, Finished] = {}
    while len(done) < len(prompts):
        k, ev = events.get(timeout=300)
        assert not isinstance(ev, Failed), ev.message
        if isinstance(ev, Finished):
            done[k] = ev
    return [done[k] for k in range(len(prompts))]


def alone(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, do_sample=False, max_new_tokens=new, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def test_concurrent_requests_get_their_tokens_alone(blt):
    """Four requests of 3 to 49 bytes, at most three rows at once (the fourth joins as one leaves), prefilled 8 bytes
    a forward with decode steps between, prefix caching on: each request's tokens equal generate() on its prompt
    alone; the next turn of a conversation and a prompt sharing the system prompt reuse the cache, same tokens."""
    model, tok, hf = blt
    first = tok.encode(SYSTEM + "Why?")
    prompts = [
        first,
        tok.encode("abc"),
        tok.encode("The quick brown fox jumps"),
        tok.encode(SYSTEM + "Say hi."),
    ]
    new = [4, 7, 3, 5]
    engine = Engine(model, tok, max_batch=3, prefix_cache=1 << 20, prefill_chunk=8)
    try:
        got = run(engine, prompts, new)
        for g, p, n in zip(got, prompts, new):
            assert g.all_token_ids == alone(model, p, n)
        later = [first + got[0].all_token_ids + tok.encode(" And?"), tok.encode(SYSTEM + "Go on.")]
        again = run(engine, later, [4, 4])
        for g, p in zip(again, later):
            assert g.all_token_ids == alone(model, p, 4)
        assert again[0].cached_tokens == len(first) and again[1].cached_tokens == 32  # the prompt; a block
    finally:
        engine.stop()
    theirs = hf.generate(torch.tensor([prompts[2]]), do_sample=False, max_new_tokens=3, eos_token_id=None)
    assert got[2].all_token_ids == theirs[0, len(prompts[2]) :].tolist()


def test_speculation_for_a_lone_row(blt, monkeypatch):
    """A draft model (the model with noise on its weights) for a request running alone: the tokens of plain greedy
    decoding, where rounds accept some candidates and reject others (the cache's bytes marked and restored)."""
    model, tok, _ = blt
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.abs().mean())
    rounds, keep = [], speculative._keep
    monkeypatch.setattr(speculative, "_keep", lambda run, n, k: (rounds.append((n, k)), keep(run, n, k))[1])
    prompt = tok.encode("ab ab ab ab ab")
    engine = Engine(model, tok, speculation=Speculation(draft_model=draft))
    try:
        (got,) = run(engine, [prompt], [8], num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    finally:
        engine.stop()
    assert got.all_token_ids == alone(model, prompt, 8)
    assert any(n > 0 for n, _ in rounds) and any(n < k for n, k in rounds), rounds


def test_rows_with_their_adapters(blt):
    """Two LoRA adapters and the base model in one batch: each row runs alone under its own adapter."""
    model, tok, _ = blt
    peft_model = autolm.get_peft_model(
        copy.deepcopy(model),
        autolm.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    peft_model.add_adapter("b", autolm.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.eval()
    prompts, names = (
        [tok.encode("Hello there"), tok.encode("abc"), tok.encode("The quick brown fox")],
        ["default", None, "b"],
    )
    want = []
    for p, name in zip(prompts, names):
        if name is None:
            with peft_model.disable_adapter():
                want.append(alone(peft_model, p, 4))
        else:
            peft_model.set_adapter(name)
            want.append(alone(peft_model, p, 4))
    assert len({tuple(w) for w in want}) == 3
    engine = Engine(peft_model, tok, max_batch=3, prefill_chunk=8)
    try:
        got = run(engine, prompts, [4, 4, 4], adapters=names)
    finally:
        engine.stop()
    assert [g.all_token_ids for g in got] == want
