"""`autolm serve` on the real SmolLM2 against what vLLM's own OpenAI tests check (tests/entrypoints/openai in
vLLM), with the official `openai` client: tool calls whose parameters use $defs, the 400s that name every bad
field, usage details, prompt logprobs, token ids, structured_outputs, allowed tokens, chat echo, /tokenize."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel
from test_server import KEY, NAME, serving

import autolm

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(smol_dir):
    """The server with the whole vocabulary allowed as logprobs, and small limits on prompts and n."""
    args = ["--max-logprobs", "-1", "--max-prompts", "4", "--max-n", "4"]
    with serving(smol_dir, *args) as base:
        yield (
            base,
            autolm.AutoModelForCausalLM.from_pretrained(smol_dir),
            autolm.AutoTokenizer.from_pretrained(smol_dir),
        )


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key=KEY, max_retries=0, timeout=300)


def _post(base: str, path: str, body: dict) -> httpx.Response:
    root = base.removesuffix("/v1")
    return httpx.post(root + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def _log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): log p(. | tokens before t) for t >= 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):  # a nested model: its JSON schema refers to Address through $defs
    name: str
    address: Address


def test_forced_tool_calls_with_defs_in_the_parameters(client):
    tool = {
        "type": "function",
        "function": {
            "name": "save_person",
            "description": "Save a person",
            "parameters": Person.model_json_schema(),
        },
    }
    assert "$defs" in tool["function"]["parameters"]
    messages = [{"role": "user", "content": "Save Al, who lives in Rome, Italy."}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, tools=[tool], tool_choice="required", max_tokens=60, temperature=0
    )
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "save_person" and Person.model_validate_json(call.function.arguments)
    named = {"type": "function", "function": {"name": "save_person"}}
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            tools=[tool],
            tool_choice=named,
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls and Person.model_validate_json(calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_values_are_400s_naming_the_field(served, client):
    base, model, _ = served
    vocab = model.config.vocab_size
    msgs = [{"role": "user", "content": "hi"}]
    cases = [  # (extra body, param, words the message must contain)
        ({"stream_options": {"include_usage": True}}, "stream_options", ["stream"]),
        ({"stop_token_ids": [vocab + 1]}, "stop_token_ids", [str(vocab + 1), str(vocab)]),
        ({"stop_token_ids": [-1], "min_tokens": 2}, "stop_token_ids", ["-1"]),
        ({"logit_bias": {"bad1": 5, "bad2": 1}}, "logit_bias", ["bad1", "bad2"]),
        ({"logit_bias": {"²": 1, "①": 1, "7" * 5000: 1}}, "logit_bias", ["²", "①"]),
        ({"logit_bias": {"": "x"}}, "logit_bias", []),
        ({"logit_bias": {str(vocab + 1): 1}}, "logit_bias", [str(vocab + 1), str(vocab)]),
        ({"repetition_penalty": 1e-300, "temperature": 1.0}, "repetition_penalty", []),
        ({"chat_template_kwargs": {"return_tensors": "pt"}}, "chat_template_kwargs", ["return_tensors"]),
        ({"top_logprobs": 2}, "top_logprobs", ["logprobs"]),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", ["stream"]),
        ({"tools": []}, "tools", []),
        ({"n": 5}, "n", ["4"]),
        ({"use_beam_search": True, "suffix": "x"}, "use_beam_search", ["use_beam_search", "suffix"]),
        ({"allowed_token_ids": [vocab]}, "allowed_token_ids", [str(vocab)]),
    ]
    for extra, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
        assert all(w in e.value.body["message"] for w in words), (extra, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=["a"] * 5, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    root = base.removesuffix("/v1")
    form = httpx.post(
        root + "/v1/completions", data={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert form.status_code == 400 and "application/json" in form.json()["error"]["message"]


def test_usage_details_and_continuous_usage_stats(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=PROMPT,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    running = [c.usage.completion_tokens for c in chunks if c.choices]
    assert running == sorted(running) and running[-1] == 4 and chunks[-1].choices == []
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in chunks)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_logprobs_are_the_models(served, client):
    _, model, tok = served
    ids = tok.encode(PROMPT)
    want = _log_softmax(model, ids)
    for k in (0, 2):
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": k})
        got = r.choices[0].model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(ids)
        for t, entry in enumerate(got[1:], 1):
            own = entry[str(ids[t])]
            assert abs(own["logprob"] - float(want[t - 1, ids[t]])) < 2e-4
            assert own["rank"] == int((want[t - 1] > want[t - 1, ids[t]]).sum()) + 1
            assert len(entry) in (k, k + 1) and own["decoded_token"] == tok.decode([ids[t]])
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 1},
    )
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_completion_top_logprobs_start_with_the_sampled_token(client):
    r = client.completions.create(
        model=NAME,
        prompt="My favourite animal is the",
        max_tokens=6,
        temperature=1.0,
        seed=5,
        logprobs=3,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert re.fullmatch(r"token_id:\d+", token)
        assert next(iter(top)) == token and top[token] == value and len(top) in (3, 4)
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert ids == r.choices[0].token_ids[: len(ids)]


def test_logprob_bytes_of_part_of_a_character(served, client):
    """A byte-level token holding the first byte of a 4-byte character (an emoji): its real byte, not "�"'s."""
    tok = served[2]
    token = tok.convert_tokens_to_ids("ð")  # GPT-2's byte-level spelling of 0xF0
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        logprobs=True,
        logit_bias={str(token): 100},
    )
    assert r.choices[0].logprobs.content[0].bytes == [0xF0]


def test_structured_outputs_allowed_tokens_and_guided_backend(served, client):
    tok = served[2]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    msgs = [{"role": "user", "content": "Name a city as JSON."}]
    kinds = {
        "json": schema,
        "regex": r"[0-9]{3}",
        "choice": ["yes", "no"],
        "grammar": 'start: "A" | "B"',
    }
    for kind, value in kinds.items():
        r = client.chat.completions.create(
            model=NAME,
            messages=msgs,
            max_tokens=30,
            temperature=0,
            extra_body={"structured_outputs": {kind: value}},
        )
        text = r.choices[0].message.content
        if kind == "json":
            assert set(json.loads(text)) <= {"city"}
        elif kind == "regex":
            assert re.fullmatch(r"[0-9]{3}", text)
        else:
            assert text in ({"yes", "no"} if kind == "choice" else {"A", "B"})
    r = client.chat.completions.create(
        model=NAME,
        messages=msgs,
        max_tokens=30,
        temperature=0,
        extra_body={"guided_json": schema, "guided_decoding_backend": "xgrammar"},
    )
    assert "city" in json.loads(r.choices[0].message.content)
    # vLLM's structural tags: free text, and after a trigger the tag's begin, a JSON value of its schema, its end
    tag = {"structures": [{"begin": "<city=", "schema": schema, "end": "/>"}], "triggers": ["<city="]}
    r = client.completions.create(
        model=NAME,
        prompt="Tag the city: <city=",
        max_tokens=30,
        temperature=0,
        extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}},
    )
    for found in re.finditer(r"<city=(.*?)/>", r.choices[0].text, re.S):
        assert "city" in json.loads(found.group(1))
    allowed = tok.encode(" yes no maybe", add_special_tokens=False)
    r = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=5,
        extra_body={"allowed_token_ids": allowed, "return_token_ids": True, "ignore_eos": True},
    )
    assert set(r.choices[0].token_ids) <= set(allowed)


def test_token_ids_in_answers_streamed_and_not(served, client):
    base = served[0]
    msgs = [{"role": "user", "content": "Say hello."}]
    kw = dict(model=NAME, messages=msgs, max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    whole = client.chat.completions.create(**kw)
    prompt_ids = _post(base, "/tokenize", {"messages": msgs}).json()["tokens"]
    assert whole.model_extra["prompt_token_ids"] == prompt_ids
    assert served[2].decode(whole.choices[0].token_ids).startswith(whole.choices[0].message.content)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    streamed = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids") or []]
    assert streamed == whole.choices[0].token_ids
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"return_token_ids": True}
    )
    assert r.choices[0].model_extra["prompt_token_ids"] == served[2].encode(PROMPT)


def test_truncation_stop_strings_and_top_logprobs_of_the_whole_vocabulary(served, client):
    _, model, tok = served
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=1, echo=True, extra_body={"truncate_prompt_tokens": 2}
    )
    assert r.usage.prompt_tokens == 2 and r.choices[0].text.startswith(tok.decode(tok.encode(PROMPT)[-2:]))
    days = "The days of the week are Monday, Tuesday,"
    r = client.completions.create(
        model=NAME,
        prompt=days,
        max_tokens=20,
        temperature=0,
        stop=["Thursday"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert r.choices[0].text.endswith("Thursday") and r.choices[0].model_extra["stop_reason"] == "Thursday"
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, logprobs=True, top_logprobs=-1
    )
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == model.config.vocab_size


@pytest.mark.parametrize("echo", [True, False])
def test_chat_echo_with_continue_final_message(client, echo):
    """vLLM's test_chat_session_with_echo_and_continue_final_message."""
    saying = "Here is a common saying about apple. An apple a day, keeps"
    r = client.chat.completions.create(
        model=NAME,
        messages=[
            {"role": "user", "content": "tell me a common saying"},
            {"role": "assistant", "content": saying},
        ],
        max_tokens=8,
        extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (saying in r.choices[0].message.content) == echo


def test_tokenize_detokenize_and_version(served):
    base, model, tok = served
    r = _post(base, "/tokenize", {"model": NAME, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == model.config.max_position_embeddings and r["token_strs"][0] == "Hello"
    chat = _post(base, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
    want = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[
        "input_ids"
    ]
    assert chat["tokens"] == list(want)
    assert _post(base, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
    assert _post(base, "/detokenize", {"tokens": [10**9]}).status_code == 400
    assert httpx.get(base.removesuffix("/v1") + "/version").json() == {"version": autolm.__version__}
