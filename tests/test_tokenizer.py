"""Tokenizer and chat templates: equal to transformers' tokenizer on the same files."""

from __future__ import annotations

import enum
import json
import os
import shutil
import typing

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


def test_named_templates_in_files_as_transformers_saves_them(tmp_path, smol_dir):
    """Several templates, saved by transformers as chat_template.jinja plus additional_chat_templates/<name>.jinja
    (files that replace tokenizer_config.json's template): read as transformers reads them, rendered by name, and
    saved so that transformers reads them back."""
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(smol_dir)
    ref.chat_template = {
        "default": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
        "tool_use": "{{ tools | length }} tools{% for m in messages %} [{{ m.content }}]{% endfor %}",
    }
    ref.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "additional_chat_templates" / "tool_use.jinja").is_file()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    ours = autolm.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert ours.chat_template == ref.chat_template and set(ours.chat_template) == {"default", "tool_use"}
    msgs, tools = [{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f"}}]
    for name in (None, "tool_use"):
        kw = dict(chat_template=name, tools=tools, tokenize=False)
        assert ours.apply_chat_template(msgs, **kw) == ref.apply_chat_template(msgs, **kw)
    written = ours.save_pretrained(tmp_path / "again")
    assert {os.path.relpath(p, tmp_path / "again") for p in written} >= {
        "chat_template.jinja",
        os.path.join("additional_chat_templates", "tool_use.jinja"),
    }
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == ref.chat_template
    # Saved over the folder transformers wrote: its template files are replaced, not left to win over the new ones.
    ours.chat_template = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    ours.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "additional_chat_templates").exists()
    for tok in (autolm, transformers):
        again = tok.AutoTokenizer.from_pretrained(tmp_path / "saved")
        assert again.chat_template == ours.chat_template
        assert again.apply_chat_template(msgs, tokenize=False) == "<hi>"


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


# ---- transformers' calling conventions, compared with only the import swapped ------------------------------

LONG = "The quick brown fox jumps over the lazy dog. " * 3


def _fresh(directory):
    import transformers

    return [
        transformers.AutoTokenizer.from_pretrained(directory),
        autolm.AutoTokenizer.from_pretrained(directory),
    ]


def _same(got, ref):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a == b, (i, a, b)


def test_pretrained_tokenizer_fast_constructed_as_transformers(smol_dir):
    """PreTrainedTokenizerFast(tokenizer_object=...) / (tokenizer_file=..., eos_token=..., pad_token=...), as
    transformers' documentation builds one around a `tokenizers` tokenizer; autolm's tokenizers are instances."""
    import tokenizers
    import transformers

    def user_code(lib):
        wrapped = lib.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(
            os.path.join(smol_dir, "tokenizer.json")), bos_token="<|im_start|>", eos_token="<|im_end|>")  # fmt: skip
        from_file = lib.PreTrainedTokenizerFast(tokenizer_file=os.path.join(smol_dir, "tokenizer.json"),
                                                eos_token="<|im_end|>", pad_token="<|im_end|>")  # fmt: skip
        batch = from_file(["Hello world", "Hi"], padding=True)
        return [wrapped("Hello <|im_end|> world")["input_ids"], wrapped.special_tokens_map, dict(batch),
                from_file.decode(batch["input_ids"][0], skip_special_tokens=True), from_file.pad_token_id]  # fmt: skip

    ref, got = user_code(transformers), user_code(autolm)
    _same(got, ref)
    assert isinstance(autolm.AutoTokenizer.from_pretrained(smol_dir), autolm.PreTrainedTokenizerFast)
    with pytest.raises(autolm.errors.TokenizerError, match="tokenizer_object= or tokenizer_file="):
        autolm.PreTrainedTokenizerFast()


def test_overflow_windows_special_mask_split_words_and_word_ids(smol_dir):
    def user_code(tok):
        facts = [
            dict(tok(LONG, truncation=True, max_length=8, stride=2, return_overflowing_tokens=True)),
            dict(
                tok(
                    [LONG, "short"],
                    truncation=True,
                    max_length=6,
                    stride=1,
                    return_overflowing_tokens=True,
                    padding=True,
                    return_special_tokens_mask=True,
                    return_length=True,
                )
            ),
            dict(tok("Hello world", return_special_tokens_mask=True, return_offsets_mapping=True)),
        ]
        enc = tok(["Hello", "there", "friend"], is_split_into_words=True)
        facts.append((dict(enc), enc.tokens(), enc.word_ids()))
        enc = tok(
            [["a", "bc"], ["de", "f", "gh"]], is_split_into_words=True, padding=True, padding_side="left"
        )
        facts.append((dict(enc), enc.tokens(1), enc.word_ids(0), enc.word_ids(1), enc.sequence_ids(1)))
        enc = tok("first part", "second part")
        facts.append((enc.tokens(), enc.word_ids(), enc.sequence_ids(), enc.char_to_token(3)))
        return facts

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    _same(got, ref)
    assert len(ref[0]["input_ids"]) > 1  # the windows are there


def test_pad_and_transformers_data_collator(smol_dir):
    from transformers import DataCollatorForLanguageModeling

    def user_code(tok):
        tok.pad_token = tok.eos_token
        rows = [tok("Hello world"), tok("a much longer second sentence here"), tok("x")]
        facts = [
            {k: v.tolist() for k, v in tok.pad(rows, return_tensors="pt").items()},
            dict(tok.pad({"input_ids": [[1, 2, 3], [4]]}, padding_side="left", pad_to_multiple_of=4)),
            dict(tok.pad({"input_ids": [1, 2]}, padding="max_length", max_length=5)),
            dict(tok.pad({"input_ids": [[1, 2], [3]], "special_tokens_mask": [[0, 0], [1]]}, padding=False)),
        ]
        batch = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False, pad_to_multiple_of=8)(
            [{"input_ids": r["input_ids"]} for r in rows]
        )
        facts.append({k: v.tolist() for k, v in batch.items()})
        return facts

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    _same(got, ref)


def test_special_tokens_map_settable_ids_and_tokens_to_string(smol_dir):
    def user_code(tok):
        facts = [tok.special_tokens_map, tok.pad_token, tok.pad_token_id]
        tok.pad_token_id = 5
        facts += [tok.pad_token, tok.pad_token_id, tok.special_tokens_map]
        tok.pad_token = tok.eos_token
        facts += [tok.pad_token_id, tok("a", padding="max_length", max_length=3)["input_ids"]]
        tok.eos_token_id = 7
        facts += [tok.eos_token, tok.convert_tokens_to_string(tok.tokenize("Hello there, how's it going?"))]
        facts.append(tok.convert_ids_to_tokens(tok.encode("Hi there")))
        return facts

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    _same(got, ref)


def test_clean_up_tokenization_spaces_as_transformers(smol_dir, tmp_path):
    """transformers 5 skips the cleanup for BPE vocabularies (it would remove real spaces) and applies it to
    others; a word-level tokenizer.json shows the second case."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "Hello", ",", "world", "!", "It", "'s", "fine", "."]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}))
    for directory in (smol_dir, tmp_path):

        def user_code(tok):
            ids = tok.encode("Hello , world ! It 's fine .")
            return [tok.decode(ids)] + [
                tok.decode(ids, clean_up_tokenization_spaces=c) for c in (True, False)
            ]

        ref, got = (user_code(t) for t in _fresh(directory))
        assert got == ref
    assert ref[1] == "Hello, world! It's fine."  # the word-level case did clean up


def test_chat_template_on_a_batch_gives_one_row_each(smol_dir):
    convs = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "What is 2+2? Tell me."},
            {"role": "assistant", "content": "Four.", "tool_calls": None},
        ],
    ]

    def user_code(tok):
        tok.pad_token = tok.eos_token
        out = tok.apply_chat_template(convs, add_generation_prompt=True, padding=True, return_tensors="pt")
        return [
            tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=True),
            {k: v.tolist() for k, v in out.items()},
            tok.apply_chat_template(convs, add_generation_prompt=True, return_dict=False),
            tok.apply_chat_template(convs[1], continue_final_message=True, tokenize=False),
        ]

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    _same(got, ref)
    assert len(ref[1]["input_ids"]) == 2


def test_assistant_tokens_mask_as_transformers(smol_dir):
    """return_assistant_tokens_mask=True (TRL's assistant-only loss): the tokens of the template's
    {% generation %} blocks marked 1, one conversation, a padded batch and tensors, as transformers marks them;
    a template without such blocks marks none."""
    with open(os.path.join(os.path.dirname(__file__), "data", "chat_templates", "smollm3-3b.jinja")) as f:
        tracked = f.read()
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six, of course."},
        ],
    ]

    def user_code(tok):
        tok.pad_token = tok.eos_token
        kw = dict(return_dict=True, return_assistant_tokens_mask=True)
        padded = tok.apply_chat_template(
            convs, chat_template=tracked, padding=True, return_tensors="pt", **kw
        )
        return [
            dict(tok.apply_chat_template(convs[1], chat_template=tracked, **kw)),
            {k: v.tolist() for k, v in padded.items()},
            dict(tok.apply_chat_template(convs[0], **kw)),  # SmolLM2's own template: no generation blocks
        ]

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    _same(got, ref)
    assert sum(ref[0]["assistant_masks"]) > 8 and not any(ref[2]["assistant_masks"])


class Unit(enum.Enum):
    C = "celsius"
    F = "fahrenheit"


def get_weather(
    location: str, unit: Unit = Unit.C, days: int | None = None, hours: list[int] = ()
) -> dict[str, float]:
    """
    Get the weather forecast.

    Args:
        location: The city, for example
            "Paris, France"
        unit: The unit of temperature
        days: How many days ahead
        hours: Which hours of each day

    Returns:
        The temperature by hour
    """


def pick(mode: typing.Literal["fast", 2, None], size: str, pair: tuple[int, str], extra: float | str = 1.0):
    """Pick something.

    Args:
        mode: How to pick
        size: The size (choices: ["small", "large"])
        pair: A pair
        extra: Anything else
    """


class Calculator:
    def add(self, a: float, b: float) -> float:
        """Add two numbers.

        Args:
            a: The first
            b: The second
        """


def test_python_functions_as_tools_give_transformers_schemas(smol_dir):
    from transformers.utils import get_json_schema
    from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

    for func in (get_weather, pick, Calculator().add):
        assert autolm.get_json_schema(func) == get_json_schema(func)

    def undocumented(x: int):
        pass

    def untyped(x):
        """Untyped.

        Args:
            x: a value
        """

    def undescribed(x: int, y: int):
        """Half described.

        Args:
            x: a value
        """

    for bad in (undocumented, untyped, undescribed):
        with pytest.raises((DocstringParsingException, TypeHintParsingException)):
            get_json_schema(bad)
        with pytest.raises(TokenizerError, match=bad.__name__):
            autolm.get_json_schema(bad)

    template = (
        "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "Weather in Paris?"}]

    def user_code(tok):
        return tok.apply_chat_template(
            msgs, tools=[get_weather, pick], chat_template=template, tokenize=False
        )

    ref, got = (user_code(t) for t in _fresh(smol_dir))
    assert got == ref and '"get_weather"' in ref


def test_special_tokens_declared_only_in_tokenizer_config_are_special(tmp_path):
    """tokenizer_config.json's added_tokens_decoder and named special tokens that tokenizer.json lists as plain
    vocabulary are split out whole and skipped when decoding, as transformers does."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    transformers = pytest.importorskip("transformers")
    vocab = ["<unk>", "h", "i", "<", ">", "|", "e", "n", "d", "hi", "<|end|>", "<|tool|>", "<|user|>"]
    backend = Backend(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.save(str(tmp_path / "tokenizer.json"))
    tool = {"content": "<|tool|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False}
    config = {
        "eos_token": "<|end|>",
        "additional_special_tokens": ["<|user|>"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {"11": {**tool, "single_word": False}},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    text = "<|user|>hi<|end|>h<|tool|>i"
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"] == [12, 1, 2, 10, 1, 11, 2]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert len(tok) == len(ref)


def test_text_target_and_model_max_length_as_transformers(tokenizers):
    """text_target (labels beside the inputs, or alone) and model_max_length (transformers' huge default where the
    config sets none, so min(tok.model_max_length, n) runs; a value set truncates), as transformers' tokenizer."""
    ours, ref = tokenizers
    for kwargs in (
        {"text": ["a b", "c"], "text_target": ["x", "y z"], "padding": True},
        {"text_target": "hello"},
    ):
        assert {k: list(v) for k, v in ours(**kwargs).items()} == {
            k: list(v) for k, v in ref(**kwargs).items()
        }
    assert ours.model_max_length == ref.model_max_length and min(ours.model_max_length, 64) == 64
    before, ours.model_max_length = ours.model_max_length, 16
    try:
        assert len(ours("a " * 40, truncation=True)["input_ids"]) == 16
    finally:
        ours.model_max_length = before
