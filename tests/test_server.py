"""The OpenAI-compatible server, started for real on a loopback port and driven by the official client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import write_char_tokenizer

import autolm

KEY = "sk-test-key"
NAME = "smollm2"
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
]


@contextlib.contextmanager
def serving(directory: str, *extra: str, key: str | None = KEY):
    """`autolm serve directory` in its own process on a free loopback port; yields its /v1 URL."""
    from autolm.bench.serving import running_server

    args = [directory, "--model-name", NAME, *(["--api-key", key] if key else []), *extra]
    with running_server(args, wait_s=300) as (base, _):
        yield base + "/v1"


@pytest.fixture(scope="module")
def served(smol_dir):
    """(base_url, model, tokenizer): `autolm serve` running in its own process, and the same model here."""
    with serving(smol_dir, "--max-batch", "8") as base:
        yield (
            base,
            autolm.AutoModelForCausalLM.from_pretrained(smol_dir),
            autolm.AutoTokenizer.from_pretrained(smol_dir),
        )


def _health(base: str) -> dict:
    return httpx.get(base.removesuffix("/v1") + "/health").json()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key=KEY, max_retries=0, timeout=120)


def _reference(model, tok, question: str, max_new_tokens: int) -> str:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return autolm.generate_text(model, tok, prompt, max_new_tokens=max_new_tokens)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert _health(served[0])["status"] == "ok"


def test_embeddings_need_an_embedding_server(served, client):
    with pytest.raises(openai.BadRequestError, match="does not support Embeddings API"):
        client.embeddings.create(model=NAME, input="hello")
    for path, body in (
        ("/score", {"text_1": "a", "text_2": "b"}),
        ("/v1/rerank", {"query": "a", "documents": ["b"]}),
    ):
        r = httpx.post(
            served[0].removesuffix("/v1") + path, json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 400 and "does not support Score API" in r.json()["error"]["message"]


def test_chat_completion_matches_generate(served, client):
    _, model, tok = served
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16, temperature=0
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.created > 0
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _reference(model, tok, QUESTIONS[0], 16)
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert (
        r.usage.prompt_tokens > 5
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )


def test_a_conversation_reuses_its_earlier_turns(served, client):
    """Turn two starts with turn one's prompt: the prefix cache holds its keys and values (reported in
    usage.prompt_tokens_details.cached_tokens, as OpenAI does) and the answer is the one computed afresh."""
    _, model, tok = served
    system = {"role": "system", "content": "You are a geography teacher. " * 8}
    turn1 = [system, {"role": "user", "content": QUESTIONS[0]}]
    first = client.chat.completions.create(model=NAME, messages=turn1, max_tokens=12, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And of Italy?"}]  # fmt: skip
    second = client.chat.completions.create(model=NAME, messages=turn2, max_tokens=12, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    prompt = tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False)
    assert second.choices[0].message.content == autolm.generate_text(model, tok, prompt, max_new_tokens=12)


def test_streamed_chat_with_usage(served, client):
    _, model, tok = served
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": QUESTIONS[0]}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _reference(model, tok, QUESTIONS[0], 12)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage.completion_tokens == 12) == (finals == ["length"])


def test_completions_stop_sequences_and_n(served, client):
    _, _model, _tok = served
    full = client.completions.create(
        model=NAME, prompt="The days of the week are Monday, Tuesday,", max_tokens=20, temperature=0
    )
    assert full.object == "text_completion" and "Thursday" in full.choices[0].text
    cut = client.completions.create(
        model=NAME,
        prompt="The days of the week are Monday, Tuesday,",
        max_tokens=20,
        temperature=0,
        stop=["Thursday"],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text.split("Thursday")[0]
    two = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Tell me a word."}],
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=3,
    )
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)
    again = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Tell me a word."}],
        max_tokens=8,
        n=2,
        temperature=1.0,
        seed=3,
    )
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]  # seeded


def test_errors_are_openai_error_bodies(served, client):
    base = served[0]
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(base + "/chat/completions", json={"messages": msgs})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=msgs, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 9000}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[])
    r = httpx.post(
        base + "/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_32_concurrent_streams_get_the_reference_text(served, client):
    """Correctness under load only: throughput with 1, 8 and 32 clients is measured by the bench, not here."""
    _, model, tok = served
    n_tokens = 16
    want = {q: _reference(model, tok, q, n_tokens) for q in QUESTIONS}

    def stream(q: str) -> tuple[str, str]:
        parts = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": q}],
            max_tokens=n_tokens,
            temperature=0,
            stream=True,
        )
        return q, "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, [QUESTIONS[i % 4] for i in range(32)]))
    assert all(text == want[q] for q, text in results)


def test_a_client_that_disconnects_does_not_disturb_the_others(served, client):
    base, model, tok = served
    want = _reference(model, tok, QUESTIONS[1], 24)
    result = {}

    def steady():
        parts = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": QUESTIONS[1]}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        result["text"] = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    other = threading.Thread(target=steady)
    other.start()
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 200,
        "stream": True,
    }
    with httpx.stream(
        "POST", base + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # hang up mid-stream
    other.join(timeout=120)
    assert result["text"] == want
    for _ in range(100):  # the abandoned row leaves the batch within a step or two
        if _health(base)["running"] == 0:
            break
        time.sleep(0.05)
    assert _health(base)["running"] == 0


def _tiny(checkpoint, tmp_path):
    """(folder, model, tokenizer): the tiny Llama with a character tokenizer, copied under tmp_path."""
    directory = str(tmp_path / "tiny")
    shutil.copytree(checkpoint("llama_gqa_llama3_sharded")[0], directory)
    write_char_tokenizer(directory)
    return (
        directory,
        autolm.AutoModelForCausalLM.from_pretrained(directory),
        autolm.AutoTokenizer.from_pretrained(directory),
    )


def test_compiled_decode_serves_the_same_completions(checkpoint, tmp_path):
    """`autolm serve --compile`: concurrent requests batched through the compiled step get eager's text."""
    directory, model, tok = _tiny(checkpoint, tmp_path)
    prompts = ["Hello there", "A tiny model", "Once upon a time", "xyz"]
    with serving(directory, "--compile", "--max-batch", "4") as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)

        def complete(prompt: str) -> str:
            return (
                client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
                .choices[0]
                .text
            )

        first = complete(prompts[0])  # compiles for one row
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(complete, prompts))
    assert first == texts[0]
    assert texts == [autolm.generate_text(model, tok, p, max_new_tokens=12) for p in prompts]


def test_a_stopped_server_leaves_no_thread_holding_the_model(checkpoint, tmp_path):
    """SIGTERM ends serve() with no thread of its own left running: a waiting abort timer held the engine, and
    with it the model, past the interpreter's exit, so the compiled graphs' loaders were never closed and left
    their unpacked files in the temp folder."""
    from autolm.bench.serving import _free_port
    from autolm.serve.http import serve

    _, model, tok = _tiny(checkpoint, tmp_path)
    port = _free_port()

    def stop() -> None:
        for _ in range(600):
            if returned.is_set():  # serve() failed before its handlers were in place: nothing to stop
                return
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.1)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    before = set(threading.enumerate())
    returned = threading.Event()
    stopper = threading.Thread(target=stop, daemon=True)
    stopper.start()
    try:
        serve(model, tok, NAME, port=port)
    finally:
        returned.set()
    stopper.join()
    assert [t.name for t in threading.enumerate() if t not in before] == []
