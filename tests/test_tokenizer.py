"""Tokenizer and chat templates: equal to transformers' tokenizer on the same files."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import autolm
from autolm.errors import TokenizerError

CORPUS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog 1234567890.",
    "你好，世界！今天天气很好。",
    "日本語のテキストです。カタカナとひらがな。",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading spaces,\ttabs\r\nand CRLF  ",
    "<|im_start|>user\nspecial tokens inside<|im_end|>",
    "",
    "Ünïcödé àccents — dashes … ellipsis",
]


@pytest.fixture(scope="module")
def tokenizers(smol_dir):
    import transformers

    return autolm.AutoTokenizer.from_pretrained(smol_dir), transformers.AutoTokenizer.from_pretrained(
        smol_dir
    )


def test_ids_and_text_equal_transformers(tokenizers):
    ours, ref = tokenizers
    for text in CORPUS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.batch_decode([ours.encode(t) for t in CORPUS]) == ref.batch_decode(
        [ref.encode(t) for t in CORPUS]
    )


def test_padding_truncation_and_tensors(tokenizers):
    ours, ref = tokenizers
    texts = CORPUS[:3]
    for side in ("left", "right"):
        a = ours(texts, padding=True, return_tensors="pt", padding_side=side)
        ref.padding_side = side
        b = ref(texts, padding=True, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(
            a["attention_mask"], b["attention_mask"]
        )
    a = ours(texts, truncation=True, max_length=5)
    assert a["input_ids"] == ref(texts, truncation=True, max_length=5)["input_ids"]
    with pytest.raises(TokenizerError, match="padding=True"):
        ours(texts, return_tensors="pt")


def test_chat_template_renders_like_transformers(tokenizers):
    ours, ref = tokenizers
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "日本語で?"},
        ],
    ]
    for msgs in conversations:
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, return_tensors="pt")["input_ids"]
            assert torch.equal(
                ids,
                ref.apply_chat_template(msgs, add_generation_prompt=gen, return_tensors="pt")["input_ids"],
            )


def test_template_semantics_raise_exception_and_special_tokens(tmp_path, smol_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smol_dir, name), tmp_path)
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}"
        "{{ raise_exception('no tools here') }}{% endif %}{{ m.content | tojson }}{% endfor %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)  # a .jinja file wins over tokenizer_config.json
    import transformers

    ours, ref = (
        autolm.AutoTokenizer.from_pretrained(tmp_path),
        transformers.AutoTokenizer.from_pretrained(tmp_path),
    )
    msgs = [{"role": "user", "content": 'é "quoted"'}]
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)
    assert ours.apply_chat_template(msgs, tokenize=False).startswith(ours.bos_token)
    with pytest.raises(TokenizerError, match="no tools here"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_save_round_trip(tmp_path, tokenizers):
    ours, _ref = tokenizers
    ours.save_pretrained(tmp_path)
    again = autolm.AutoTokenizer.from_pretrained(tmp_path)
    import transformers

    ref2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS:
        assert again.encode(text) == ours.encode(text) == ref2.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs, tokenize=False) == ours.apply_chat_template(msgs, tokenize=False)


def test_missing_or_corrupt_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        autolm.AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be parsed"):
        autolm.AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    with pytest.raises(TokenizerError):
        autolm.AutoTokenizer.from_pretrained(tmp_path)
