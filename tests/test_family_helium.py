"""Helium (Kyutai's Helium-1 2B) against transformers and peft: Llama's layer with RoPE on interleaved pairs,
RMSNorm weighting in fp32 (epsilon 1e-8), head_dim from the config, GQA, an o_proj without bias; and a variant with
q/k/v and MLP biases, MHA, a tied head and another RoPE base. The standard battery, config.json in transformers' keys,
the CLI with a ChatML template (Helium-1 2B is a base model; no template is pinned). llama.cpp has no Helium
architecture: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.helium import HeliumConfig

# Helium-1's shape: GQA, head_dim given, the default epsilon, an untied head
HELIUM = Family(
    "HeliumConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, max_position_embeddings=64),
    lora_targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],  # peft has no default for helium
)  # fmt: skip
# biases on q/k/v and the MLP (o_proj has none), MHA, a tied head, another RoPE base and epsilon, three layers
BIASED = Family(
    "HeliumConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
         head_dim=16, max_position_embeddings=64, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"helium": HELIUM, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HELIUM.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    HELIUM.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    HELIUM.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    HELIUM.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HELIUM.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    HELIUM.check_disk_offload(tmp_path_factory, tmp_path)


def test_interleaved_rope_matters(tmp_path_factory):
    """The pairs rotate interleaved: rotating the halves instead changes the logits."""
    from conftest import padded_batch

    directory, _ = HELIUM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            assert layer.self_attn.rope_interleaved and layer.self_attn.o_proj.bias is None
            layer.self_attn.rope_interleaved = False
        halves = model(ids, attention_mask=mask).logits
    assert not torch.allclose(base, halves, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only;
    transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "biased") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors():
    """HeliumConfig() holds transformers' defaults; config.json without RoPE keys reads transformers' base
    (100000); bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.HeliumConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert HeliumConfig().to_dict() == theirs
    bare = HeliumConfig.from_dict(
        {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}
    )
    assert bare.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    for change, key in ((dict(head_dim=8), "head_dim"), (dict(mlp_bias="yes"), "mlp_bias"),
                        (dict(attention_bias=1), "attention_bias"), (dict(hidden_act="relu2"), "hidden_act"),
                        (dict(rms_norm_eps=0), "rms_norm_eps"), (dict(num_key_value_heads=3), "num_key_value_heads")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            HeliumConfig(**{**small, **change})


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("HeliumConfig", {**HELIUM.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "HeliumForCausalLM (helium)")
