"""HyperCLOVA X SEED (naver-hyperclovax/HyperCLOVAX-SEED-Think-14B) against transformers and peft: Granite's layer and
multipliers (every one away from 1) with peri-layer normalization (an RMSNorm on each sublayer's output before the
residual multiplier) and the logits multiplied by `logits_scaling` (Granite divides); biases, GQA, an untied head.
A variant without the post norms, the attention multiplier left to its default (head_dim ** -0.5 of a given head
size), MHA and a tied head. The standard battery, config.json in transformers' keys (attention_multiplier written
resolved, as transformers writes it), no GGUF layout (llama.cpp converts no HyperCLOVAXForCausalLM)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.hyperclovax import HyperCLOVAXConfig

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default for hyperclovax
# SEED's layer: post norms on (the default), muP multipliers (logits x 2.5), q/k/v/o and MLP biases, GQA, untied
SEED = Family(
    "HyperCLOVAXConfig",
    dict(SMALL, num_key_value_heads=2, embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.09,
         logits_scaling=2.5, attention_bias=True, mlp_bias=True),
    lora_targets=TARGETS,
)  # fmt: skip
# no post norms, attention_multiplier by default (24 ** -0.5 of head_dim 24, not 64 / 4), MHA, a tied head, logits
# x 0.5, another epsilon and RoPE base
PLAIN = Family(
    "HyperCLOVAXConfig",
    dict(SMALL, num_key_value_heads=4, head_dim=24, use_post_norm=False, logits_scaling=0.5, tie_word_embeddings=True,
         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"seed": SEED, "plain": PLAIN}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SEED.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SEED.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    SEED.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft

    from autolm.errors import AdapterError

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(hf, peft.LoraConfig())
    with pytest.raises(AdapterError, match="hyperclovax"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SEED.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the checkpoint's tensor names (post_norm1 / post_norm2 where the post
    norms are on) and config.json's keys and values."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    post = {k for k in saved if ".post_norm" in k}
    assert post == (
        {f"model.layers.{i}.post_norm{j}.weight" for i in (0, 1) for j in (1, 2)} if name == "seed" else set()
    )


def test_disk_offload(tmp_path_factory, tmp_path):
    SEED.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only (head_dim,
    the resolved attention_multiplier, use_post_norm); transformers' tensor-parallel plan; the attention's scale."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert type(model).__name__ == "HyperCLOVAXForCausalLM"
    attention = model.model.layers[0].self_attn
    assert attention.scaling == hf.config.attention_multiplier == (0.09 if name == "seed" else 24**-0.5)
    assert attention.head_dim == (16 if name == "seed" else 24)


def test_post_norms_and_logit_multiplier_matter(tmp_path_factory):
    """The post norms' weights are part of each layer's output, and logits_scaling multiplies the logits: zeroing
    post_norm2 or halving the multiplier changes them (halving it halves them)."""
    directory, _ = SEED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        model.logits_scaling /= 2
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, base / 2)
        for layer in model.model.layers:
            layer.post_norm2.weight.zero_()
        assert not torch.allclose(model(ids, attention_mask=mask).logits, base / 2, atol=1e-3)


def test_default_config_is_transformers():
    """HyperCLOVAXConfig() holds transformers' defaults (Granite's, head_dim 128, attention_multiplier 128 ** -0.5,
    post norms on); initializer_range, kept only where config.json has it, aside. A given head_dim sets the
    default attention multiplier, as in transformers."""
    import transformers

    check_config_defaults(HyperCLOVAXConfig)
    theirs = json.loads(transformers.HyperCLOVAXConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert HyperCLOVAXConfig().to_dict() == theirs
    sized = dict(hidden_size=64, num_attention_heads=4, head_dim=32)
    assert (
        HyperCLOVAXConfig(**sized).attention_multiplier
        == transformers.HyperCLOVAXConfig(**sized).attention_multiplier
        == 32**-0.5
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(use_post_norm="yes"), "use_post_norm"),
        (dict(attention_multiplier="x"), "attention_multiplier"),
        (dict(residual_multiplier=None), "residual_multiplier"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=66), "hidden_size"),
    ],
)
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        HyperCLOVAXConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "num_hidden_layers": 2, **change})  # fmt: skip


def test_gguf_out_is_refused(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """No llama.cpp architecture holds HyperCLOVA X (no converter class; Granite's file would drop the post norms and
    divide the logits): GGUF out is refused by model type, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(SEED.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="hyperclovax"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")
