"""GLM-5 (glm_moe_dsa) against transformers and peft: DeepSeek-V3.2's indexed latent attention (tests.
test_family_deepseek_v32) with the indexer's RoPE over interleaved pairs and layers sharing the last full layer's
selection (indexer_types given; in a variant derived from index_topk_pattern, with attention biases, values wider
than the keys, YaRN, a tied head). The battery (logits, generate, the eager one-token step with the indexers' keys in
the cache, LoRA, save, names and config.json), indexer_types derived as transformers derives it, transformers'
config defaults, the config's checks. No compiled step (the graphs do not serve these layers). GGUF: the file
llama.cpp's converter (GlmMoeDsaModel) writes loads with transformers' logits (the shared layers without indexer
tensors); test_gguf_out and test_gguf_llamacpp check autolm's own file against it and llama.cpp's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch, positions
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
# what llama.cpp's glm-dsa holds (test_family_deepseek_v32.GGUF_FAMILY): the sigmoid named, an indexer head of 64;
# index_topk 5: with 4, layer 0's last query has its 4th and 5th keys 3e-4 apart, which llama.cpp's float16 cache
# of the indexer's keys swaps
GGUF_FAMILY = RoutedFamily(
    "GlmMoeDsaConfig", dict(GLM_SIZES, scoring_func="sigmoid", index_head_dim=64, index_topk=5)
)


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


def write_glm_moe_dsa_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's GlmMoeDsaModel converter (--outtype f32) makes of transformers' GLM-5 `hf`:
    DeepseekV2Model's (test_family_deepseek_v3's mimic) as "glm-dsa", the indexer's keys and, config.json giving
    indexer_types, attention.indexer.types (true for "full"); the shared layers hold no indexer tensors."""
    from test_family_deepseek_v3 import write_deepseek_v3_gguf

    def indexer(w, c) -> None:
        w.add_indexer_head_count(c["index_n_heads"])
        w.add_indexer_key_length(c["index_head_dim"])
        w.add_indexer_top_k(c["index_topk"])
        if c.get("indexer_types") is not None:
            w.add_array("glm-dsa.attention.indexer.types", [t == "full" for t in c["indexer_types"]])

    write_deepseek_v3_gguf(hf, path, "glm-dsa", "GLM_DSA", indexer)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as GlmMoeDsaForCausalLM (its indexer types) with transformers' logits over a prompt
    longer than index_topk."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_glm_moe_dsa_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    assert model.config.indexer_types == ["full", "shared", "shared", "full"]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("context", "full"), [(256, [0, 1, 2, 3, 4, 5, 6]), (1 << 20, [0, 1, 2, 6])])
def test_gguf_without_indexer_types(context, full):
    """A file without attention.indexer.types reads as llama.cpp's glm-dsa reads it: every layer full below a
    context of 1048576, GLM-5.2's pattern (the first three, then every fourth) from it."""
    from autolm.models.glm_moe_dsa import _gguf_config

    d = {"num_hidden_layers": 7, "max_position_embeddings": context, "head_dim": 8, "num_attention_heads": 4,
         "rope_parameters": {"rope_type": "default"}}  # fmt: skip
    keys = {"expert_gating_func": None, "attention.key_length_mla": 24, "attention.q_lora_rank": 32}
    _gguf_config(d, keys.get)
    assert [i for i, t in enumerate(d["indexer_types"]) if t == "full"] == full
