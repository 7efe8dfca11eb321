"""`autolm serve` on a tiny model: the OpenAPI schema generated from the pydantic models, a bounded schemathesis
run against it (no 5xx), slow clients closed, tokenization off the event loop, and no server path in errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading

import httpx
import openai
import pytest
from conftest import write_char_tokenizer
from test_server import KEY, NAME, serving

import autolm

# Refuses roles it does not know, as many real templates do (raise_exception is transformers' helper).
TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{%- endif %}<{{ m['role'] }}>{{ m['content'] }}"
    "{%- endfor %}{%- if add_generation_prompt %}<assistant>{%- endif %}"
)


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory):
    """A tiny random Llama with a character tokenizer and a chat template (64 positions: every answer is short)."""
    directory = str(tmp_path_factory.mktemp("tiny_served") / "tiny")
    shutil.copytree(checkpoint("llama_gqa_llama3_sharded")[0], directory)
    write_char_tokenizer(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "chat_template": TEMPLATE}, f)
    return directory


@pytest.fixture(scope="module")
def base(tiny):
    limits = ["--max-prompts", "4", "--max-n", "4", "--max-prompt-tokens", "512"]
    with serving(tiny, *limits, "--header-timeout", "1", "--body-timeout", "1") as url:
        yield url


def test_openapi_schema_is_generated_from_the_models(base):
    doc = httpx.get(base.removesuffix("/v1") + "/openapi.json").json()
    ref = lambda op: op["requestBody"]["content"]["application/json"]["schema"]  # noqa: E731
    chat, completions = doc["paths"]["/v1/chat/completions"]["post"], doc["paths"]["/v1/completions"]["post"]
    assert ref(chat) == {"$ref": "#/components/schemas/ChatRequest"}
    assert ref(completions) == {"$ref": "#/components/schemas/CompletionRequest"}
    ok = chat["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionResponse"}
    assert ok["text/event-stream"]["x-itemSchema"] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    schemas = doc["components"]["schemas"]
    assert {"logit_bias", "structured_outputs", "prompt_logprobs"} <= set(
        schemas["ChatRequest"]["properties"]
    )
    assert "prompt_tokens_details" in schemas["Usage"]["properties"]
    assert {"/tokenize", "/detokenize", "/version"} <= set(doc["paths"])


def test_schemathesis_finds_no_server_error(base):
    """Every operation of the schema, with bodies generated from it (valid ones and invalid ones): a fixed,
    small number of examples each, derandomized, and never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(base.removesuffix("/v1") + "/openapi.json")
    root = base.removesuffix("/v1")
    seen: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        has_body = bool(operation.get_request_payload_content_types())
        for mode in list(schemathesis.GenerationMode)[
            : 2 if has_body else 1
        ]:  # nothing to break without a body

            @settings(
                max_examples=12,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(base_url=root, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.as_curl_command(), response.text[:500])

            call()
    assert 200 in seen and 400 in seen  # both accepted and refused requests were exercised


def test_slow_clients_are_closed(base):
    """Slow-loris: a head that never ends, a body that never comes, and a connection that sends nothing are
    each closed by the server (--header-timeout 1, --body-timeout 1), with a 408 where a request was read."""
    host, port = base.removeprefix("http://").split("/")[0].split(":")

    def answer(data: bytes) -> bytes:
        with socket.create_connection((host, int(port))) as s:
            s.settimeout(60)  # only a bound for a broken server: the close comes from the server side
            s.sendall(data)
            return s.recv(4096)

    assert answer(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""
    body = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n"
    assert answer(body + f"Authorization: Bearer {KEY}\r\n\r\n".encode() + b"{").startswith(b"HTTP/1.1 408")
    assert answer(b"") == b""
    assert httpx.get(base.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_custom_roles_go_to_the_template(base):
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x"}], max_tokens=2)
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=[{"role": "narrator", "content": "x"}], max_tokens=2
        )
    assert e.value.body["param"] == "messages" and "unknown role narrator" in e.value.body["message"]


def _in_process(tiny, tokenizer):
    """The app in this process over ASGI (no socket): (client, the model's directory)."""
    from autolm.serve import create_app

    app = create_app(autolm.AutoModelForCausalLM.from_pretrained(tiny), tokenizer, NAME)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app"), app


def test_errors_name_no_path_on_the_server(tiny, tmp_path):
    """A model without a chat template, a template that fails: the 400s say so without the model's path."""
    bare = str(tmp_path / "bare")
    shutil.copytree(tiny, bare)
    tok = autolm.AutoTokenizer.from_pretrained(bare)
    tok.chat_template = None
    bodies = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template": "{{ messages[0]['content'] | nope }}",
        },
    ]

    async def go():
        client, app = _in_process(bare, tok)
        async with client:
            out = [await client.post("/v1/chat/completions", json=b) for b in bodies]
        app.state.server.close()
        return out

    for r in asyncio.run(go()):
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert bare not in r.text and str(tmp_path) not in r.text


def test_tokenization_runs_off_the_event_loop(tiny):
    """Prompts are tokenized and chat templates rendered on the tokenizer thread, never on the event loop's."""
    tok = autolm.AutoTokenizer.from_pretrained(tiny)
    threads: list[str] = []
    encode, render = tok.__call__, tok.apply_chat_template

    class Recording(type(tok)):
        def __call__(self, *a, **k):
            threads.append(threading.current_thread().name)
            return encode(*a, **k)

        def apply_chat_template(self, *a, **k):
            threads.append(threading.current_thread().name)
            return render(*a, **k)

    tok.__class__ = Recording

    async def go():
        client, app = _in_process(tiny, tok)
        async with client:
            loop_thread = threading.current_thread().name
            for path, body in (
                ("/v1/completions", {"prompt": ["ab", "cd"], "max_tokens": 2}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                ("/tokenize", {"prompt": "hello"}),
            ):
                r = await client.post(path, json=body)
                assert r.status_code == 200, r.text
        app.state.server.close()
        return loop_thread

    loop_thread = asyncio.run(go())
    assert threads and all(t.startswith("autolm-tokenizer") for t in threads) and loop_thread not in threads


def test_limits_and_structured_output_this_tokenizer_cannot_do(base):
    """The default --max-logprobs (20) and --max-prompt-tokens 512 are 400s naming their field; so is
    structured output with a tokenizer llguidance cannot read (this one's decoder)."""
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    cases = (
        ({"logprobs": 21}, "logprobs"),
        ({"prompt": "ab" * 300}, "prompt"),
        ({"extra_body": {"structured_outputs": {"regex": "a+"}}}, "structured_outputs"),
        ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    )
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": NAME, "prompt": "ab", "max_tokens": 1, **kwargs})
        assert e.value.body["param"] == param
