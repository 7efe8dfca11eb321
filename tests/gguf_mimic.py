"""Pieces every test-side mimic of llama.cpp's converter (convert_hf_to_gguf.py) writes the same way: the tests'
character vocabulary as a "llama" tokenizer, and a checkpoint's per-expert tensors stacked as the converters stack
them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from conftest import VOCAB


def add_toy_vocab(w) -> None:
    """The tests' vocabulary (three special tokens, then t3, t4, ...) as a "llama" tokenizer with zero scores."""
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))


def stacked_experts(
    tensors: dict[str, torch.Tensor], marker: str, count: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for a checkpoint's tensors, each layer's `<stem>.<e>.<part>.weight` (stem containing `marker`,
    e < count) stacked into one `<stem>.<part>.weight` (count, ...), as llama.cpp's converters write experts."""
    for name, t in tensors.items():
        if marker in name:
            stem, expert, part, _ = name.rsplit(".", 3)  # <layer>.<marker...>, e, part, weight
            if expert != "0":
                continue
            t = torch.stack([tensors[f"{stem}.{e}.{part}.weight"] for e in range(count)])
            name = f"{stem}.{part}.weight"
        yield name, t
