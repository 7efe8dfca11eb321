"""Speculative decoding in the serving engine (autolm/serve/speculation.py, `autolm serve --draft-model` and
`--prompt-lookup`): a request running alone drafts and verifies several tokens per forward, with plain greedy
decoding's tokens and log-probabilities; a batch of several rows takes the one-token step, and a row left
alone goes on speculatively; grammars and sampling; the flags."""

from __future__ import annotations

import copy
import json
import queue
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_char_tokenizer

import autolm
from autolm.generation import GenerationConfig
from autolm.serve.engine import Engine, Sequence
from autolm.serve.events import Failed, Finished
from autolm.serve.speculation import Speculation

REPEAT = "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat"


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    d = tmp_path_factory.mktemp("speculation") / "model"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 512  # room for the draft, which drafts within it
    (d / "config.json").write_text(json.dumps(cfg))
    model = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model, autolm.AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def draft(tiny):
    """The model with noise on every weight: it agrees with the model on some tokens, not all."""
    out = copy.deepcopy(tiny[0])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.abs().mean())
    return out


def run(engine: Engine, prompts: list[list[int]], news: list[int], **kw) -> list[Finished]:
    """Submit the prompts together (logprobs of 3 alternatives); their Finished events, logprobs gathered."""
    events: queue.Queue = queue.Queue()
    settings, stops = kw.pop("config", {}), kw.pop("stops", [])
    for k, (p, new) in enumerate(zip(prompts, news)):
        cfg = GenerationConfig(max_new_tokens=new, eos_token_id=2, **settings)
        engine.submit(Sequence(p, cfg, stops, lambda ev, k=k: events.put((k, ev)), logprobs=3, **kw))
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
    assert a.all_token_ids == b.all_token_ids and a.full_text == b.full_text
    assert len(a.logprobs) == len(b.logprobs)
    for x, y in zip(a.logprobs, b.logprobs):
        assert x[0] == y[0] and abs(x[1] - y[1]) < 1e-4
        assert [i for i, _ in x[3]] == [i for i, _ in y[3]]


@pytest.fixture(params=["prompt_lookup", "draft"])
def speculation(request, draft):
    return (
        Speculation(prompt_lookup=6) if request.param == "prompt_lookup" else Speculation(draft_model=draft)
    )


def test_a_lone_request_gets_plain_greedy_tokens_and_logprobs(tiny, speculation, rounds):
    model, tok = tiny
    prompts = [tok.encode(REPEAT)]
    plain = Engine(model, tok)
    fast = Engine(model, tok, speculation=speculation)
    try:
        expected = run(plain, prompts, [40])
        assert not rounds
        got = run(fast, prompts, [40])
    finally:
        plain.stop()
        fast.stop()
    same(got[0], expected[0])
    assert got[0].completion_tokens == 40
    assert rounds and sum(n for n, _ in rounds) > 0  # candidates were verified and some accepted
    assert fast.steps + len(rounds) < plain.steps  # fewer forwards than tokens


def test_a_batch_decodes_together_and_the_row_left_alone_speculates(tiny, speculation, rounds):
    """Two requests: the one-token step while both run; the longer one alone afterwards speculates."""
    model, tok = tiny
    prompts = [tok.encode(REPEAT), tok.encode("a b c d a b c d a b")]
    plain = Engine(model, tok)
    fast = Engine(model, tok, speculation=speculation)
    try:
        expected = run(plain, prompts, [40, 6])
        got = run(fast, prompts, [40, 6])
    finally:
        plain.stop()
        fast.stop()
    for a, b in zip(got, expected):
        same(a, b)
    assert rounds


def test_stops_end_a_speculative_round_where_plain_decoding_ends(tiny, speculation):
    model, tok = tiny
    prompt = tok.encode(REPEAT)
    plain = Engine(model, tok)
    fast = Engine(model, tok, speculation=speculation)
    try:
        whole = run(plain, [prompt], [40])[0].full_text
        stop = whole[10:13]
        expected = run(plain, [prompt], [40], stops=[stop])[0]
        got = run(fast, [prompt], [40], stops=[stop])[0]
    finally:
        plain.stop()
        fast.stop()
    same(got, expected)
    assert got.full_text == whole[: whole.index(stop)]


def test_sampled_requests_speculate_and_grammar_requests_do_not(tiny, speculation, rounds):
    model, tok = tiny
    fast = Engine(model, tok, speculation=speculation)

    class Anything:  # a constraint that allows every token
        finished = False

        def mask(self, scores):
            return scores

        def advance(self, token):
            pass

    try:
        sampled = run(fast, [tok.encode(REPEAT)], [30], config=dict(do_sample=True, top_k=5))[0]
        assert sampled.completion_tokens == 30 and rounds
        rounds.clear()
        run(fast, [tok.encode(REPEAT)], [10], constraint=Anything())
        assert not rounds
    finally:
        fast.stop()


def test_serve_flags_are_checked_before_loading(tmp_path):
    """--draft-model and --prompt-lookup together is a usage error, as for generate and chat."""
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "autolm.cli",
            "serve",
            str(tmp_path),
            "--prompt-lookup",
            "4",
            "--draft-model",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and p.stderr.strip().endswith("give one of them"), p.stderr


def test_autolm_serve_with_prompt_lookup_answers_as_plain_greedy(smol_dir):
    """`autolm serve --prompt-lookup 8` with the openai client, on a copy task: plain greedy decoding's text."""
    openai = pytest.importorskip("openai")
    from autolm.bench.serving import running_server

    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir)
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)
    prompt = "Copy the line.\nLine: the quick brown fox jumps over the lazy dog by the river.\nCopy:"
    want = autolm.generate_text(model, tok, prompt, max_new_tokens=24, do_sample=False)
    with running_server([smol_dir, "--prompt-lookup", "8"], wait_s=300) as (base, proc):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        got = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
        log = proc.log()
    assert got.choices[0].text == want and "quick brown fox" in want
    assert "decodes speculatively: up to 8 candidates from its own n-grams" in log


@pytest.mark.parametrize("speculate", [False, True])
def test_a_request_crossing_the_longrope_switch_gets_generates_tokens(checkpoint, tmp_path, speculate):
    """LongRoPE (Phi-3.5's scaling; the switch at 9 tokens here): a lone request that grows past the switch
    runs its whole sequence again at the crossing, as generate() does, speculating or not, and gets
    generate()'s tokens; without that its keys would keep the short factors' rotation."""
    directory, _ = checkpoint("phi3_longrope")
    d = tmp_path / "phi3"
    shutil.copytree(directory, d)
    write_char_tokenizer(str(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(d)
    prompt = tok.encode("abab")
    want = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None)
    engine = Engine(model, tok, speculation=Speculation(prompt_lookup=3) if speculate else None)
    try:
        got = run(engine, [prompt], [20], ignore_eos=True)[0]
    finally:
        engine.stop()
    assert len(prompt) < model.config.rope_parameters["original_max_position_embeddings"] < len(prompt) + 20
    assert got.all_token_ids == want[0, len(prompt) :].tolist()


@pytest.mark.parametrize("source", ["prompt_lookup", "draft"])
def test_a_model_with_recurrent_layers_speculates_with_plain_greedy_tokens(
    checkpoint, tmp_path, source, rounds
):
    """Qwen3-Next's linear-attention layers keep states: a rejected candidate sends the cache back to its mark
    before the round and the accepted tokens run through again, so tokens and log-probabilities stay greedy's."""
    directory, _ = checkpoint("qwen3_next")
    shutil.copytree(directory, tmp_path / "model")
    write_char_tokenizer(str(tmp_path / "model"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.recurrent
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    spec = Speculation(prompt_lookup=6) if source == "prompt_lookup" else Speculation(draft_model=draft)
    plain, fast = Engine(model, tok), Engine(model, tok, speculation=spec)
    try:
        expected = run(plain, [tok.encode(REPEAT)], [24])
        got = run(fast, [tok.encode(REPEAT)], [24])
    finally:
        plain.stop()
        fast.stop()
    same(got[0], expected[0])
    assert rounds and any(n < k for n, k in rounds)  # candidates were verified, some rejected
