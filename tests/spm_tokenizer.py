"""A SentencePiece-style tokenizer.json as transformers converts one from a SentencePiece BPE model (Llama 2,
Mistral, Phi-3): byte fallback tokens, "\u2581" for spaces, and merges that are every split of each token into two
tokens, ranked by the token's place in the vocabulary."""

from __future__ import annotations

import json
import os

DATA = os.path.join(os.path.dirname(__file__), "data", "english.txt")
SPECIALS = ["<unk>", "<s>", "</s>"]


def _pieces(size: int) -> list[str]:
    """Pieces a BPE trainer learns on the test text, in the order it learns them (characters first)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False)
    with open(DATA) as f:
        tok.train_from_iterator([f.read()], trainer)
    vocab = tok.get_vocab()
    return sorted(vocab, key=vocab.get)


def write_spm_tokenizer(directory: str, size: int = 320, style: str = "metaspace") -> int:
    """Write tokenizer.json and tokenizer_config.json to `directory`; style "metaspace" (transformers' Llama 2
    tokenizer: the prefix space on the text's start) or "prepend" (Phi-3's: a normalizer). Returns the vocabulary
    size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens = SPECIALS + [f"<0x{i:02X}>" for i in range(256)] + _pieces(size)
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    merges = []
    for token, i in vocab.items():
        splits = [
            (token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        merges += [(i, vocab[a], vocab[b], a, b) for a, b in splits]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    steps = [
        decoders.Replace("\u2581", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ]
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
    else:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "chat_template": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"}  # fmt: skip
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return len(vocab)


def write_spm_checkpoint(directory: str, style: str = "metaspace") -> None:
    """write_spm_tokenizer's vocabulary with a tiny random model of its size: Llama for "metaspace", Phi-3 for
    "prepend" (as transformers rebuilds Phi-3's tokenizer from a GGUF)."""
    import transformers
    from conftest import randomize

    vocab = write_spm_tokenizer(directory, style=style)
    cls = transformers.LlamaConfig if style == "metaspace" else transformers.Phi3Config
    cfg = cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=1024)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(hf)
    hf.save_pretrained(directory)
