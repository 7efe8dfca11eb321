"""A.X-K2 (axk2) against transformers and peft: DeepSeek-V3.2's indexed latent attention (an index_topk below the
prompts' lengths) with the fused query / output-gate projection, gated RMSNorms (input on every layer, post-attention
on the mixture layers), dense and mixture layers by mlp_layer_types, ungrouped sigmoid routing (A.X-K2-Light's: a
random correction bias, renormalised, scaled) with a shared expert. A variant: grouped routing (the groups not kept
scoring 0), no renormalisation, attention biases, YaRN with mscale_all_dim, a tied head, a mixture first. The standard
battery (the one-token step eager: the indexers' cache layers), the checkpoint's names as transformers saves them
(q_b_proj, W_down / W_up, per-expert tensors), mlp_layer_types from first_k_dense_replace / moe_layer_freq,
transformers' config defaults and the config's checks. llama.cpp has no A.X-K2 architecture: no GGUF layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults
from test_family_deepseek_v32 import check_padded_step
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm.models.axk2 import AXK2Config

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads=4, num_key_value_heads=4,
             q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
             n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5,
             max_position_embeddings=64, index_topk=4, index_head_dim=16, index_n_heads=8, gated_norm_rank=4)  # fmt: skip
# peft has no default target modules for axk2; the fused query / gate and the indexer's projections among them
AXK2 = RoutedFamily(
    "AXK2Config", SIZES, lora_targets=["q_a_proj", "q_gate_proj", "kv_b_proj", "o_proj", "wq_b"]
)
VARIANT = RoutedFamily(
    "AXK2Config",
    dict(SIZES, n_group=4, topk_group=2, norm_topk_prob=False, attention_bias=True, tie_word_embeddings=True,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256, index_topk=3,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["kv_a_proj_with_mqa", "o_proj", "weights_proj"],
)  # fmt: skip
FAMILIES = {"axk2": AXK2, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_indexer_and_gates_matter(tmp_path_factory):
    """Attending to every earlier key instead of the indexer's, or leaving the norms' gates out, gives logits that
    are not transformers' (the comparison above sees both)."""
    directory, hf = AXK2.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()[:1]
    with torch.no_grad():
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits[real]
        for change in ("indexer", "gate"):
            model = autolm.AutoModelForCausalLM.from_pretrained(directory)
            for layer in model.model.layers:
                if change == "indexer":
                    layer.self_attn.indexer.forward = lambda x, q, ctx: torch.ones(
                        x.shape[1], x.shape[1], dtype=torch.bool
                    ).tril()
                else:
                    layer.input_layernorm.mlp.fc2.weight.zero_()
            ours = model(ids[:1], attention_mask=mask[:1]).logits[real]
            assert (ours - theirs).abs().max() > 1e-3, change


def test_generate(tmp_path_factory):
    AXK2.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    AXK2.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_one_token_step_padded_batch(tmp_path_factory):
    check_padded_step(AXK2, tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    AXK2.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    AXK2.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (the released q_b_proj and W_down / W_up,
    per-expert tensors) and transformers' config.json; the gated norms where mlp_layer_types says."""
    model, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    sparse = 1 if name == "axk2" else 0
    assert {"model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.input_layernorm.W_down.weight",
            f"model.layers.{sparse}.post_attention_layernorm.W_up.weight",
            f"model.layers.{sparse}.mlp.experts.7.down_proj.weight"} <= saved  # fmt: skip
    gated = [type(layer.post_attention_layernorm).__name__ for layer in model.model.layers]
    want = ["AXK2GatedRMSNorm" if t == "sparse" else "RMSNorm" for t in model.config.mlp_layer_types]
    assert gated == want


@pytest.mark.parametrize(
    "given", [dict(num_hidden_layers=6), dict(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)]
)
def test_mlp_layer_types_from_legacy_keys(given):
    """Without mlp_layer_types, first_k_dense_replace (1 by default) and moe_layer_freq give it as transformers
    derives it; the keys kept for config.json, as read."""
    import transformers

    small = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
    )
    ours = AXK2Config.from_dict({**small, **given})
    assert ours.mlp_layer_types == transformers.AXK2Config(**small, **given).mlp_layer_types
    assert all(ours.to_dict().get(k, 1) == v for k, v in given.items())


def test_default_config_is_transformers():
    """AXK2Config() holds transformers' defaults and writes transformers' keys (head_dim, qk_head_dim; null groups)."""
    import transformers

    check_config_defaults(AXK2Config)
    theirs = json.loads(transformers.AXK2Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert AXK2Config().to_dict() == theirs


@pytest.mark.parametrize(
    "key, bad",
    [
        ("n_group", 3),
        ("topk_group", 3),
        ("q_lora_rank", None),
        ("gated_norm_rank", 0),
        ("index_topk", 0),
        ("mlp_layer_types", ["dense", "moe"]),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 num_experts_per_tok=2)  # fmt: skip
    AXK2Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        AXK2Config.from_dict({**small, "n_group": 2, "topk_group": 1, key: bad})
