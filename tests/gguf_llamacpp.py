"""GGUF files as llama.cpp's convert_hf_to_gguf.py writes them (--outtype f32), for Phi-3, OLMo 2, Granite,
SmolLM3, StarCoder2 and Phi-2: the metadata keys each family's converter class writes, tensor names from gguf-py's
own name map (the converter's), q/k rows permuted where its class inherits LlamaModel's permutation, and the
converter's extra tensors (Phi-3's LongRoPE factors). Each function below follows its converter class's set_gguf_parameters."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import VOCAB
from gguf_mimic import add_text_model


def _llama(w, c) -> None:
    """LlamaModel.set_gguf_parameters (conversion/llama.py): TextModel's, the vocabulary size, the head size."""
    add_text_model(w, c)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _granite(w, c) -> None:
    """GraniteModel (conversion/granite.py): Llama's, the multipliers under llama.cpp's "scale" names."""
    _llama(w, c)
    w.add_attention_scale(c.attention_multiplier)
    w.add_embedding_scale(c.embedding_multiplier)
    w.add_residual_scale(c.residual_multiplier)
    w.add_logit_scale(c.logits_scaling)


def _phi3(w, c) -> list[tuple[str, np.ndarray]]:
    """Phi3MiniModel (conversion/phi.py): its own keys (no TextModel ones), LongRoPE factors as tensors."""
    rope = c.rope_parameters
    original = rope.get("original_max_position_embeddings", c.original_max_position_embeddings)
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(c.sliding_window or 0)  # 0: none
    if not rope.get("long_factor"):
        return []
    scale = c.max_position_embeddings / original
    w.add_rope_scaling_attn_factors(
        math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    )
    return [("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))]  # fmt: skip


# model_type -> (llama.cpp architecture, metadata writer, whether q/k rows are permuted as LlamaModel permutes)
def _starcoder2(w, c) -> None:
    """StarCoder2Model (conversion/starcoder.py) is TextModel's set_gguf_parameters: sizes, head counts, the RoPE
    base, the LayerNorm epsilon (norm_epsilon); no head size, no vocabulary size, no sliding window."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_eps(c.norm_epsilon)


def _phi2(w, c) -> None:
    """Phi2Model.set_gguf_parameters (conversion/phi.py): the feed-forward length as 4 * hidden, as many KV heads
    as heads, the LayerNorm epsilon, the rotary dimensions int(factor * hidden) // heads; no RoPE base, no
    vocabulary size (the token list gives it)."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(4 * c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_attention_heads)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_rope_dimension_count(
        int(c.rope_parameters["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads
    )
    w.add_add_bos_token(False)


CONVERTERS = {
    "phi3": ("phi3", _phi3, False),
    "olmo2": ("olmo2", add_text_model, False),
    "granite": ("granite", _granite, True),
    "smollm3": ("smollm3", _llama, True),
    "internlm3": ("llama", _llama, True),  # InternLM3Model: Llama's converter
    "starcoder2": ("starcoder2", _starcoder2, False),
    "phi": ("phi2", _phi2, False),  # q/k not permuted: llama.cpp runs phi2 with NeoX RoPE
}


def permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: rows (n_head, 2, dim/2) -> (n_head, dim/2, 2), for llama.cpp's interleaved RoPE."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' model `hf`, with a plain vocabulary of VOCAB
    tokens (<pad>, <s>, </s>, ...)."""
    import gguf

    c = hf.config
    arch, metadata, permuted = CONVERTERS[c.model_type]
    w = gguf.GGUFWriter(path, arch)
    extra = metadata(w, c) or []
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     c.num_hidden_layers)  # fmt: skip
    for name, t in [*extra, *hf.state_dict().items()]:
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # the converter writes no output tensor for tied embeddings
        if isinstance(t, torch.Tensor):
            if permuted and ".q_proj." in name:
                t = permute(t, c.num_attention_heads)
            elif permuted and ".k_proj." in name:
                t = permute(t, c.num_key_value_heads)
            t = t.float().numpy()
            base, kind = name.rsplit(".", 1)
            name = f"{names.get_name(base)}.{kind}"
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf(family, tmp_path_factory, tmp_path):
    """The family's checkpoint written as llama.cpp writes it loads in autolm with the checkpoint's logits;
    returns (autolm's model, transformers' model)."""
    from conftest import padded_batch, positions

    import autolm

    _, hf = family.checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == type(hf).__name__
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    return model, hf
