"""nanochat (Karpathy's nanochat d20 / d32) against transformers and peft: weightless RMSNorms everywhere (the
layers', the per-head q/k norms after RoPE, the final norm, also applied to the embeddings), RoPE rotating the other
way, the plain fc1 -> relu2 -> fc2 MLP, logits soft-capped (tanh), an untied head; and a variant with q/k/v/o biases,
GQA, no soft-capping and another RoPE base. The standard battery, config.json in transformers' keys, the CLI with a
ChatML template (nanochat's own template is not pinned here). llama.cpp has no nanochat architecture: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.nanochat import NanoChatConfig

# nanochat's shape (MHA, no biases) with a low soft-cap, so the tanh bends the tiny model's logits
NANOCHAT = Family(
    "NanoChatConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64, final_logit_softcapping=2.0),
    lora_targets=["q_proj", "v_proj", "fc1", "fc2"],  # peft has no default for nanochat
)  # fmt: skip
# biases on q/k/v/o, GQA, no soft-capping, another RoPE base, three layers
BIASED = Family(
    "NanoChatConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, attention_bias=True, final_logit_softcapping=None,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"nanochat": NANOCHAT, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    NANOCHAT.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    NANOCHAT.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    NANOCHAT.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NANOCHAT.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    NANOCHAT.check_disk_offload(tmp_path_factory, tmp_path)


def test_quirks_matter(tmp_path_factory):
    """Each quirk changes the logits: the soft-cap bounds them, the embeddings' norm and the reversed RoPE count."""
    from conftest import padded_batch

    from autolm.nn import Rotary

    directory, _ = NANOCHAT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        assert base.abs().max() < 2.0
        body = model.model
        body.scale_inputs = lambda x, position_ids: x
        no_norm = model(ids, attention_mask=mask).logits
        del body.scale_inputs
        c = model.config
        body.rotary = Rotary(c.rope_kinds(), c.head_dim, c.max_position_embeddings)
        forward_rope = model(ids, attention_mask=mask).logits
    assert not torch.allclose(base, no_norm, atol=1e-3)
    assert not torch.allclose(base, forward_rope, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the norms hold none); config.json round-trips with transformers'
    keys only; transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert not any("norm" in k for k in model.state_dict())
    assert model.lm_head.weight is not model.model.embed_tokens.weight and "lm_head" in model.tp_plan()


def test_default_config_and_errors():
    """NanoChatConfig() holds transformers' defaults; bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.NanoChatConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert NanoChatConfig().to_dict() == theirs
    for change, key in ((dict(final_logit_softcapping=0), "final_logit_softcapping"),
                        (dict(final_logit_softcapping="15"), "final_logit_softcapping"),
                        (dict(attention_bias=1), "attention_bias"), (dict(hidden_act="xielu"), "hidden_act"),
                        (dict(rms_norm_eps=-1.0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            NanoChatConfig(hidden_size=64, num_attention_heads=4, **change)


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("NanoChatConfig", {**NANOCHAT.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "NanoChatForCausalLM (nanochat)")
