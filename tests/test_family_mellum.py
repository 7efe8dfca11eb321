"""Mellum 2 (JetBrains) against transformers and peft. Base: full / sliding / sliding / full layers (a 5-slot window
shorter than the prompts), each type with its own RoPE base, GQA with per-head q/k norms and attention biases, a
dense first layer then mixtures of 8 experts (softmax, top 2 renormalised); the checkpoint as transformers writes it
(one tensor per expert). Variant: every layer a mixture, no renormalisation, other RoPE bases, a multi-token-prediction layer declared (its tensors in the file skipped). The standard battery, config.json
round trips, transformers' defaults and config errors by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from gguf_mimic import add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models.mellum import MellumConfig

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts=8,
    num_experts_per_tok=2,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    sliding_window=5,
    attention_bias=True,
)
# peft has no default for mellum
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BASE = Family("MellumConfig", SIZES, lora_targets=TARGETS)
VARIANT = Family(
    "MellumConfig",
    dict(
        SIZES,
        mlp_layer_types=None,
        norm_topk_prob=False,
        attention_bias=False,
        num_mtp_layers=1,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
        },
    ),
    lora_targets=TARGETS,
)
# what llama.cpp's mellum runs: every layer a mixture, renormalised, no biases, one RoPE base for both layer types
GGUF = Family(
    "MellumConfig",
    dict(
        SIZES,
        mlp_layer_types=None,
        attention_bias=False,
        rope_parameters={
            kind: {"rope_type": "default", "rope_theta": 10000.0}
            for kind in ("full_attention", "sliding_attention")
        },
    ),
)
BOTH = pytest.mark.parametrize("family", [BASE, VARIANT], ids=["base", "variant"])


@BOTH
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    BASE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BASE.check_bf16(tmp_path_factory)


@BOTH
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    BASE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    BASE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BASE.check_quantized(tmp_path_factory, bits)


def test_layers(tmp_path_factory):
    """Layer 0 dense, the others mixtures without a shared expert; windows and RoPE tables by layer type."""
    model = autolm.AutoModelForCausalLM.from_pretrained(BASE.checkpoint(tmp_path_factory)[0])
    layers = model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["GatedMLP", *["SparseMoeBlock"] * 3]
    assert not any(hasattr(layer.mlp, "shared_expert") for layer in layers)
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 5, 5, None]
    assert [layer.self_attn.rope for layer in layers] == [
        "full_attention",
        *["sliding_attention"] * 2,
        "full_attention",
    ]
    variant = autolm.AutoModelForCausalLM.from_pretrained(VARIANT.checkpoint(tmp_path_factory)[0])
    assert [type(layer.mlp).__name__ for layer in variant.model.layers] == ["SparseMoeBlock"] * 4
    c = variant.config
    assert (c.num_mtp_layers, c.mtp_layer_types, c.mtp_mlp_layer_types) == (
        1,
        ["sliding_attention"],
        ["sparse"],
    )


def test_mtp_tensors_are_skipped(tmp_path_factory, tmp_path):
    """A checkpoint holding the multi-token-prediction layer's tensors (mtp.*) loads with transformers' logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = VARIANT.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "mtp")
    tensors = load_file(f"{directory}/model.safetensors")
    tensors["mtp.0.enorm.weight"] = torch.ones(64)
    tensors["mtp.0.layers.0.self_attn.q_proj.weight"] = torch.ones(64, 64)
    save_file(tensors, str(tmp_path / "mtp" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


@BOTH
def test_names_and_config(family, tmp_path_factory, tmp_path):
    family.check_names_and_config(tmp_path_factory, tmp_path)


def test_saved_files(tmp_path_factory, tmp_path):
    _, saved = BASE.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in saved


def test_default_config_is_transformers():
    """MellumConfig holds transformers' defaults; the derived lists as transformers derives them."""
    import transformers

    check_config_defaults(MellumConfig)
    for kw in (dict(num_hidden_layers=3), dict(num_hidden_layers=2, num_nextn_predict_layers=1)):
        ours, theirs = MellumConfig.from_dict(kw), transformers.MellumConfig(**kw)
        for key in (
            "layer_types",
            "mlp_layer_types",
            "rope_parameters",
            "mtp_layer_types",
            "mtp_mlp_layer_types",
        ):
            assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_local_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(mlp_layer_types=["sparse", "moe"]), "mlp_layer_types"),
        (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "rope_parameters"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (
            dict(rope_parameters={"full_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
            "partial_rotary_factor",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        MellumConfig.from_dict({"num_hidden_layers": 2, **bad})


# ---- GGUF: llama.cpp's MellumModel converter, emulated -----------------------------------------------------------


def write_mellum_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (MellumModel, --outtype f32) makes of transformers' Mellum `hf`, from the
    checkpoint files: TextModel's keys (sizes, head counts, the full layers' RoPE base and the sliding layers' as
    freq_base_swa, RMS epsilon, expert counts, the head size as key/value length), then the experts' length, the
    window and the layer flags; no q/k permutation; each layer's experts stacked; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "mellum")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(hp["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base_swa(hp["rope_parameters"]["sliding_attention"]["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])
    add_toy_vocab(w)
    # this gguf-py predates MELLUM; its tensors are named as Qwen 3 MoE's
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.num_experts):
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as MellumForCausalLM with transformers' logits (the layer flags, window and RoPE
    bases read back)."""
    _, hf = GGUF.checkpoint(tmp_path_factory)
    write_mellum_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "MellumForCausalLM"
    c = model.config
    assert (c.layer_types, c.sliding_window, c.head_dim) == (hf.config.layer_types, 5, 16)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family, refused",
    [
        (BASE, "mlp_layer_types"),
        (VARIANT, "norm_topk_prob"),
        (Family("MellumConfig", dict(GGUF.kwargs, attention_bias=True)), "attention_bias"),
        (Family("MellumConfig", dict(GGUF.kwargs, rope_parameters=None)), "rope_parameters"),
    ],
    ids=["dense", "no-renormalisation", "bias", "two-bases"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(family, refused, tmp_path_factory, tmp_path):
    """Dense layers, no renormalisation, attention biases, sliding layers with their own RoPE base (llama.cpp's
    mellum rotates them with the full layers'): refused, naming the field, and no file."""
    from test_family_phi import _byte_tokenizer

    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    tok = _byte_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, tok, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
