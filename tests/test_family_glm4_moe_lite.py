"""GLM-4.7-Flash (glm4_moe_lite) against transformers and peft: DeepSeek-V3's Multi-head Latent Attention (the
low-rank query and without it, RoPE over interleaved pairs and rotate-half, YaRN with mscale_all_dim) with GLM-4.5's
sigmoid-routed experts in groups (correction bias, renormalised, scaled) and the shared expert, the dense layers
where mlp_layer_types says (not only leading ones). The standard battery, config.json as transformers writes it,
the next-token-prediction layer skipped, the CLI, the config values refused. No GGUF: the family has no layout
(llama.cpp's converter writes GLM-4.7-Flash as deepseek2, DeepSeek-V3's)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chat_checks import check_cli
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    mlp_layer_types=["dense", "sparse", "dense"],
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.8,
    max_position_embeddings=64,
)
# peft has no default target modules for glm4_moe_lite
_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
FLASH = Family("Glm4MoeLiteConfig", SIZES, lora_targets=_TARGETS)
# no low-rank query, rotate-half RoPE, attention biases, v wider than q/k, no renormalisation, YaRN
PLAIN_Q = Family(
    "Glm4MoeLiteConfig",
    dict(SIZES, q_lora_rank=None, rope_interleave=False, attention_bias=True, v_head_dim=32, norm_topk_prob=False,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256,
         rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1,
                           original_max_position_embeddings=64)),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"flash": FLASH, "plain_q": PLAIN_Q}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    FLASH.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    FLASH.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FLASH.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict (the dense layer after a sparse one); the checkpoint's
    per-expert tensors and transformers' config.json (keys and values) in the files autolm saves."""
    from safetensors import safe_open

    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()
    }
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        sparse = 1 if name == "flash" else 2
        assert f"model.layers.{sparse}.mlp.experts.7.gate_proj.weight" in set(ours.keys())
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
        d["rope_parameters"].pop("type", None)  # transformers keeps v4's "type" beside rope_type
    assert written == original


def test_disk_offload(tmp_path_factory, tmp_path):
    FLASH.check_disk_offload(tmp_path_factory, tmp_path)


def test_nextn_layer_is_skipped(tmp_path_factory, tmp_path, caplog):
    """GLM-4.7-Flash's next-token-prediction layer (model.layers.47; or num_nextn_predict_layers past the last
    layer) is skipped on load without a word; config.json's first_k_dense_replace and num_nextn_predict_layers
    (not transformers' fields) are kept on saving."""
    from safetensors.torch import load_file, save_file

    directory, _ = FLASH.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "mtp")
    path = tmp_path / "mtp" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.47.enorm.weight"] = torch.ones(64)
    tensors["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, first_k_dense_replace=1)
    (tmp_path / "mtp" / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="autolm"):
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert len(model.model.layers) == 3 and "deeper layers" not in caplog.text
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1 and saved["first_k_dense_replace"] == 1


def test_default_config_is_transformers():
    """Glm4MoeLiteConfig() holds transformers' defaults (GLM-4.7-Flash's sizes, mlp_layer_types derived);
    initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.glm4_moe_lite import Glm4MoeLiteConfig

    theirs = json.loads(transformers.Glm4MoeLiteConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert Glm4MoeLiteConfig().to_dict() == theirs


def test_cli(tmp_path_factory, tmp_path):
    """DeepSeek-V3's chat template (GLM-4.7-Flash's is not among the test templates)."""
    long = Family(FLASH.config_cls, dict(SIZES, max_position_embeddings=2048), lora_targets=["q_b_proj"])
    check_cli(long, "deepseek-v3.jinja", tmp_path_factory, tmp_path, "Glm4MoeLiteForCausalLM (glm4_moe_lite)")


def test_config_errors_name_the_key():
    from autolm.models.glm4_moe_lite import Glm4MoeLiteConfig

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 n_group=2, topk_group=1, num_experts_per_tok=2)  # fmt: skip
    Glm4MoeLiteConfig(**small)
    for key, bad in (
        ("mlp_layer_types", ["dense"]),
        ("mlp_layer_types", ["dense", "moe"]),
        ("q_lora_rank", 0),
        ("kv_lora_rank", None),
        ("qk_rope_head_dim", 7),
        ("num_key_value_heads", 2),
        ("num_experts_per_tok", 9),
        ("n_group", 3),
        ("routed_scaling_factor", 0),
        ("rope_interleave", "yes"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            Glm4MoeLiteConfig.from_dict({**small, key: bad})
    with pytest.raises(autolm.ConfigError, match="partial_rotary_factor"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        Glm4MoeLiteConfig.from_dict({**small, "rope_parameters": rope})
