"""Hy v4 (hy_v4) against transformers and peft: GLM-5's indexed latent attention (tests.test_family_glm_moe_dsa) with
rotate-half RoPE, the indexer turning its last features, a gated output and sinks; hyper-connections over hc_mult
streams; the clamped SwiGLU experts. Two checkpoints: the defaults' layer pattern (dense then sparse, layers 0 and 1
full, 2 shared) with 4 streams; a variant with 2 streams, explicit indexer_types and mlp_layer_types, a tight
swiglu_limit (the clamp bites), attention biases, wider values, YaRN, a tied head. The battery (logits over a padded
batch whose 13-token rows exceed index_topk, generate, bf16, the eager one-token step with the indexers' keys in the
cache, LoRA vs peft, quantized, save, names and config.json), transformers' config defaults, the config's checks. No
compiled step (as DeepSeek-V3.2: its graphs do not serve a layer reading its indexer's cache layer). No GGUF yet."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults
from test_family_deepseek_v32 import check_padded_step
from test_family_minimax_m2 import RoutedFamily

import autolm
from autolm.models.hy_v4 import HYV4Config

SIZES = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
             max_position_embeddings=64, index_topk=4, index_head_dim=16, index_n_heads=8)  # fmt: skip
HY = RoutedFamily(
    "HYV4Config", SIZES, lora_targets=["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "wq_b", "wk"]
)
VARIANT = RoutedFamily(
    "HYV4Config",
    dict(SIZES, num_hidden_layers=4, hc_mult=2, hc_magnitude=1.5, swiglu_limit=0.05, attention_bias=True,
         v_head_dim=32, tie_word_embeddings=True, indexer_types=["full", "shared", "shared", "full"],
         mlp_layer_types=["sparse", "dense", "sparse", "sparse"], max_position_embeddings=256, index_topk=3,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=["q_b_proj", "o_proj", "kv_a_proj_with_mqa", "weights_proj", "up_proj"],
)  # fmt: skip
FAMILIES = {"hy": HY, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_indexer_selection_and_clamp_matter(tmp_path_factory):
    """Past the 4th query each query keeps index_topk keys (not a window), layer 2 reuses layer 1's selection; with
    plain causal attention, or the SwiGLU unclamped in the variant, the logits are not transformers'."""
    directory, hf = HY.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attns = [layer.self_attn for layer in model.model.layers]
    assert [a.indexer is None for a in attns] == [False, False, True]
    masks = {}
    for i, a in enumerate(attns):
        a.register_forward_pre_hook(lambda m, args, i=i: masks.__setitem__(i, m.keep(*args)))
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    kept = masks[1][0, 0]
    assert kept.sum(-1).tolist() == [1, 2, 3, 4] + [4] * 9
    assert not all(kept[t, t - 3 : t + 1].all() for t in range(4, 13))
    assert masks[2].equal(masks[1]) and not masks[1].equal(masks[0])
    for a in attns:
        a.keep = lambda x, ctx: torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        dense = model(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
        theirs = hf(ids[:1], attention_mask=mask[:1]).logits[real[:1]]
    assert (dense - theirs).abs().max() > 1e-3
    directory, hf = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts.limit = None
    with torch.no_grad():
        loose = model(ids, attention_mask=mask).logits[real]
        theirs = hf(ids, attention_mask=mask).logits[real]
    assert (loose - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HY.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)
    check_padded_step(FAMILIES[name], tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name, bits", [("variant", "int8"), ("hy", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """check_save; the saved files hold the checkpoint's names: indexers only in the full layers, the
    hyper-connections', gates' and sinks' names as transformers writes them."""
    _, saved = VARIANT.check_saved_files(tmp_path_factory, tmp_path)
    assert {k.split(".")[2] for k in saved if ".indexer." in k} == {"0", "3"}
    assert {
        "model.hc_pre.hc_head.hc_head_fn",
        "model.layers.0.hc_pre.hc_attn_layer.hc_fn",
        "model.layers.3.hc_pre.hc_mlp_layer.hc_scale",
        "model.layers.1.mlp.linear_gate.weight",
        "model.layers.0.self_attn.linear_gate.weight",
        "model.layers.2.self_attn.learnable_sink_param",
    } <= set(saved)
    assert not any(".attn_hc." in k or ".gate_proj." in k or k.endswith(".sinks") for k in saved)  # fmt: skip


def test_released_names_load(tmp_path_factory, tmp_path):
    """The released files' names (`hc_attn_layer.hc_pre.hc_fn`, `hc_head.hc_pre.hc_head_fn`: "hc_pre" after the
    module, which transformers' mapping drops wherever it sits) load to the same logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, _ = HY.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    tensors = load_file(f"{directory}/model.safetensors")
    moved = {re.sub(r"\.hc_pre\.(hc_\w+?)\.", r".\1.hc_pre.", k): v for k, v in tensors.items()}
    assert "model.layers.0.hc_attn_layer.hc_pre.hc_fn" in moved and "model.hc_head.hc_pre.hc_head_fn" in moved
    save_file(moved, str(tmp_path / "released" / "model.safetensors"), metadata={"format": "pt"})
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "released")(
            ids, attention_mask=mask
        ).logits
        theirs = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids, attention_mask=mask).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.rope_interleave is False


@pytest.mark.parametrize("n", [1, 3, 6, 10])
def test_layer_patterns_are_transformers(n):
    import transformers

    small = dict(
        hidden_size=64, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=n
    )
    ours, theirs = HYV4Config.from_dict(small), transformers.HYV4Config(**small)
    assert ours.indexer_types == theirs.indexer_types and ours.mlp_layer_types == theirs.mlp_layer_types
    assert ours.head_dim == theirs.head_dim and ours.num_key_value_heads == theirs.num_key_value_heads


def test_default_config_is_transformers():
    import transformers

    check_config_defaults(HYV4Config)
    theirs = json.loads(transformers.HYV4Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    ours = HYV4Config().to_dict()
    ours.pop("initializer_range", None)
    assert ours == theirs


@pytest.mark.parametrize(
    "key, bad",
    [("indexer_types", ["shared", "full"]), ("hc_mult", 0), ("swiglu_limit", "x"), ("index_topk", -1)],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2,
                 qk_rope_head_dim=8, index_head_dim=16)  # fmt: skip
    HYV4Config(**small)
    with pytest.raises(autolm.ConfigError, match=key):
        HYV4Config.from_dict({**small, key: bad})
