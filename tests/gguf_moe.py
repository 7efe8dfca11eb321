"""GGUF files of the mixture-of-experts families as llama.cpp's convert_hf_to_gguf.py writes them (--outtype f32):
Mixtral as "llama" (LlamaModel: q/k rows permuted, each layer's w1/w3/w2 stacked into ffn_{gate,up,down}_exps),
qwen2moe and qwen3moe (Qwen2MoeModel: experts stacked, expert and shared-expert lengths), gpt-oss (GptOssModel:
gate/up de-interleaved from gate_up_proj and transposed back, biases split the same way, sinks as
attn_sinks.weight, the sliding window). Metadata as each converter's set_gguf_parameters writes it; tensor names
from gguf-py's name map (the converter's)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import VOCAB
from gguf_llamacpp import permute

ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}


def _metadata(w, c) -> None:
    """TextModel.set_gguf_parameters (conversion/base.py) plus each converter's own keys."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_parameters
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if c.to_dict().get("head_dim") is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if c.model_type == "mixtral":  # LlamaModel
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
    elif c.model_type == "gpt_oss":
        w.add_sliding_window(c.sliding_window)
        w.add_expert_feed_forward_length(c.intermediate_size)
    else:  # Qwen2MoeModel
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)


def _tensors(hf) -> list[tuple[str, torch.Tensor]]:
    """(name as the converter hands it to the name map, tensor): the experts split and stacked its way."""
    c = hf.config
    out = []
    for name, t in hf.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
            prefix = name.rpartition(".")[0]
            if c.model_type == "gpt_oss":  # interleaved rows, stored (E, h, 2I)
                t = t.transpose(1, 2) if name.endswith("proj") else t
                gate, up = t[:, ::2], t[:, 1::2]
            else:
                gate, up = t.chunk(2, dim=1)
            kind = "bias" if name.endswith("bias") else "weight"
            out += [(f"{prefix}.gate_proj.{kind}", gate), (f"{prefix}.up_proj.{kind}", up)]
        elif name.endswith(("experts.down_proj", "experts.down_proj_bias")):
            prefix = name.rpartition(".")[0]
            kind = "bias" if name.endswith("bias") else "weight"
            out.append(
                (
                    f"{prefix}.down_proj.{kind}",
                    t.transpose(1, 2) if kind == "weight" and c.model_type == "gpt_oss" else t,
                )
            )
        elif name.endswith("self_attn.sinks"):
            out.append((f"{name}.weight", t))
        elif c.model_type == "mixtral" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            out.append((name, permute(t, heads)))
        else:
            out.append((name, t))
    return out


def write_moe_gguf(hf, path: str, experts: dict[str, str] | None = None) -> None:
    """The GGUF llama.cpp's converter makes of transformers' MoE model `hf`, with a plain vocabulary; `experts`
    ("gate" / "up" / "down" -> a ggml type the gguf package quantizes to, "Q8_0", "Q4_0", ...) quantizes the
    stacked experts' weights, as llama.cpp's quantize does (row by row, in its blocks)."""
    import gguf

    c = hf.config
    arch = ARCH[c.model_type]
    w = gguf.GGUFWriter(path, arch)
    _metadata(w, c)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    names = gguf.get_tensor_name_map(
        next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), c.num_hidden_layers
    )
    for name, t in _tensors(hf):
        base, kind = name.rsplit(".", 1)
        if c.model_type == "mixtral" and ".experts." in base:  # LlamaModel's merged names
            layer = base.split(".")[2]
            part = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[base.rsplit(".", 1)[1]]
            base = f"layers.{layer}.feed_forward.experts.{part}"
        gguf_name = names.get_name(base)
        assert gguf_name is not None, base
        data = np.ascontiguousarray(t.float().numpy())
        part = base.rpartition(".")[2]
        part = {"w1": "gate", "w3": "up", "w2": "down"}.get(part, part.removesuffix("_proj"))
        if experts and ".experts." in base and kind == "weight" and part in experts:
            qtype = gguf.GGMLQuantizationType[experts[part]]
            w.add_tensor(f"{gguf_name}.{kind}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            continue
        w.add_tensor(f"{gguf_name}.{kind}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def mla_pieces(name: str, t: torch.Tensor, heads: int, nope: int) -> list[tuple[str, torch.Tensor]]:
    """llama.cpp's DeepseekV2 converter's split of a latent attention's kv_b_proj into k_b_proj (per head, its
    no-RoPE rows, transposed) and v_b_proj (per head, the value rows); any other tensor as it is."""
    if not name.endswith("kv_b_proj.weight"):
        return [(name, t)]
    kv = t.view(heads, -1, t.shape[-1])
    return [(name.replace("kv_b_proj", "k_b_proj"), kv[:, :nope].transpose(1, 2)),
            (name.replace("kv_b_proj", "v_b_proj"), kv[:, nope:])]  # fmt: skip
