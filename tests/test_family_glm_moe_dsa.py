"""GLM-5 (glm_moe_dsa) against transformers and peft: DeepSeek-V3.2's indexed latent attention (tests.
test_family_deepseek_v32) with the indexer's RoPE over interleaved pairs and layers sharing the last full layer's
selection (indexer_types given; in a variant derived from index_topk_pattern, with attention biases, values wider
than the keys, YaRN, a tied head). The battery (logits, generate, the eager one-token step with the indexers' keys in
the cache, LoRA, save, names and config.json), indexer_types derived as transformers derives it, transformers'
config defaults, the config's checks. No compiled step (the graphs do not serve these layers), no GGUF (llama.cpp's
glm-dsa layout is not written or read)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults
from test_family_deepseek_v32 import SIZES, check_padded_step
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm.models.glm_moe_dsa import GlmMoeDsaConfig

GLM_SIZES = dict(SIZES, num_hidden_layers=4, indexer_types=["full", "shared", "shared", "full"])
GLM = RoutedFamily(
    "GlmMoeDsaConfig", GLM_SIZES, lora_targets=["q_a_proj", "kv_b_proj", "o_proj", "wq_b", "wk"]
)
VARIANT = RoutedFamily(
    "GlmMoeDsaConfig",
    dict(SIZES, index_topk_pattern="FSF", attention_bias=True, v_head_dim=32, tie_word_embeddings=True,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256, index_topk=3,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["q_b_proj", "o_proj", "kv_a_proj_with_mqa", "weights_proj"],
)  # fmt: skip
FAMILIES = {"glm": GLM, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_shared_layers_reuse_the_selection(tmp_path_factory):
    """Layers 1 and 2 hold no indexer and attend to the keys layer 0's kept (index_topk of them past the 4th
    query); layer 3 selects its own."""
    directory, _ = GLM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.indexer is None for a in attns] == [False, True, True, False]
    masks = {}
    for i, a in enumerate(attns):
        a.register_forward_pre_hook(lambda m, args, i=i: masks.__setitem__(i, m.keep(*args)))
    ids, mask = padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert masks[1].equal(masks[0]) and masks[2].equal(masks[0]) and not masks[3].equal(masks[0])
    assert masks[0][0, 0].sum(-1).tolist() == [1, 2, 3, 4] + [4] * 9


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)
    check_padded_step(FAMILIES[name], tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_save(tmp_path_factory, tmp_path):
    """check_save; the saved files hold the checkpoint's names: indexers only in the full layers."""
    _, saved = GLM.check_saved_files(tmp_path_factory, tmp_path)
    assert {k.split(".")[2] for k in saved if ".indexer." in k} == {"0", "3"}


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips (index_topk_pattern kept where given)."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.indexer_types[:3] == ["full", "shared", "full" if name == "variant" else "shared"]


@pytest.mark.parametrize(
    "given",
    [dict(num_hidden_layers=6), dict(num_hidden_layers=6, index_topk_freq=2),
     dict(num_hidden_layers=7, index_topk_freq=3, index_skip_topk_offset=1), dict(index_topk_pattern="FSSFFS"),
     dict(index_topk_pattern=["full", "shared"], num_hidden_layers=2)],
)  # fmt: skip
def test_indexer_types_from_legacy_keys(given):
    import transformers

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                 num_experts_per_tok=2, num_hidden_layers=6)  # fmt: skip
    ours = GlmMoeDsaConfig.from_dict({**small, **given})
    assert ours.indexer_types == transformers.GlmMoeDsaConfig(**{**small, **given}).indexer_types
    assert all(ours.to_dict()[k] == v for k, v in given.items())


def test_default_config_is_transformers():
    import transformers

    check_config_defaults(GlmMoeDsaConfig)
    theirs = json.loads(transformers.GlmMoeDsaConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert GlmMoeDsaConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "key, bad",
    [
        ("indexer_types", ["shared", "full"]),
        ("indexer_types", ["full", "dense"]),
        ("indexer_types", ["full"]),
        ("index_topk_pattern", "FX"),
        ("q_lora_rank", None),
        ("index_topk", -1),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 num_experts_per_tok=2, qk_rope_head_dim=8, index_head_dim=16)  # fmt: skip
    GlmMoeDsaConfig(**small)
    with pytest.raises(autolm.ConfigError, match="indexer_types" if key == "index_topk_pattern" else key):
        GlmMoeDsaConfig.from_dict({**small, key: bad})
