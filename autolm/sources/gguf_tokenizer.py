"""The tokenizer inside a GGUF file, rebuilt as a `tokenizers` backend with transformers' settings."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import GGUFError
from .gguf import GGUFFile
from .gguf_splits import ADD_BOS, ESCAPED_SPACES, FORCE_BOS, IGNORE_MERGES, SPLITS
from .gguf_tokenizer_gemma4 import gemma4_backend

logger = logging.getLogger("autolm.gguf")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_parts(path: str) -> tuple[Any, dict[str, str | None], str | None, dict[str, Any]]:
    """Rebuild the file's tokenizer (GPT-2 byte-level BPE, SentencePiece-style BPE, Gemma 4's BPE): the
    `tokenizers` backend, the special tokens, the chat template and tokenizer_config settings."""
    g = GGUFFile(path, weights=False)
    try:
        return _parts(g, path)
    except GGUFError:
        raise
    except Exception as e:  # odd metadata types, and the tokenizers library's plain Exceptions
        raise GGUFError(
            f"{path}: the tokenizer in its metadata cannot be built ({type(e).__name__}: {e})"
        ) from None


def _pre_name(meta: dict, path: str) -> str | None:
    """llama.cpp's pre-tokenizer name for a "gpt2" vocabulary: tokenizer.ggml.pre, "default" where the file has
    none (as llama.cpp takes it); None, with a warning, for a name llama.cpp does not know (llama.cpp refuses the
    file)."""
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre in SPLITS:
        return pre
    logger.warning(
        "%s: tokenizer.ggml.pre %r is no pre-tokenizer llama.cpp splits a byte-level BPE with; the text is "
        "split as GPT-2's",
        path,
        pre,
    )
    return None


def _gpt2_backend(tokens: list, merges: list, pre: str | None):
    """GPT-2 byte-level BPE (tokenizer.ggml.model "gpt2"), split as llama.cpp splits for the pre-tokenizer name:
    its regexes one after the other, each splitting the pieces the previous left (GPT-2's split for a name it does
    not know); then the bytes spelled as GPT-2 spells them."""
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    backend = Backend(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False, ignore_merges=pre in IGNORE_MERGES)
    )  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    if pre is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return backend, vocab


def _backend(meta: dict, kind, tokens: list, merges: list, path: str):
    """The backend for the file's tokenizer model, its token -> id map, and llama.cpp's pre-tokenizer name."""
    if kind == "gpt2":
        pre = _pre_name(meta, path)
        if pre in ESCAPED_SPACES:  # SentencePiece-style pieces in raw UTF-8, tokenized as Gemma 4's
            return (*gemma4_backend(meta, tokens, merges, whole_newlines=pre != "sarvam-moe"), pre)
        return (*_gpt2_backend(tokens, merges, pre), pre)
    if kind == "gemma4":  # llama.cpp takes its pre-tokenizer as "gemma4"
        return (*gemma4_backend(meta, tokens, merges), "gemma4")
    if kind == "llama":
        if not merges and str(meta.get("general.architecture")) in ("gemma", "gemma2", "gemma3"):
            return (*_gemma_backend(meta, tokens), None)
        return (*_llama_backend(meta, tokens, merges or _merges_from_scores(meta, tokens, path)), None)
    raise GGUFError(
        f"{path}: tokenizer model {kind!r} is not supported (expected 'gpt2', 'llama' or 'gemma4')"
    )


def _llama_backend(meta: dict, tokens: list, merges: list):
    """SentencePiece-style BPE with byte fallback (tokenizer.ggml.model "llama") as transformers' LlamaTokenizer
    has it: the prefix space by Metaspace where add_space_prefix (default true) says so; Phi-3's by a normalizer
    (a prefix on every piece between added tokens), as transformers rebuilds Phi-3's."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    backend = Backend(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None, unk_token=unk)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if meta.get("general.architecture") == "phi3":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return backend, vocab


def _merges_from_scores(meta: dict, tokens: list, path: str) -> list[tuple[str, str]]:
    """The merges of a SentencePiece vocabulary llama.cpp wrote without them (Llama 2, Mistral, Phi-3): every
    split of a token into two tokens, ranked by the token's score, as llama.cpp's tokenizer merges."""
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise GGUFError(f"{path}: SentencePiece vocabulary with neither merges nor a score per token")
    return _merges_from_vocab({tok: i for i, tok in enumerate(tokens)}, dict(zip(tokens, scores)))


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a vocabulary implies, best first: every split of a token into two tokens, ranked by the whole
    token's score (transformers' generate_merges, with scores given)."""
    ranked = []
    for token, score in scores.items():
        pairs = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab
        ]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(left, right, score) for left, right in pairs]
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _gemma_backend(meta: dict, tokens: list):
    """Gemma's GGUF vocabulary, which llama.cpp writes without merges, as transformers rebuilds it: tokens of
    blanks respelled with "\u2581", merges ranked by the tokens' order in the file (Gemma's scores do not follow
    its merge order), and GemmaTokenizer's settings (spaces normalised to "\u2581", byte fallback)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _merges_from_vocab(vocab, {tok: -i for i, tok in enumerate(tokens)})
    backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
                          byte_fallback=True))  # fmt: skip
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    return backend, vocab


def _parts(g: GGUFFile, path: str):
    from tokenizers import AddedToken, processors

    meta = g.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{path}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend, vocab, pre = _backend(meta, kind, tokens, merges, path)
    byte_level = kind == "gpt2" and pre not in ESCAPED_SPACES
    alphabet = set(_bytes_to_unicode().values())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == 3 and (not byte_level or set(t) <= alphabet)
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == 4 and t in vocab
    ]
    backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = {
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "unk_token": tok("unknown_token_id"),
        "pad_token": tok("padding_token_id"),
    }
    # llama.cpp's default where the file does not say: <bos> for SentencePiece and some BPE pre-tokenizers;
    # always for Gemma 4's
    default_bos = kind == "llama" or pre in ADD_BOS
    add_bos = pre in FORCE_BOS or bool(meta.get("tokenizer.ggml.add_bos_token", default_bos))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        single = (
            ([f"{special['bos_token']}:0"] if add_bos else [])
            + ["$A:0"]
            + ([f"{special['eos_token']}:0"] if add_eos else [])
        )
        pair = single + (["$B:1"] + ([f"{special['eos_token']}:1"] if add_eos else []))
        ids = {t: vocab[t] for t in (special["bos_token"], special["eos_token"]) if t is not None}
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(ids.items())
        )
    elif byte_level:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    init = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    template = meta.get("tokenizer.chat_template")
    return backend, special, template if isinstance(template, str) else None, init
