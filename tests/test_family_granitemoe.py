"""Granite MoE against transformers: every Granite multiplier away from 1, GQA, attention biases, tied embeddings,
4 experts of which each token uses 2 (the softmax over the top-2 router logits); the checkpoint as transformers
writes it (input_linear / output_linear / router.layer); the standard battery, GGUF as llama.cpp's converter
writes it (in, and out of autolm), Granite's chat template and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_llamacpp import _granite, permute
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.kernels import native

GRANITEMOE = Family(
    "GraniteMoeConfig",
    dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        embedding_multiplier=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.09,
        logits_scaling=2.5,
        attention_bias=True,
        tie_word_embeddings=True,
    ),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for granitemoe
)


def test_logits(tmp_path_factory):
    GRANITEMOE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GRANITEMOE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GRANITEMOE.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GRANITEMOE.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GRANITEMOE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GRANITEMOE.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = GRANITEMOE.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="granitemoe"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GRANITEMOE.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's (input_linear, output_linear, router.layer) and
    only transformers' config keys in the files autolm saves."""
    _, saved = GRANITEMOE.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.block_sparse_moe.input_linear.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    GRANITEMOE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's GraniteMoeModel converter (conversion/granite.py), emulated ----------------------------


def write_granitemoe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Granite MoE `hf` (--outtype f32), from the checkpoint
    files as the converter reads them: GraniteModel's metadata (Llama's, the multipliers under their "scale"
    names, no head_dim) with TextModel's expert counts; q/k rows permuted; `input_linear` split into gate (the
    first half of its rows) and up, `output_linear` and `router.layer` by gguf-py's name map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "granitemoe")
    _granite(w, c)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_MOE, c.num_hidden_layers)
    exps = {k: gguf.TENSOR_NAMES[k] for k in (gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP)}
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        base, kind = name.rsplit(".", 1)
        if name.endswith("block_sparse_moe.input_linear.weight"):
            bid = int(name.split(".")[2])
            for stem, half in zip(exps.values(), t.split(c.intermediate_size, dim=-2)):
                w.add_tensor(f"{stem.format(bid=bid)}.weight", np.ascontiguousarray(half.float().numpy()))
            continue
        if ".q_proj." in name or ".k_proj." in name:
            t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as GraniteMoeForCausalLM with transformers' logits; int8 from it quantizes the
    experts."""
    _, hf = GRANITEMOE.checkpoint(tmp_path_factory)
    write_granitemoe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "GraniteMoeForCausalLM" and model.config.tie_word_embeddings
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].block_sparse_moe.experts).__name__ == "Int8Experts"


@pytest.mark.skipif(not native.available(), reason="autolm's C++ kernel is not built on this machine")
def test_gguf_q8_0_experts_stay_in_their_blocks(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A Q8_0 file (save_gguf) with quantization="gguf": the experts stay in the file's blocks (GGMLExperts, the
    C++ kernel), within the blocks' rounding of the float model."""
    from autolm.gguf_writer import save_gguf
    from autolm.nn.ggml import GGMLExperts

    directory, _ = GRANITEMOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    save_gguf(model, byte_tokenizer, str(tmp_path / "q.gguf"), "q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert isinstance(kept.model.layers[1].block_sparse_moe.experts, GGMLExperts)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        got, want = kept(ids, attention_mask=mask).logits[real], model(ids, attention_mask=mask).logits[real]
    close = (got - want).abs() <= 0.02 * (want.abs() + want.abs().max())  # a routing flip moves a few
    assert close.float().mean() >= 0.95


# ---- chat template, CLI, config ----------------------------------------------------------------------------


def test_chat_template(tmp_path):
    """Granite 3.x's template (the Granite MoE instruct models ship Granite's): tools and documents."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    documents = [{"doc_id": 1, "text": "Paris is the capital of France."}]
    variants = ({}, {"tools": tools}, {"documents": documents})
    check_chat_template(tmp_path, "granite-3.3-2b-instruct.jinja", variants=variants)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(
        GRANITEMOE.config_cls, dict(GRANITEMOE.kwargs, max_position_embeddings=2048)
    )  # its template's long system turn
    check_cli(
        long,
        "granite-3.3-2b-instruct.jinja",
        tmp_path_factory,
        tmp_path,
        "GraniteMoeForCausalLM (granitemoe)",
    )


def test_config_errors_name_the_key():
    from autolm.models.granitemoe import GraniteMoeConfig

    with pytest.raises(autolm.ConfigError, match="num_experts_per_tok"):
        GraniteMoeConfig(num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(autolm.ConfigError, match="logits_scaling"):
        GraniteMoeConfig(logits_scaling=0)
    with pytest.raises(autolm.ConfigError, match="num_local_experts"):
        GraniteMoeConfig(num_local_experts="8")
