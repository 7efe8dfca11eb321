"""Persimmon (persimmon-8b-base / -chat) against transformers and peft: GPT-NeoX's fused per-head
`query_key_value` with biases, a LayerNorm (with bias) over each head's queries and keys (qk_layernorm, on by
default) before partial RoPE (half of each head by default), the sequential residual, a squared-ReLU
`dense_h_to_4h` / `dense_4h_to_h` MLP, `final_layernorm`, an untied head; the standard battery, config.json in
both RoPE spellings, the refused tensor-parallel plan (llama.cpp has no Persimmon: no GGUF)."""

from __future__ import annotations

import json

import pytest
from conftest import VOCAB
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)  # fmt: skip
# persimmon-8b's options: q/k LayerNorms, relu2, half of each head rotated
PERSIMMON = Family("PersimmonConfig", SMALL, lora_targets=["query_key_value", "dense", "dense_h_to_4h"])
# no q/k norms, a quarter of each head rotated, another RoPE base and epsilon, exact GELU
PLAIN = Family(
    "PersimmonConfig",
    dict(SMALL, qk_layernorm=False, partial_rotary_factor=0.25, rope_theta=25000.0, layer_norm_eps=1e-4,
         hidden_act="gelu"),
    lora_targets=["query_key_value", "dense_4h_to_h"],
)  # fmt: skip
FAMILIES = {"persimmon": PERSIMMON, "plain": PLAIN}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    PERSIMMON.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    PERSIMMON.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """Adapters made by peft and by autolm agree (peft has no default targets for persimmon: named here)."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused():
    """peft has no default target_modules for persimmon; neither has autolm: the refusal names the type."""
    from autolm.errors import AdapterError
    from autolm.lora.config import default_targets

    with pytest.raises(AdapterError, match="persimmon"):
        default_targets("persimmon")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    PERSIMMON.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    PLAIN.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (query_key_value, dense, q_layernorm / k_layernorm with bias,
    final_layernorm); the saved config.json has transformers' keys and values, no others (no
    num_key_value_heads or head_dim)."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """PersimmonConfig() holds transformers' defaults (relu2, qk_layernorm, partial_rotary_factor 0.5, vocabulary
    262144, ...); initializer_range, which autolm keeps only where config.json has it, aside."""
    import transformers

    from autolm.models import PersimmonConfig

    theirs = json.loads(transformers.PersimmonConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert PersimmonConfig().to_dict() == theirs
    check_config_defaults(PersimmonConfig)


def test_persimmon_config_spelling(tmp_path_factory, tmp_path):
    """persimmon-8b's config.json as shipped (transformers 4's spelling): partial_rotary_factor and rope_theta at
    the top level, rope_scaling null. Saved back in that spelling, which transformers loads with equal logits."""
    top = {"partial_rotary_factor": 0.25, "rope_theta": 25000.0, "rope_scaling": None}
    config = PLAIN.check_top_level_rope(tmp_path_factory, tmp_path, top)
    assert (config.rope_parameters["partial_rotary_factor"], config.rope_parameters["rope_theta"]) == (
        0.25,
        25000.0,
    )


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            dict(partial_rotary_factor=0.2),
            "partial_rotary_factor",
        ),  # 0.2 of 16 is 3.2: 3 rotary dimensions, odd
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(qk_layernorm="yes"), "qk_layernorm"),
        (dict(hidden_dropout=2.0), "hidden_dropout"),
        (dict(hidden_act="swiglu"), "hidden_act"),
        (dict(hidden_size=66), "hidden_size"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="persimmon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for Persimmon: tp_plan='auto' is a ConfigError naming the
    model type."""
    directory, _ = PERSIMMON.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'persimmon' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
