"""`autolm serve` driven by clients nobody here wrote: openai (logprobs, echo, token prompts, logit_bias,
structured output, tools, best_of), langchain-openai (bind_tools, with_structured_output) and
lm-evaluation-harness's local-completions backend; and the robustness a shared server needs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import time

import httpx
import openai
import pytest
import torch
from test_server import KEY, NAME, serving

import autolm

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(smol_dir):
    with serving(smol_dir, "--max-batch", "8") as base:
        yield (
            base,
            autolm.AutoModelForCausalLM.from_pretrained(smol_dir),
            autolm.AutoTokenizer.from_pretrained(smol_dir),
        )


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0], api_key=KEY, max_retries=0, timeout=300)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before t) for t >= 1, from the model here."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _chat_ids(tok, content: str) -> list[int]:
    return list(
        tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)[
            "input_ids"
        ]
    )


# ---- logprobs, echo, token prompts ------------------------------------------------------------------------


def test_chat_logprobs_are_the_models(served, client):
    _, model, tok = served
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    prompt = _chat_ids(tok, "Name a colour.")
    generated = tok.encode("".join(c.token for c in content), add_special_tokens=False)
    want = _logprobs(model, prompt + generated)[len(prompt) - 1 :]
    got = torch.tensor([c.logprob for c in content])
    torch.testing.assert_close(got, want[: len(got)], atol=2e-4, rtol=0)
    for c in content:  # greedy: the chosen token is the likeliest; alternatives sorted
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert [t.logprob for t in c.top_logprobs] == sorted(
            (t.logprob for t in c.top_logprobs), reverse=True
        )
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token


def test_echo_with_prompt_logprobs_and_token_prompts(served, client):
    _, model, tok = served
    ids = [tok.encode(PROMPT), tok.encode("Two plus two equals four")]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, prompt in zip(r.choices, ids):
        lp = choice.logprobs
        assert choice.text == tok.decode(prompt) and len(lp.tokens) == len(prompt)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        torch.testing.assert_close(
            torch.tensor(lp.token_logprobs[1:]), _logprobs(model, prompt), atol=2e-4, rtol=0
        )
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    one = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    lp = one.choices[0].logprobs
    assert one.choices[0].text.startswith(PROMPT) and len(lp.tokens) == len(ids[0]) + 1
    assert lp.top_logprobs[-1][lp.tokens[-1]] == max(lp.top_logprobs[-1].values())  # greedy


def test_logit_bias_penalties_ignore_eos_and_min_tokens(served, client):
    _, _, tok = served
    target = tok.encode(" banana", add_special_tokens=False)[0]
    r = client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text == tok.decode([target] * 4)
    plain = client.completions.create(model=NAME, prompt="one one one one", max_tokens=12, temperature=0)
    penalised = client.completions.create(
        model=NAME,
        prompt="one one one one",
        max_tokens=12,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=1.0,
    )
    words = lambda t: t.split()  # noqa: E731
    assert len(set(words(penalised.choices[0].text))) > len(set(words(plain.choices[0].text)))
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=40,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"
    short = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say hi."}], max_tokens=40, temperature=0
    )
    assert short.usage.completion_tokens < 30  # it stops by itself...
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=40,
        temperature=0,
        extra_body={"min_tokens": 30},
    )
    assert r.usage.completion_tokens >= 30  # ...unless told not to before 30 tokens


def test_best_of_returns_the_likeliest(served, client):
    kw = dict(
        model=NAME, prompt="My favourite animal is the", max_tokens=6, temperature=1.0, seed=11, logprobs=0
    )
    three = client.completions.create(n=3, **kw)
    best = client.completions.create(n=1, best_of=3, **kw)
    scores = [sum(c.logprobs.token_logprobs) for c in three.choices]
    assert best.choices[0].text == three.choices[scores.index(max(scores))].text


# ---- structured output ------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_json_schema_and_json_object(served, client):
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Give a city and its population as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}},
    )
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "population"} and isinstance(data["city"], str) and len(data["city"]) <= 20
    assert isinstance(data["population"], int) and data["population"] >= 0
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Describe Paris as a JSON object with keys name and country."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


def test_guided_choice_regex_and_bad_grammars(served, client):
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=5,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert r.choices[0].message.content in ("yes", "no")
    r = client.completions.create(
        model=NAME, prompt="The year is", max_tokens=8, temperature=0, extra_body={"guided_regex": r" \d{4}"}
    )
    assert len(r.choices[0].text) == 5 and r.choices[0].text[1:].isdigit()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body={"guided_regex": "(ab"})
    assert e.value.body["param"] == "guided_regex"


# ---- tools -------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}


def test_forced_tool_calls_and_the_round_trip(served, client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = client.chat.completions.create(
            model=NAME,
            messages=msgs,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=100,
            temperature=0,
            parallel_tool_calls=False,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        call = c.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in ("get_weather", "get_time")
        if isinstance(choice, dict):
            assert call.function.name == "get_time" and "tz" in json.loads(call.function.arguments)
    follow = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    r = client.chat.completions.create(
        model=NAME, messages=follow, tools=[WEATHER, TIME], max_tokens=12, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    streamed = list(
        client.chat.completions.create(
            model=NAME,
            messages=msgs,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=100,
            temperature=0,
            stream=True,
            parallel_tool_calls=False,
        )
    )
    calls = [tc for ch in streamed if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert (
        calls and calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["city"]
    )


def test_langchain_bind_tools_and_structured_output(served):
    pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    class City(BaseModel):  # strings only: a 135M model may write an integer that never ends
        city: str
        country: str

    llm = ChatOpenAI(base_url=served[0], api_key=KEY, model=NAME, temperature=0, max_tokens=60, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert (
        msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"]
    )
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(City, method=method).invoke("Paris is the capital of France.")
        assert isinstance(out, City), method


# ---- what is refused, and robustness -------------------------------------------------------------------------


def test_fields_that_are_not_honoured_are_refused_by_name(served, client):
    for extra in ({"suffix": "end"}, {"audio": {"voice": "alloy"}}, {"functions": [{"name": "f"}]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt="x", max_tokens=2, extra_body=extra)
        assert e.value.body["param"] == next(iter(extra))
    for bad in (
        {"seed": 2**70},
        {"stream": "false"},
        {"logit_bias": {"-1": 5}},
        {"best_of": 1, "n": 2},
        {"prompt": [[-1]]},
        {"max_tokens": 0},
    ):
        body = {"model": NAME, "prompt": "x", "max_tokens": 2, **bad}
        r = httpx.post(served[0] + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400, (bad, r.text)
    r = httpx.post(
        served[0] + "/chat/completions",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        content=b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
    )
    assert r.status_code in (200, 400)  # a lone surrogate: never a 500


def test_a_tiny_temperature_does_not_poison_its_batch(served, client):
    _, _model, _tok = served
    want = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text

    def ask(t):
        return (
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=t).choices[0].text
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(ask, [0, 0, 1e-40, 0, 0, 1e-40]))
    assert texts == [want] * 6  # below 1e-5 a temperature means greedy


def test_an_oversized_body_is_refused_before_it_is_read(served):
    base = served[0]
    big = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    r = httpx.post(
        base + "/completions",
        content=big,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert httpx.get(base.removesuffix("/v1") + "/health", timeout=5).status_code == 200


def test_a_non_streaming_client_that_hangs_up_frees_its_row(served):
    base = served[0]
    body = {
        "model": NAME,
        "prompt": "Once upon a time",
        "max_tokens": 4000,
        "temperature": 0,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
    health = base.removesuffix("/v1") + "/health"
    for _ in range(600):
        if httpx.get(health).json()["running"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(health).json()["running"] == 0


def test_lm_eval_local_completions_scores_equal_the_hf_backend(served, smol_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {
                    "question": "The capital of France is",
                    "choices": [" Paris", " London", " Berlin"],
                    "answer": 0,
                },
                {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
            ]
        )
    )
    (tmp_path / "srv_mc.yaml").write_text(
        f"task: srv_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    os.environ["OPENAI_API_KEY"] = KEY
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    kw = dict(tasks=["srv_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    ref = simple_evaluate(model="hf", model_args=f"pretrained={smol_dir},dtype=float32,device=cpu", **kw)
    got = simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url={served[0]}/completions,model={NAME},tokenizer={smol_dir},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1"
        ),
        **kw,
    )
    for a, b in zip(got["samples"]["srv_mc"], ref["samples"]["srv_mc"], strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in (
            (x[0], y[0]) for x, y in zip(a["resps"], b["resps"], strict=True)
        ):
            assert abs(ll_a - ll_b) < 1e-4 and greedy_a == greedy_b
    assert got["results"]["srv_mc"]["acc,none"] == ref["results"]["srv_mc"]["acc,none"]


def test_sigterm_stops_within_bounds_and_open_binding_warns(smol_dir):
    from autolm.bench.serving import running_server

    with running_server([smol_dir, "--host", "0.0.0.0"], wait_s=300) as (base, proc):
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            next(it)  # generating
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(httpx.HTTPError):
                lines += list(it)
        proc.wait(
            timeout=120
        )  # in-flight requests get a few seconds (--shutdown bound 5 s), not 4000 tokens' worth
        assert not any('"length"' in line for line in lines)  # it did not run to the end
        data = [line for line in lines if line.startswith("data: ")]  # it ended as a stream ends, not cut off
        assert (
            data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "abort"
        )
        err = proc.log()
    assert "WARNING: serving on 0.0.0.0 without --api-key" in err


def test_a_request_that_fails_inside_the_engine_fails_alone(smol_dir):
    """The engine itself: one row whose sampling raises (a broken grammar state) ends with an error event;
    the other rows of the same batch finish with the text they would have had alone."""
    import queue as queue_mod

    from autolm.generation import GenerationConfig
    from autolm.serve.engine import Engine, Sequence
    from autolm.serve.events import Failed, Finished

    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir)
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)

    class Broken:
        finished = False

        def mask(self, scores):
            raise RuntimeError("poisoned")

        def advance(self, token):
            pass

    engine = Engine(model, tok, max_batch=8)
    events: queue_mod.Queue = queue_mod.Queue()
    cfg = GenerationConfig(max_new_tokens=8, eos_token_id=2)
    prompt = tok.encode(PROMPT)
    seqs = [
        Sequence(
            prompt, cfg, [], (lambda ev, k=k: events.put((k, ev))), constraint=Broken() if k == 2 else None
        )
        for k in range(5)
    ]
    engine.pending.put(seqs[0])  # all five are admitted together: one prefill, one batch
    for s in seqs[1:]:
        engine.pending.put(s)
    results, errors = {}, {}
    while len(results) + len(errors) < 5:
        k, ev = events.get(timeout=300)
        if isinstance(ev, Failed):
            errors[k] = ev.message
        elif isinstance(ev, Finished):
            results[k] = ev.full_text
    engine.stop()
    assert list(errors) == [2] and "poisoned" in errors[2]
    want = autolm.generate_text(model, tok, prompt, max_new_tokens=8)
    assert all(text == want for text in results.values()) and len(results) == 4
