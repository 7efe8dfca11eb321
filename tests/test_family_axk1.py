"""A.X-K1 (axk1) against transformers and peft: DeepSeek-V3's Multi-head Latent Attention (always the low-rank query)
in GLM-4.7-Flash's layers (dense where mlp_layer_types says, not only leading ones), the grouped sigmoid-routed experts
(a random correction bias, two groups of which one is taken, renormalised and scaled) with a shared expert, and the
mixture's output normed by its own post_mlp_layernorm. A variant: rotate-half RoPE, attention biases, values wider
than the keys, no renormalisation, YaRN with mscale_all_dim, a tied head. The checkpoint as transformers writes it
(per-expert tensors, post_mlp_layernorm at the layer's level) and as the released files hold it (no correction bias,
a norm for the dense layers too); the standard battery, mlp_layer_types derived from first_k_dense_replace /
moe_layer_freq as transformers derives them, transformers' config defaults, the config's checks. llama.cpp has no
A.X-K1 architecture: no GGUF layout."""

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
from autolm.models.axk1 import AXK1Config

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             mlp_layer_types=["dense", "sparse", "dense"], num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
             kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_group=2,
             topk_group=1, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5,
             max_position_embeddings=64)  # fmt: skip
# peft has no default target modules for axk1
_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
AXK1 = RoutedFamily("AXK1Config", SIZES, lora_targets=_TARGETS)
VARIANT = RoutedFamily(
    "AXK1Config",
    dict(SIZES, rope_interleave=False, attention_bias=True, v_head_dim=32, norm_topk_prob=False, tie_word_embeddings=True,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["q_b_proj", "o_proj", "gate_proj"],
)  # fmt: skip
FAMILIES = {"axk1": AXK1, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    AXK1.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    AXK1.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    AXK1.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    AXK1.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names: per-expert tensors, the correction bias, the
    mixture's norm at the layer's level (not in mlp), and transformers' config.json."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    sparse = 1 if name == "axk1" else 2
    assert {f"model.layers.{sparse}.mlp.experts.7.gate_proj.weight", f"model.layers.{sparse}.post_mlp_layernorm.weight",
            f"model.layers.{sparse}.mlp.gate.e_score_correction_bias"} <= saved  # fmt: skip
    assert not any("mlp.post_mlp_layernorm" in k for k in saved)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes (the norm inside the sparse layers' block); config.json round-trips; the
    layers' kinds from mlp_layer_types."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["AXK1MoE" if t == "sparse" else "GatedMLP" for t in model.config.mlp_layer_types]
    normed = {k for k in model.state_dict() if k.endswith("post_mlp_layernorm.weight")}
    sparse = [i for i, t in enumerate(model.config.mlp_layer_types) if t == "sparse"]
    assert normed == {f"model.layers.{i}.mlp.post_mlp_layernorm.weight" for i in sparse}


def test_released_checkpoint_layout(tmp_path_factory, tmp_path, caplog):
    """The released files: no correction bias (zeros, as transformers routes them), a post_mlp_layernorm for the
    dense layers too (skipped, as transformers skips it): loaded without complaint, transformers' logits."""
    import transformers
    from safetensors.torch import load_file, save_file

    directory, _ = AXK1.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "k1")
    path = tmp_path / "k1" / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("e_score_correction_bias")}
    for i in (0, 2):
        tensors[f"model.layers.{i}.post_mlp_layernorm.weight"] = torch.full((64,), 7.0)
    save_file(tensors, path, metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "k1", attn_implementation="eager"
    ).eval()
    with caplog.at_level("WARNING", logger="autolm"):
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "k1")
    assert not torch.any(model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert "zero e_score_correction_bias in 1 layers" in " ".join(model.load_report.notes)
    ids, mask = padded_batch()
    real, pos = mask.bool(), positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
        routed = AXK1.checkpoint(tmp_path_factory)[1](ids, attention_mask=mask, position_ids=pos).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - routed).abs().max() > 1e-3  # the correction bias was doing something


@pytest.mark.parametrize(
    "given",
    [dict(num_hidden_layers=6), dict(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2),
     dict(num_hidden_layers=4, first_k_dense_replace=0)],
)  # fmt: skip
def test_mlp_layer_types_from_legacy_keys(given):
    """Without mlp_layer_types, DeepSeek's first_k_dense_replace (1 by default) and moe_layer_freq give it as
    transformers derives it; the keys are kept for config.json, as read."""
    import transformers

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2,
                 topk_group=1, num_experts_per_tok=2)  # fmt: skip
    ours = AXK1Config.from_dict({**small, **given})
    assert ours.mlp_layer_types == transformers.AXK1Config(**small, **given).mlp_layer_types
    written = ours.to_dict()
    assert all(written.get(k, 1) == v for k, v in given.items())


def test_default_config_is_transformers():
    """AXK1Config() holds transformers' defaults (A.X-K1's sizes, head_dim written, mlp_layer_types derived);
    initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    check_config_defaults(AXK1Config)
    theirs = json.loads(transformers.AXK1Config().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert AXK1Config().to_dict() == theirs


@pytest.mark.parametrize(
    "key, bad",
    [
        ("q_lora_rank", None),
        ("q_lora_rank", 0),
        ("moe_layer_freq", 0),
        ("mlp_layer_types", ["dense", "moe"]),
        ("kv_lora_rank", None),
        ("num_key_value_heads", 2),
        ("num_experts_per_tok", 9),
        ("n_group", 3),
        ("routed_scaling_factor", 0),
        ("rope_interleave", "yes"),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 n_group=2, topk_group=1, num_experts_per_tok=2)  # fmt: skip
    AXK1Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        AXK1Config.from_dict({**small, key: bad})
