"""Beam against transformers and peft: sliding-window layers with RoPE and NoPE full layers (their queries scaled by
position), per-head q/k norms, the output gate with its per-head bias, norms on both sides of each sublayer and the
depth-scaled residual additions, dense layers and grouped sigmoid-routed experts (a random correction bias, two
groups of which one is taken, renormalised, the output scaled) by mlp_layer_types, fp32 SwiGLU, the logits
soft-capped. A variant: RoPE on the full layers and NoPE on the sliding ones, attention biases, no renormalisation,
no soft-capping, a tied head. The standard battery, positions far out (where the NoPE scale is large),
transformers' config defaults, the config's checks. llama.cpp has no Beam architecture: no GGUF layout."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm.models.beam import BeamConfig

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4, head_dim=16,
             num_attention_heads=4, num_key_value_heads=2, layer_types=["sliding_attention", "full_attention"] * 2,
             mlp_layer_types=["dense", "sparse", "sparse", "dense"], sliding_window=5, num_experts=8, n_group=2,
             topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5, final_logit_softcapping=3.0,
             max_position_embeddings=64)  # fmt: skip
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for beam
BEAM = RoutedFamily("BeamConfig", SIZES, lora_targets=_TARGETS)
VARIANT = RoutedFamily(
    "BeamConfig",
    dict(SIZES, attention_bias=True, norm_topk_prob=False, final_logit_softcapping=None, tie_word_embeddings=True,
         mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
         rope_parameters={"sliding_attention": None, "full_attention": {"rope_type": "default", "rope_theta": 500.0}}),
    lora_targets=["q_proj", "v_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"beam": BEAM, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_positions_far_out(tmp_path_factory, name):
    """Positions from 5000 on (the NoPE layers' query scale ~1.1): transformers' logits."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    pos, real = positions(mask) + 5000, mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
        near = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - near).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BEAM.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    BEAM.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BEAM.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    BEAM.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (per-expert tensors, the correction bias, the
    gate's bias) and transformers' config.json."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    sparse = 1 if name == "beam" else 0
    assert {f"model.layers.{sparse}.mlp.experts.7.gate_proj.weight", "model.layers.0.self_attn.gate_bias",
            f"model.layers.{sparse}.mlp.gate.e_score_correction_bias"} <= saved  # fmt: skip


def test_bf16_keeps_the_router_in_fp32(tmp_path_factory):
    """As transformers' _keep_in_fp32_modules_strict: the router's weight and correction bias stay fp32."""
    model = autolm.AutoModelForCausalLM.from_pretrained(
        BEAM.checkpoint(tmp_path_factory)[0], dtype=torch.bfloat16
    )
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_default_config_is_transformers():
    """BeamConfig() holds transformers' defaults: layer_types (every sixth and the last full), mlp_layer_types (three
    dense), rope_parameters by layer type with the full layers' null."""
    check_config_defaults(BeamConfig)
    c = BeamConfig(num_hidden_layers=8)
    assert c.layer_types == ["sliding_attention"] * 5 + [
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]
    assert c.rope_kinds() == {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert BeamConfig.from_dict({}).to_dict()["rope_parameters"]["full_attention"] is None


@pytest.mark.parametrize(
    "key, bad",
    [
        ("n_group", 3),
        ("n_group", None),
        ("topk_group", 4),
        ("mlp_layer_types", ["dense", "moe"]),
        ("rope_parameters", {"sliding_attention": None}),
        ("rope_parameters", {"sliding_attention": None, "full_attention": 2}),
        ("final_logit_softcapping", 0),
        ("routed_scaling_factor", "x"),
        ("norm_topk_prob", "yes"),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_experts=8,
                 n_group=2, topk_group=1, num_experts_per_tok=2)  # fmt: skip
    BeamConfig(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        BeamConfig.from_dict({**small, key: bad})
