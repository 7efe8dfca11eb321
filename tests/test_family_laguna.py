"""Laguna (poolside) against transformers and peft. XS: full / sliding / sliding / full layers (a 5-slot window
shorter than the prompts), query heads varying by layer (4, 6, 4, 2 over 2 KV heads), the full layers rotating half
of each head (base 500000), the sliding ones all of it, per-head q/k norms and a per-head softplus output gate; a
dense first layer then mixtures of 8 experts (sigmoid scores soft-capped, steered by a random
e_score_correction_bias, renormalised, times 2.5) plus a shared MLP of its own size; the checkpoint as transformers
writes it (one tensor per expert, the bias under mlp.experts, the shared MLP as shared_expert). M: every layer full,
the per-element gate, two dense layers, YaRN on the full layers, no soft-capping. The standard battery, config.json
round trips, transformers' defaults and config errors by name."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models.laguna import LagunaConfig

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_attention_heads_per_layer=[4, 6, 4, 2],
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts=8,
    num_experts_per_tok=2,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=5,
    gating=True,
    moe_routed_scaling_factor=2.5,
    moe_router_logit_softcapping=3.0,
)
# peft has no default for laguna
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj"]
XS = Family("LagunaConfig", SIZES, lora_targets=TARGETS)
M = Family(
    "LagunaConfig",
    dict(
        SIZES,
        layer_types=None,
        num_attention_heads_per_layer=None,
        gating="per-element",
        mlp_layer_types=["dense", "dense", "sparse", "sparse"],
        moe_routed_scaling_factor=1.0,
        moe_router_logit_softcapping=0.0,
        rope_parameters={
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "partial_rotary_factor": 0.5,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    lora_targets=TARGETS,
)
BOTH = pytest.mark.parametrize("family", [XS, M], ids=["xs", "m"])


@BOTH
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    XS.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    XS.check_bf16(tmp_path_factory)


@BOTH
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    XS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    XS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    M.check_quantized(tmp_path_factory, bits)


def test_layers_heads_routing_and_gate(tmp_path_factory):
    """Per-layer heads, windows, RoPE tables and gate widths; the random e_score_correction_bias loaded (from the
    checkpoint's mlp.experts name) and it changes the logits, as do the output gate and the soft-capping."""
    directory, hf = XS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["GatedMLP", *["SparseMoeBlock"] * 3]
    assert [layer.self_attn.num_heads for layer in layers] == [4, 6, 4, 2]
    assert [layer.self_attn.g_proj.weight.shape[0] for layer in layers] == [4, 6, 4, 2]
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 5, 5, None]
    assert [layer.self_attn.rope for layer in layers] == [
        "full_attention",
        *["sliding_attention"] * 2,
        "full_attention",
    ]
    for i in (1, 2, 3):
        ours, theirs = (
            layers[i].mlp.gate.e_score_correction_bias,
            hf.model.layers[i].mlp.gate.e_score_correction_bias,
        )
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        no_bias = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.softcap = 0.0
        no_cap = model(ids, attention_mask=mask).logits
        layers[0].self_attn.g_proj.weight.zero_()
        no_gate = model(ids, attention_mask=mask).logits
    for a, b in ((before, no_bias), (no_bias, no_cap), (no_cap, no_gate)):
        assert not torch.allclose(a, b, atol=1e-3)
    m = autolm.AutoModelForCausalLM.from_pretrained(M.checkpoint(tmp_path_factory)[0])
    assert [layer.self_attn.g_proj.weight.shape[0] for layer in m.model.layers] == [4 * 16] * 4
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["GatedMLP"] * 2 + ["SparseMoeBlock"] * 2


@BOTH
def test_names_and_config(family, tmp_path_factory, tmp_path):
    family.check_names_and_config(tmp_path_factory, tmp_path)


def test_saved_files(tmp_path_factory, tmp_path):
    """The files autolm saves hold the checkpoint's names (per-expert tensors, the router's bias under
    mlp.experts, shared_expert) and config.json's keys."""
    _, saved = XS.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.mlp.experts.e_score_correction_bias", "model.layers.1.mlp.experts.7.up_proj.weight",
            "model.layers.1.mlp.shared_expert.down_proj.weight"} <= saved  # fmt: skip
    assert not any("shared_experts" in k or "gate.e_score" in k for k in saved)


def test_default_config_is_transformers():
    """LagunaConfig holds transformers' defaults; the derived lists as transformers derives them."""
    import transformers

    check_config_defaults(LagunaConfig)
    for kw in (dict(num_hidden_layers=3), dict(num_hidden_layers=2, num_attention_heads=8)):
        ours, theirs = LagunaConfig.from_dict(kw), transformers.LagunaConfig(**kw)
        for key in ("layer_types", "mlp_layer_types", "num_attention_heads_per_layer", "rope_parameters"):
            assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(num_attention_heads_per_layer=[4, 3]), "num_attention_heads_per_layer"),
        (dict(num_attention_heads_per_layer=[4]), "num_attention_heads_per_layer"),
        (dict(gating="per-token"), "gating"),
        (dict(moe_apply_router_weight_on_input=True), "moe_apply_router_weight_on_input"),
        (dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size"),
        (dict(moe_router_logit_softcapping=-1.0), "moe_router_logit_softcapping"),
        (dict(moe_routed_scaling_factor="2"), "moe_routed_scaling_factor"),
        (dict(rope_parameters={"global": {"rope_theta": 1.0}}), "rope_parameters"),
        (
            dict(rope_parameters={"full_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.1875}}),
            "partial_rotary_factor",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        LagunaConfig.from_dict({"num_hidden_layers": 2, "num_key_value_heads": 2, "num_attention_heads": 4,
                                "head_dim": 16, **bad})  # fmt: skip
