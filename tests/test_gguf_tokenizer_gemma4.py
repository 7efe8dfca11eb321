"""Gemma 4's vocabulary in GGUF (tokenizer.ggml.model "gemma4"): a small Gemma-4-style tokenizer made as
transformers' Gemma 4 converter makes the real one (GemmaTokenizer over SentencePiece-style pieces, scores and
generated merges, Gemma 4's special tokens), written as llama.cpp's converter writes it (its set_vocab, run with
gguf-py's LlamaHfVocab and SpecialVocab), reads back in autolm as transformers' tokenizer from tokenizer.json and,
where llama-cpp-python is installed, as llama.cpp itself tokenizes the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import autolm
from autolm.errors import GGUFError

SPACE = "\u2581"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, hello again.",
    "def main():\n    return the answer\n\n",
    "tokenizers turn text into tokens and tokens into text",
    "  indented  lines   with    spaces",
    "Über café naïve résumé",
    "the theory of the thing is that there",
    "user model system turn channel thought",
] * 3
# Gemma 4's control tokens (ids 0-4 as in the real vocabulary) and its named extra special tokens
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
EXTRA = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>", "audio_token": "<|audio|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "sot_token": "<|turn>", "eot_token": "<turn|>",
    "soc_token": "<|channel>", "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>", "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>", "std_token": "<|tool>", "etd_token": "<tool|>",
}  # fmt: skip
# the tokens llama.cpp's converter types USER_DEFINED so that they are always rendered
VISIBLE = {
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
    '<|"|>',
}
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "  indented  lines   with    spaces\tand a tab",
    "line one\nline two\n\nline four\n\n\n\nafter four\n\n\n\n\n\n\nseven\n",
    "\n\nstarts with newlines",
    "digits 0123456789 and 3.14159, 1,000,000",
    "Über café naïve résumé — 日本語 😊 🫩",
    "<bos><|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>4<turn|>",
    '<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|><|tool_response>ok<tool_response|><eos>',
    "unknown <unused> <|not a token|> pieces",
    "",
]


def _drop(text: str) -> str:
    """The text without the visible markers."""
    for marker in VISIBLE:
        text = text.replace(marker, "")
    return text


def _pieces() -> list[str]:
    """SentencePiece-style BPE pieces ("\u2581" for spaces, none across a newline), in the order learnt."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n+"), "isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
        ]
    )
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, show_progress=False))
    vocab = t.get_vocab()
    return [p for p in sorted(vocab, key=vocab.get) if "\n" not in p]


def write_gemma4_tokenizer(directory: str):
    """A Gemma-4-style tokenizer.json + tokenizer_config.json, made as transformers' convert_gemma4_weights.py
    makes the real one: GemmaTokenizer(vocab, merges) with the merges SentencePieceExtractor generates from the
    pieces' scores (control, newline and byte pieces scored 0 like SentencePiece's, learnt pieces by rank)."""
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    fixed = SPECIAL + list(EXTRA.values()) + NEWLINES + [f"<0x{b:02X}>" for b in range(256)]
    order = list(dict.fromkeys(fixed + [SPACE * 2, SPACE * 4] + _pieces()))
    vocab = {p: i for i, p in enumerate(order)}
    scores = {p: 0.0 if i < len(fixed) else -float(i) for p, i in vocab.items()}
    scores[SPACE * 2] = scores[SPACE * 4] = 0.0
    tok = transformers.GemmaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True, padding_side="left",
        extra_special_tokens=EXTRA,
    )  # fmt: skip
    tok.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


def write_gemma4_vocab_gguf(directory: str, path: str) -> str:
    """The vocabulary-only GGUF llama.cpp's converter writes for Gemma 4 (Gemma4Model.set_vocab)."""
    import gguf

    vocab = gguf.LlamaHfVocab(Path(directory))
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in VISIBLE else toktype)
    writer = gguf.GGUFWriter(path, "gemma4")
    writer.add_tokenizer_model("gemma4")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(Path(directory), load_merges=True).add_to_gguf(writer)
    writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gemma4_files(tmp_path_factory):
    """(transformers' tokenizer from tokenizer.json, the GGUF's path)."""
    directory = str(tmp_path_factory.mktemp("gemma4-tokenizer"))
    hf = write_gemma4_tokenizer(directory)
    return hf, write_gemma4_vocab_gguf(directory, os.path.join(directory, "vocab.gguf"))


def test_the_file_is_the_converters(gemma4_files):
    """The emulated file has what llama.cpp's converter writes for Gemma 4, and the tokenizer it came from is a
    SentencePiece-style BPE with byte fallback (the guard that the fixture is the real kind)."""
    import gguf

    hf, path = gemma4_files
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "gemma4"
    assert "tokenizer.ggml.merges" in fields and "tokenizer.ggml.pre" not in fields
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True
    model = hf.backend_tokenizer.model
    assert type(model).__name__ == "BPE" and model.byte_fallback and len(hf.get_vocab()) > 400


def test_gguf_tokenizer_equals_transformers(gemma4_files):
    """autolm's tokenizer from the GGUF encodes and decodes as transformers' from tokenizer.json: spaces (no
    prefix space), newline runs, digits, byte fallback, special and visible tokens, and <bos> added."""
    hf, path = gemma4_files
    tok = autolm.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>" and tok.unk_token == "<unk>"
    assert tok.pad_token == "<pad>"
    for text in TEXTS:
        ids = hf.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == hf.decode(ids), text
        # the visible markers are user tokens in the file (always rendered), special ones in transformers
        assert _drop(tok.decode(ids, skip_special_tokens=True)) == hf.decode(ids, skip_special_tokens=True), (
            text
        )
    assert hf.convert_ids_to_tokens(hf.encode("a\n\n\nb")[2:3]) == ["\n\n\n"]  # a newline run, whole
    assert tok.encode("Hello", add_special_tokens=False) == hf.encode("Hello", add_special_tokens=False)


def _rewrite(path: str, out: str, **changes) -> str:
    """A copy of the vocabulary file with some tokenizer.ggml.<key> values replaced."""
    import gguf

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, "gemma4")
    for field in reader.fields.values():
        key = field.name.removeprefix("tokenizer.ggml.")
        if field.name.startswith("tokenizer."):
            value = changes.pop(key) if key in changes else field.contents()
            writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1])
    assert not changes, changes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _vocab(path: str) -> dict:
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type", "merges")}


def _tokenizers(path: str):
    """(autolm's tokenizer of the file, llama.cpp's or None)."""
    tok = autolm.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    try:
        import llama_cpp
    except ImportError:
        return tok, None
    return tok, llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)


def test_bos_is_added_even_where_the_file_says_not(gemma4_files, tmp_path):
    """llama.cpp adds <bos> to a "gemma4" vocabulary whatever tokenizer.ggml.add_bos_token says; autolm too."""
    hf, path = gemma4_files
    tok, llm = _tokenizers(_rewrite(path, str(tmp_path / "nobos.gguf"), add_bos_token=False))
    assert tok.encode("Hello world!") == hf.encode("Hello world!")
    if llm is not None:
        assert llm.tokenize(b"Hello world!", add_bos=True, special=True) == hf.encode("Hello world!")


def test_a_newline_run_that_is_a_token_stays_whole_without_its_merges(gemma4_files, tmp_path):
    """llama.cpp takes a run of newlines that is a token whole, merges or none: with the file's merges of
    newlines taken out, "\n\n\n" is still one token (and with them, a run no token holds is merged as
    llama.cpp merges it: the texts of test_llama_cpp_tokenizes_the_file_as_autolm)."""
    _, path = gemma4_files
    merges = [m for m in _vocab(path)["merges"] if m.replace(" ", "").strip("\n")]
    assert len(merges) < len(_vocab(path)["merges"])
    tok, llm = _tokenizers(_rewrite(path, str(tmp_path / "nl.gguf"), merges=merges))
    text = "a\n\n\nb\n\n\n\nc\n\nd\ne"
    ids = tok.encode(text)
    assert tok.convert_ids_to_tokens(ids) == [
        "<bos>",
        "a",
        "\n\n\n",
        "b",
        "\n\n\n\n",
        "c",
        "\n\n",
        "d",
        "\n",
        "e",
    ]
    if llm is not None:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids


def test_merges_never_cross_a_newline(gemma4_files, tmp_path):
    """llama.cpp splits the text at runs of newlines before it merges: a token ".\n" with the first merge of the
    file is never used, by llama.cpp or by autolm."""
    _, path = gemma4_files
    v = _vocab(path)
    tok, llm = _tokenizers(
        _rewrite(path, str(tmp_path / "cross.gguf"), tokens=v["tokens"] + [".\n"], scores=v["scores"] + [0.0],
                 token_type=v["token_type"] + [1], merges=[". \n", *v["merges"]])
    )  # fmt: skip
    ids = tok.encode("the dog.\nthe end.")
    assert len(v["tokens"]) not in ids and ".\n" not in "|".join(tok.convert_ids_to_tokens(ids))
    if llm is not None:
        assert llm.tokenize(b"the dog.\nthe end.", add_bos=True, special=True) == ids


def test_an_unknown_tokenizer_model_is_refused(gemma4_files, tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "gemma4")
    writer.add_tokenizer_model("gemma5")
    writer.add_token_list(["<pad>", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="gemma5"):
        autolm.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="odd.gguf")


def test_llama_cpp_tokenizes_the_file_as_autolm(gemma4_files):
    """llama.cpp's own tokens for the file (with <bos>, special tokens parsed) are autolm's."""
    pytest.importorskip("llama_cpp")
    _, path = gemma4_files
    tok, llm = _tokenizers(path)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text


def test_gguf_out_writes_the_converters_vocabulary(gemma4_files, tmp_path):
    """A Gemma 4 model saved with its tokenizer goes out with the vocabulary llama.cpp's converter writes (the
    same tokens, types, scores and merges, tokenizer model "gemma4", no prefix space), which autolm and llama.cpp
    read back as transformers tokenizes."""
    import gguf
    import transformers
    from test_family_gemma4_gguf import GGUF_DENSE

    from autolm.gguf_writer import save_gguf

    hf, converters = gemma4_files
    cfg = transformers.Gemma4TextConfig(vocab_size=len(hf), bos_token_id=2, eos_token_id=1, pad_token_id=0,
                                        **GGUF_DENSE.kwargs)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = autolm.AutoTokenizer.from_pretrained(tmp_path / "hf")
    path = save_gguf(model, tokenizer, str(tmp_path / "model.gguf"), "f32")
    assert _vocab(path) == _vocab(converters)
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gemma4"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    tok, llm = _tokenizers(path)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        if llm is not None:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
