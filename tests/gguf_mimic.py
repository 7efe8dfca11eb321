"""Pieces every test-side mimic of llama.cpp's converter (convert_hf_to_gguf.py) writes the same way: the tests'
character vocabulary as a "llama" tokenizer, a checkpoint's per-expert tensors stacked as the converters stack them,
and a weight in Q8_0 as `--outtype q8_0` writes it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
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


def add_text_model(w, c, blocks: int | None = None) -> None:
    """TextModel.set_gguf_parameters (conversion/base.py) for a config with default RoPE; `blocks`: the block count
    where it is not num_hidden_layers (next-token-prediction layers counted too)."""
    w.add_block_count(c.num_hidden_layers if blocks is None else blocks)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)


def add_q8_0(w, name: str, a: np.ndarray) -> None:
    """A weight as the converter's `--outtype q8_0` writes it: Q8_0 where its rows are whole blocks of 32, else
    F16."""
    import gguf

    if a.shape[-1] % 32 == 0:
        w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    else:
        w.add_tensor(name, a.astype(np.float16))


def add_mla_lengths(w, c) -> None:
    """The latent attention's sizes as llama.cpp's DeepSeek-V2 converter (and those derived from it) writes them:
    the cached key is the latent and the RoPE key, the value the latent; the *_mla lengths are the heads' own."""
    w.add_kv_lora_rank(c["kv_lora_rank"])
    w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
    w.add_value_length(c["kv_lora_rank"])
    w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    w.add_value_length_mla(c["v_head_dim"])
