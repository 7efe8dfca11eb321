"""`autolm serve --task embed`: /v1/embeddings as vLLM serves a pooling model, driven by openai's client (which asks
for base64 by default) and langchain-openai's OpenAIEmbeddings; the vectors are the body's last-token states,
normalised, as AutoModel gives them here. `--task classify`: /classify with a sequence classifier's
probabilities, as AutoModelForSequenceClassification gives them here."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F
from conftest import write_char_tokenizer
from test_server import KEY, NAME, serving

import autolm

TEXTS = ["hello world", "The capital of France is Paris.", "a"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def embed_dir(smol_dir, tmp_path_factory):
    """The real model's folder with a sentence-transformers pooling config asking for mean pooling, and one
    declaring Matryoshka dimensions."""
    out = {}
    for kind in ("mean", "matryoshka"):
        d = tmp_path_factory.mktemp(kind)
        for f in os.listdir(smol_dir):
            if os.path.isfile(os.path.join(smol_dir, f)):
                shutil.copy(os.path.join(smol_dir, f), d / f)
        if kind == "mean":
            (d / "1_Pooling").mkdir()
            (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        else:
            config = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [64, 128]}))
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def body(smol_dir):
    return autolm.AutoModel.from_pretrained(smol_dir), autolm.AutoTokenizer.from_pretrained(smol_dir)


def _last_token(body, text: str) -> torch.Tensor:
    model, tok = body
    with torch.no_grad():
        return F.normalize(model(**tok(text, return_tensors="pt")).last_hidden_state[0, -1].float(), dim=-1)


def test_openai_and_langchain_embeddings(smol_dir, body):
    from langchain_openai import OpenAIEmbeddings

    with serving(smol_dir, "--task", "embed") as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)
        batch = client.embeddings.create(model=NAME, input=TEXTS)  # base64 on the wire
        assert [d.index for d in batch.data] == [0, 1, 2] and batch.model == NAME
        want = torch.stack([_last_token(body, t) for t in TEXTS])
        torch.testing.assert_close(
            torch.tensor([d.embedding for d in batch.data]), want, atol=1e-4, rtol=1e-4
        )
        n = sum(len(body[1](t)["input_ids"]) for t in TEXTS)
        assert batch.usage.prompt_tokens == batch.usage.total_tokens == n
        ids = body[1]("hello world")["input_ids"]
        floats = client.embeddings.create(model=NAME, input=[ids], encoding_format="float")
        torch.testing.assert_close(torch.tensor(floats.data[0].embedding), want[0], atol=1e-5, rtol=1e-5)
        raw = httpx.post(base + "/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                         json={"input": "hello world", "truncate_prompt_tokens": 1}, timeout=300).json()  # fmt: skip
        assert (
            raw["object"] == "list" and raw["usage"]["prompt_tokens"] == 1 and raw["id"].startswith("embd-")
        )
        _scores_are_cosines(base, body, want)
        _pooling_and_chat_embeddings(base, body, want)
        lc = OpenAIEmbeddings(model=NAME, base_url=base, api_key=KEY, check_embedding_ctx_length=False)
        torch.testing.assert_close(torch.tensor(lc.embed_query(TEXTS[1])), want[1], atol=1e-5, rtol=1e-5)
        assert len(lc.embed_documents(TEXTS)) == 3
        for call, match in (
            (lambda: client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}]),
             "does not support Chat Completions"),
            (lambda: client.embeddings.create(model=NAME, input="x", dimensions=8), "matryoshka"),
            (lambda: client.embeddings.create(model=NAME, input=[[10**6]]), "vocabulary"),
            (lambda: client.embeddings.create(model=NAME, input="x" * 40000), "maximum context length"),
        ):  # fmt: skip
            with pytest.raises(openai.BadRequestError, match=match):
                call()
        assert httpx.get(base.removesuffix("/v1") + "/health").json()["status"] == "ok"


def _scores_are_cosines(base: str, body, want: torch.Tensor) -> None:
    """vLLM's /score and /rerank on an embedding model: the cosine of the two texts' embeddings (want: the
    TEXTS' normalised vectors), the tokens counted per pair with the pad token between."""
    url, headers, tok = base.removesuffix("/v1"), {"Authorization": f"Bearer {KEY}"}, body[1]
    got = httpx.post(url + "/score", headers=headers, json={"model": NAME, "text_1": TEXTS[0], "text_2": TEXTS},
                     timeout=300).json()  # fmt: skip
    assert (
        got["object"] == "list"
        and got["id"].startswith("score-")
        and [d["index"] for d in got["data"]] == [0, 1, 2]
    )
    torch.testing.assert_close(
        torch.tensor([d["score"] for d in got["data"]]), want @ want[0], atol=1e-4, rtol=1e-4
    )
    n = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert got["usage"]["prompt_tokens"] == sum(n[0] + int(tok.pad_token_id is not None) + k for k in n)
    pairs = httpx.post(url + "/v1/score", headers=headers, json={"text_1": TEXTS[:2], "text_2": TEXTS[1:]},
                       timeout=300).json()["data"]  # fmt: skip
    torch.testing.assert_close(torch.tensor([d["score"] for d in pairs]), (want[:2] * want[1:]).sum(-1),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    ranked = httpx.post(url + "/rerank", headers=headers, json={"query": TEXTS[1], "documents": TEXTS, "top_n": 2},
                        timeout=300).json()  # fmt: skip
    order = (want @ want[1]).argsort(descending=True)[:2].tolist()
    assert [r["index"] for r in ranked["results"]] == order and ranked["id"].startswith("rerank-")
    assert [r["document"]["text"] for r in ranked["results"]] == [TEXTS[i] for i in order]


def _pooling_and_chat_embeddings(base: str, body, want: torch.Tensor) -> None:
    """vLLM's /pooling on an embedding server (the embed task's vectors, token_embed's per token) and the chat
    form of /v1/embeddings (the conversation through the chat template, no generation prompt)."""
    url, headers, (model, tok) = base.removesuffix("/v1"), {"Authorization": f"Bearer {KEY}"}, body

    def post(path, **json):
        return httpx.post(url + path, headers=headers, json={"model": NAME, **json}, timeout=300).json()

    pooled = post("/pooling", input=TEXTS)
    assert pooled["id"].startswith("pool-") and [d["object"] for d in pooled["data"]] == ["pooling"] * 3
    torch.testing.assert_close(torch.tensor([d["data"] for d in pooled["data"]]), want, atol=1e-4, rtol=1e-4)
    per_token = post("/pooling", input=TEXTS[1], task="token_embed")["data"][0]["data"]
    ids = tok(TEXTS[1], return_tensors="pt")
    with torch.no_grad():
        states = model(**ids).last_hidden_state[0].float()
    torch.testing.assert_close(torch.tensor(per_token), F.normalize(states, dim=-1), atol=1e-4, rtol=1e-4)
    assert "not supported" in post("/pooling", input="x", task="classify")["error"]["message"]
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    chat = post("/v1/embeddings", messages=messages)
    rendered = tok(
        tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False, return_tensors="pt"
    )
    with torch.no_grad():
        last = model(**rendered).last_hidden_state[0, -1].float()
    torch.testing.assert_close(torch.tensor(chat["data"][0]["embedding"]), F.normalize(last, dim=-1),
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert chat["usage"]["prompt_tokens"] == rendered["input_ids"].shape[1]


def test_pooling_config_and_matryoshka_dimensions(embed_dir, body):
    """A sentence-transformers pooling config chooses mean pooling; a Matryoshka model's vector is cut to the
    dimensions asked for and normalised again (others refused)."""
    model, tok = body
    with serving(embed_dir["mean"], "--task", "embed") as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)
        got = client.embeddings.create(model=NAME, input=TEXTS[1]).data[0].embedding
    with torch.no_grad():
        mean = model(**tok(TEXTS[1], return_tensors="pt")).last_hidden_state[0].float().mean(0)
    torch.testing.assert_close(torch.tensor(got), F.normalize(mean, dim=-1), atol=1e-5, rtol=1e-5)
    with serving(embed_dir["matryoshka"], "--task", "embed") as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)
        cut = client.embeddings.create(model=NAME, input=TEXTS[0], dimensions=64).data[0].embedding
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model=NAME, input=TEXTS[0], dimensions=100)
    torch.testing.assert_close(torch.tensor(cut), F.normalize(_last_token(body, TEXTS[0])[:64], dim=-1),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_classify_serves_a_sequence_classifier(checkpoint, tmp_path):
    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    torch.manual_seed(0)
    made = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=3, pad_token_id=0
    )
    made.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    made.save_pretrained(tmp_path / "cls")
    write_char_tokenizer(str(tmp_path / "cls"))
    model = autolm.AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls")
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path / "cls")
    with serving(str(tmp_path / "cls"), "--task", "classify") as base:
        url, headers = base.removesuffix("/v1") + "/classify", {"Authorization": f"Bearer {KEY}"}
        body = httpx.post(url, headers=headers, json={"model": NAME, "input": TEXTS}, timeout=300).json()
        with pytest.raises(openai.BadRequestError, match="does not support Embeddings"):
            openai.OpenAI(base_url=base, api_key=KEY, max_retries=0).embeddings.create(model=NAME, input="x")
        several = httpx.post(base.removesuffix("/v1") + "/score", headers=headers,
                             json={"text_1": "a", "text_2": "b"}, timeout=300).json()  # fmt: skip
        raw = httpx.post(
            url, headers=headers, json={"input": TEXTS[0], "use_activation": False}, timeout=300
        ).json()
        pooled = httpx.post(base.removesuffix("/v1") + "/pooling", headers=headers,
                            json={"input": TEXTS[0], "task": "token_classify"}, timeout=300).json()  # fmt: skip
        chat = httpx.post(url, headers=headers, json={"messages": [{"role": "user", "content": TEXTS[1]}],
                                                      "chat_template": TEMPLATE}, timeout=300).json()  # fmt: skip
    assert "cross-encoder with one" in several["error"]["message"]
    assert body["object"] == "list" and body["id"].startswith("classify-") and len(body["data"]) == 3
    for row, text in zip(body["data"], TEXTS):
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).logits[0].softmax(-1)
        torch.testing.assert_close(torch.tensor(row["probs"]), want, atol=1e-5, rtol=1e-5)
        assert row["num_classes"] == 3 and row["label"] == ["neg", "neu", "pos"][int(want.argmax())]
    assert body["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    with torch.no_grad():
        logits = model(**tok(TEXTS[0], return_tensors="pt")).logits[0]
    torch.testing.assert_close(torch.tensor(raw["data"][0]["probs"]), logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # token_classify: the score head at every token
        states = autolm.AutoModel.from_pretrained(tmp_path / "cls")(**tok(TEXTS[0], return_tensors="pt"))
        every = model.score(states.last_hidden_state[0]).softmax(-1)
    torch.testing.assert_close(torch.tensor(pooled["data"][0]["data"]), every, atol=1e-5, rtol=1e-5)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": TEXTS[1]}], chat_template=TEMPLATE, tokenize=False
    )
    with torch.no_grad():  # /classify's chat form: the conversation as the template renders it
        want = model(**tok(rendered, add_special_tokens=False, return_tensors="pt")).logits[0].softmax(-1)
    torch.testing.assert_close(torch.tensor(chat["data"][0]["probs"]), want, atol=1e-5, rtol=1e-5)


def _cross_encoder(checkpoint, directory) -> None:
    """A one-label llama classifier saved by transformers, with a tokenizer whose pair template puts </s> between
    the two texts (as a cross-encoder's does)."""
    import transformers
    from tokenizers import Tokenizer, processors

    source, _ = checkpoint("llama_gqa_llama3_sharded")
    torch.manual_seed(1)
    transformers.AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, pad_token_id=0
    ).save_pretrained(directory)
    write_char_tokenizer(str(directory))
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B:1", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tok.save(str(directory / "tokenizer.json"))


def test_score_and_rerank_with_a_cross_encoder(checkpoint, tmp_path):
    """vLLM's /score and /rerank on a cross-encoder (--task classify, one label): each pair encoded together as
    the tokenizer encodes a text pair, its logit through a sigmoid; as transformers' classifier and tokenizer
    give them."""
    import transformers

    _cross_encoder(checkpoint, tmp_path / "ce")
    made = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ce")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ce")
    query, docs = "what is the capital?", ["Paris is the capital of France.", "a cat", "The capital is Paris"]
    enc = hf_tok([query] * 3, docs, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = made(**enc).logits[:, 0]
    with serving(str(tmp_path / "ce"), "--task", "score") as base:
        url, headers = base.removesuffix("/v1"), {"Authorization": f"Bearer {KEY}"}

        def post(path, **body):
            return httpx.post(url + path, headers=headers, json={"model": NAME, **body}, timeout=300)

        scores = post("/score", text_1=query, text_2=docs).json()
        raw = post("/v1/score", text_1=[query] * 3, text_2=docs, use_activation=False).json()
        ranked = post("/v2/rerank", query=query, documents=docs, top_n=2).json()
        everything = post("/v1/rerank", query=query, documents=docs).json()
        truncated = post("/score", text_1=query, text_2=docs[0], truncate_prompt_tokens=12).json()
        uneven = post("/score", text_1=[query, query], text_2=docs)
        classified = post("/classify", input=[query]).json()
    torch.testing.assert_close(
        torch.tensor([d["score"] for d in scores["data"]]), logits.sigmoid(), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(torch.tensor([d["score"] for d in raw["data"]]), logits, atol=1e-5, rtol=1e-5)
    assert scores["usage"]["prompt_tokens"] == int(enc["attention_mask"].sum())
    order = logits.argsort(descending=True).tolist()
    assert [r["index"] for r in ranked["results"]] == order[:2] and ranked["usage"]["total_tokens"] == int(
        enc["attention_mask"].sum()
    )
    assert [r["index"] for r in everything["results"]] == order
    assert [r["document"]["text"] for r in everything["results"]] == [docs[i] for i in order]
    one = hf_tok(query, docs[0], truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        want = made(**one).logits[0, 0].sigmoid()
    assert truncated["usage"]["prompt_tokens"] == 12
    torch.testing.assert_close(torch.tensor(truncated["data"][0]["score"]), want, atol=1e-5, rtol=1e-5)
    assert uneven.status_code == 400 and "1:1, 1:N or N:N" in uneven.json()["error"]["message"]
    assert classified["data"][0]["num_classes"] == 1


def test_embeddings_with_a_lora_adapter_by_name(smol_dir, body, tmp_path):
    """`autolm serve --task embed --adapter NAME=PATH`: /v1/embeddings with model NAME runs the adapter, with the
    base model's name runs without it, as the body with and without its adapter gives them here."""
    import autolm.lora

    tok = body[1]
    torch.manual_seed(0)
    pm = autolm.lora.get_peft_model(
        autolm.AutoModel.from_pretrained(smol_dir),
        autolm.lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    pm.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        adapted = F.normalize(
            pm(**tok(TEXTS[1], return_tensors="pt")).last_hidden_state[0, -1].float(), dim=-1
        )
    with serving(smol_dir, "--task", "embed", "--adapter", f"tuned={tmp_path / 'lora'}") as base:
        client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=300)
        names = [m.id for m in client.models.list().data]
        tuned = client.embeddings.create(model="tuned", input=TEXTS[1]).data[0].embedding
        plain = client.embeddings.create(model=names[0], input=TEXTS[1]).data[0].embedding
    assert names[1:] == ["tuned"]
    torch.testing.assert_close(torch.tensor(tuned), adapted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(plain), _last_token(body, TEXTS[1]), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(adapted, _last_token(body, TEXTS[1]), atol=1e-3)


def test_a_causal_reranker_served_by_its_yes_and_no_tokens(checkpoint, tmp_path):
    """Qwen3-Reranker as vLLM serves it (`--hf-overrides` with classifier_from_token and
    is_original_qwen3_reranker, no --task: the architecture named makes it a classifier): /rerank's score of a pair
    is the causal LM's probability of "yes" against "no" after the two texts, as transformers' causal LM gives it."""
    directory, ref = checkpoint("qwen3")  # untied: the score is made from the file's lm_head rows
    shutil.copytree(directory, tmp_path / "rr")
    write_char_tokenizer(str(tmp_path / "rr"))
    overrides = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["n", "y"],
                 "is_original_qwen3_reranker": True}  # fmt: skip
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path / "rr")
    no, yes = tok.convert_tokens_to_ids(["n", "y"])
    query, docs = "<Query>: capital?\n", ["<Document>: Paris\n", "<Document>: a cat\n"]
    want = []
    for doc in docs:
        with torch.no_grad():
            logits = ref(**tok(query, doc, return_tensors="pt")).logits[0, -1]
        want.append(logits[[no, yes]].softmax(-1)[1])
    with serving(str(tmp_path / "rr"), "--hf-overrides", json.dumps(overrides)) as base:
        got = httpx.post(base.removesuffix("/v1") + "/rerank", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": NAME, "query": query, "documents": docs}, timeout=300).json()  # fmt: skip
    scores = torch.tensor([r["relevance_score"] for r in sorted(got["results"], key=lambda r: r["index"])])
    torch.testing.assert_close(scores, torch.stack(want), atol=1e-5, rtol=1e-5)
