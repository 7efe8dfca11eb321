"""OLMoE against transformers: q/k norms over the whole projection, clip_qkv small enough to clamp (q and k after
their norms, v after its projection), GQA, q/k/v/o biases, 4 experts of which each token uses 2 (softmax over all
experts, top 2, renormalised with norm_topk_prob); the checkpoint as transformers writes it (one tensor per
expert); the standard battery, GGUF as llama.cpp's OlmoeModel converter writes it (in, and out of autolm) of a
checkpoint llama.cpp's olmoe runs (no GQA, clamp, renormalisation or biases; the others refused), and the CLI with
OLMo's chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
)
OLMOE = Family(
    "OlmoeConfig",
    dict(SIZES, clip_qkv=1.5, norm_topk_prob=True, attention_bias=True),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for olmoe
)
# what llama.cpp's olmoe computes (OLMoE-1B-7B's shape): no clamp, the top k unrenormalised, no biases, no GQA (its
# k norm spans hidden_size)
PLAIN = Family("OlmoeConfig", dict(SIZES, num_key_value_heads=4))


def test_logits(tmp_path_factory):
    OLMOE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    OLMOE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    OLMOE.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    OLMOE.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OLMOE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    OLMOE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    OLMOE.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only transformers' config keys
    in the files autolm saves."""
    _, saved = OLMOE.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    OLMOE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's OlmoeModel converter, emulated -----------------------------------------------------------


def write_olmoe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' OLMoE `hf` (--outtype f32), from the checkpoint files as
    the converter reads them: TextModel's metadata with the expert counts and the RMS epsilon as 1e-5; no q/k
    permutation; each layer's per-expert gate/up/down tensors stacked into ffn_{gate,up,down}_exps, the rest by
    gguf-py's name map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "olmoe")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OLMOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.num_experts):
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as OlmoeForCausalLM with transformers' logits; int8 from it quantizes the
    experts."""
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    write_olmoe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "OlmoeForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].mlp.experts).__name__ == "Int8Experts"


@pytest.mark.parametrize(
    ("family", "match"),
    [
        (Family("OlmoeConfig", dict(OLMOE.kwargs, num_key_value_heads=4)),
         "'olmoe' model.*attention_bias.*clip_qkv.*norm_topk_prob"),
        (Family("OlmoeConfig", SIZES), "'olmoe' model.*num_key_value_heads"),
        (Family("OlmoeConfig", dict(PLAIN.kwargs, tie_word_embeddings=True)), "'olmoe' model.*tie_word_embeddings"),
    ],
    ids=["clip-bias-norm", "gqa", "tied"],
)  # fmt: skip
def test_gguf_out_refuses(family, match, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A model llama.cpp's olmoe cannot run is refused, naming the fields, and no file: clip_qkv, norm_topk_prob,
    biases (it loads no attn_output.bias); GQA (its k norm spans hidden_size: such a file does not load there); a
    tied head (it requires output.weight). test_gguf_out checks the F32 file of the plain checkpoint against the
    converter's."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=match):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_gguf_with_grouped_query_attention_is_refused(tmp_path_factory, tmp_path):
    """The converter's file of a GQA checkpoint (which llama.cpp's olmoe does not load): a ConfigError naming
    num_key_value_heads."""
    _, hf = Family("OlmoeConfig", SIZES).checkpoint(tmp_path_factory)
    write_olmoe_gguf(hf, str(tmp_path / "model.gguf"))
    with pytest.raises(autolm.ConfigError, match="num_key_value_heads"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """OLMoE-1B-7B-0924-Instruct ships OLMo's (Tulu's) chat template."""
    long = Family(OLMOE.config_cls, dict(OLMOE.kwargs, max_position_embeddings=2048), lora_targets=["q_proj"])
    check_cli(long, "olmo-2-1124-instruct.jinja", tmp_path_factory, tmp_path, "OlmoeForCausalLM (olmoe)")


def test_config_errors_name_the_key():
    from autolm.models.olmoe import OlmoeConfig

    with pytest.raises(autolm.ConfigError, match="num_experts_per_tok"):
        OlmoeConfig(num_experts=4, num_experts_per_tok=5)
    with pytest.raises(autolm.ConfigError, match="num_experts"):
        OlmoeConfig(num_experts="8")
    with pytest.raises(autolm.ConfigError, match="clip_qkv"):
        OlmoeConfig(clip_qkv=-1.0)
    with pytest.raises(autolm.ConfigError, match="norm_topk_prob"):
        OlmoeConfig(norm_topk_prob="yes")
    with pytest.raises(autolm.ConfigError, match="head_dim"):
        OlmoeConfig(hidden_size=64, num_attention_heads=4, head_dim=8)
