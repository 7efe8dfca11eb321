"""Gemma 4's GGUF vocabulary (tokenizer.ggml.model "gemma4") rebuilt as a `tokenizers` backend.

Gemma 4's tokenizer.json is transformers' GemmaTokenizer over the pieces and merges of its SentencePiece model: a
BPE with byte fallback (`<0xXX>` pieces) and no prefix space, spaces normalised to "\u2581", merges running over
each text between added tokens, and a decoder that turns "\u2581" back into spaces and byte pieces into bytes.
llama.cpp's converter writes it as tokenizer.ggml.model "gemma4": the tokens (byte pieces typed BYTE, the special
tokens CONTROL, the channel / tool-call markers USER_DEFINED), the merges in the file's order, add_bos_token true
(which llama.cpp forces on even where a file says false) and add_space_prefix false. llama.cpp tokenizes it as a
BPE over raw UTF-8 with "\u2581" for spaces, split only into runs of newlines and runs of anything else, taking a
run of newlines that is itself a token whole. The backend here does the same: the newline split is the
pre-tokenizer, and a newline token the merges do not build is an added token, so a run the vocabulary holds stays
one token. (Where the merges do not build them, a longer run than any such token is split into the longest ones
from its left, where llama.cpp merges it by the file's merges.)"""

from __future__ import annotations

SPACE = "\u2581"


def gemma4_backend(meta: dict, tokens: list, merges: list, whole_newlines: bool = True):
    """The `tokenizers` backend of a "gemma4" vocabulary, and its token -> id map. `whole_newlines` False: a run of
    newlines is merged as any other piece (llama.cpp's Sarvam pre-tokenizer, otherwise Gemma 4's)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    backend = Backend(
        BPE(vocab=vocab, merges=_usable_merges(merges, vocab), fuse_unk=True, byte_fallback=True, dropout=None,
            unk_token=unk)
    )  # fmt: skip
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    newlines = [
        t
        for t in tokens
        if whole_newlines
        and len(t) > 1
        and not t.strip("\n")
        and [p.value for p in backend.model.tokenize(t)] != [t]
    ]
    if newlines:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in newlines])
    return backend, vocab


def _usable_merges(merges: list, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges the BPE can hold: both halves and their join in the vocabulary. gguf-py writes a space
    inside a merge's halves as U+0120 (Gemma 4's pieces spell spaces "\u2581", so none should have one); such a
    half is read back with its space where only that spelling is a token."""
    usable = []
    for pair in merges:
        if len(pair) != 2:
            continue
        left, right = pair
        if left + right not in vocab or left not in vocab or right not in vocab:
            left, right = left.replace("\u0120", " "), right.replace("\u0120", " ")
            if left + right not in vocab or left not in vocab or right not in vocab:
                continue
        usable.append((left, right))
    return usable
