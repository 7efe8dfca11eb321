"""MiMo-V2-Flash against transformers and peft: a full-attention first layer then sliding-window layers (window 5,
shorter than the prompts) with twice the KV heads and attention sinks; head_dim 24 for queries and keys, values of
v_head_dim 16 scaled by attention_value_scale; partial RoPE (0.334) with a base per layer type; a dense first layer
then DeepSeek V3's sigmoid-routed mixture of 8 experts (2 per token, a random e_score_correction_bias), no shared
experts. A variant: layer_types sliding/full/sliding, mlp_layer_types sparse/dense/sparse, values wider than the
keys (head_dim 16, v_head_dim 24), no value scale, partial_rotary_factor 0.5, two expert groups of which one is
taken, no renormalisation, a routed scaling and a tied head. The checkpoint as transformers writes it (per-expert
tensors, self_attn.attention_sink_bias); the standard battery, the Hub's config.json spelling and the config's
checks. llama.cpp has a mimo2 architecture, but autolm gives no GGUF layout for it yet."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm.models.mimo_v2_flash import MiMoV2FlashConfig

_SHAPE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
              max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
              sliding_window=5)  # fmt: skip
_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for mimo_v2_flash
MIMO = RoutedFamily("MiMoV2FlashConfig", dict(_SHAPE, head_dim=24, v_head_dim=16), lora_targets=_LORA)
VARIANT = RoutedFamily(
    "MiMoV2FlashConfig",
    dict(_SHAPE, head_dim=16, v_head_dim=24, attention_value_scale=None, n_group=2, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=2.5, tie_word_embeddings=True,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
         mlp_layer_types=["sparse", "dense", "sparse"],
         rope_parameters={kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}
                          for kind, theta in (("full_attention", 1e5), ("sliding_attention", 100.0))}),
    lora_targets=["q_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"mimo_v2_flash": MIMO, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MIMO.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MIMO.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MIMO.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    MIMO.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (per expert, the sliding layers' sinks as
    attention_sink_bias, the router's correction bias) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
            "model.layers.2.self_attn.attention_sink_bias"} <= saved  # fmt: skip
    assert not any(".sinks" in k for k in saved)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes (the sliding layers' doubled KV heads and sinks, the value width); the
    layers' kinds from mlp_layer_types; the KV cache one width per layer; config.json round-trips."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    if name == "mimo_v2_flash":
        assert kinds == ["GatedMLP", "SparseMoeBlock", "SparseMoeBlock"] and sliding == [False, True, True]
        assert model.attention_shapes() == [(1, 24), (2, 24), (2, 24)]
    else:
        assert kinds == ["SparseMoeBlock", "GatedMLP", "SparseMoeBlock"] and sliding == [True, False, True]
        assert model.attention_shapes() == [(2, 24), (1, 24), (2, 24)]
    for layer, swa in zip(model.model.layers, sliding, strict=True):
        assert hasattr(layer.self_attn, "sinks") == swa
        assert layer.self_attn.sliding_window == (5 if swa else None)


def _same_logits(model, hf) -> None:
    ids, mask = padded_batch()
    real, pos = mask.bool(), positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hub_config_spelling_and_mtp_tensors(tmp_path_factory, tmp_path):
    """The Hub's config.json spelling (sliding_window_size one less than the window, routed_scaling_factor null)
    and its next-token-prediction tensors (model.mtp.*, skipped): the same logits; saved back as read."""
    from safetensors.torch import load_file, save_file

    directory, hf = MIMO.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    d = json.loads(path.read_text())
    d.pop("sliding_window")
    d.update(sliding_window_size=4, routed_scaling_factor=None)
    path.write_text(json.dumps(d))
    tensors = load_file(f"{directory}/model.safetensors")
    tensors["model.mtp.layers.0.enorm.weight"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (model.config.sliding_window, model.config.routed_scaling_factor) == (5, 1.0)
    _same_logits(model, hf)


def test_default_config_is_transformers():
    """MiMoV2FlashConfig holds transformers' defaults (layer_types, mlp_layer_types and the RoPE by layer type
    derived alike)."""
    import transformers

    check_config_defaults(MiMoV2FlashConfig)
    theirs = json.loads(transformers.MiMoV2FlashConfig().to_json_string())
    theirs.pop("transformers_version")
    assert MiMoV2FlashConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_routed_experts=8, n_group=3), "n_group"),
        (dict(v_head_dim=0), "v_head_dim"),
        (dict(attention_value_scale="x"), "attention_value_scale"),
        (dict(num_hidden_layers=2, mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(num_hidden_layers=2, layer_types=["full_attention", "local"]), "layer_types"),
        (dict(rope_parameters={"full_attention": {"rope_theta": 1.0}}), "rope_parameters"),
        (
            dict(
                rope_parameters={
                    k: {"rope_theta": 1.0, "partial_rotary_factor": 0.001}
                    for k in ("full_attention", "sliding_attention")
                }
            ),
            "partial_rotary_factor",
        ),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        MiMoV2FlashConfig.from_dict({"model_type": "mimo_v2_flash", **bad})
