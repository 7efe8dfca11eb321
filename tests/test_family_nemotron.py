"""Nemotron (Minitron-4B/8B-Base, Nemotron-Mini-4B-Instruct, Nemotron-4-340B) against transformers and peft:
LayerNorm1P ((1 + w) weight, bias, in the input's dtype), GQA with partial rotary embeddings (half of each head by
default), optional attention and MLP biases, the plain up_proj -> relu2 -> down_proj MLP, an untied head; the
standard battery, config.json in both RoPE spellings, GGUF as llama.cpp's converter writes "nemotron" (1 added
to every norm weight) in and out, and the CLI (no chat template is pinned for Nemotron-Mini's instruct model)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_llamacpp import CONVERTERS, write_gguf
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
# Minitron's shape: no biases, half of each head rotated (8 of 16)
NEMOTRON = Family(
    "NemotronConfig", SMALL, lora_targets=["q_proj", "v_proj", "up_proj", "down_proj"]
)  # peft has no default for nemotron
# the options: attention and MLP biases, a quarter of each head rotated, another epsilon and RoPE base
BIASED = Family(
    "NemotronConfig",
    dict(SMALL, attention_bias=True, mlp_bias=True, norm_eps=1e-3,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}),
)  # fmt: skip
FAMILIES = {"nemotron": NEMOTRON, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BIASED.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    BIASED.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    """Named targets (peft has no default for nemotron): adapters made by peft and by autolm agree."""
    NEMOTRON.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NEMOTRON.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the file holds the checkpoint's tensor names, no others."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))


def test_disk_offload(tmp_path_factory, tmp_path):
    BIASED.check_disk_offload(tmp_path_factory, tmp_path)


def test_layernorm1p_is_transformers():
    """NemotronLayerNorm1P gives transformers' (weight used as 1 + w, with the bias) in fp32 and in bf16, where
    both compute in the input's dtype."""
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P as Theirs

    from autolm.models.nemotron import NemotronLayerNorm1P

    theirs, ours = Theirs(16, eps=1e-5), NemotronLayerNorm1P(16, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs.weight.copy_(0.3 * torch.randn(16, generator=g))
        theirs.bias.copy_(0.1 * torch.randn(16, generator=g))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16, generator=g) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    half = x.bfloat16()
    torch.testing.assert_close(ours.bfloat16()(half), theirs.bfloat16()(half), atol=0, rtol=0)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers'; the saved config.json has transformers' keys and values,
    no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """NemotronConfig() holds transformers' defaults (relu2, norm_eps 1e-5, partial_rotary_factor 0.5, bos 2,
    eos 3, untied); initializer_range, which autolm keeps only where config.json has it, aside, and
    num_key_value_heads, which transformers leaves null (autolm: the head count, what attention uses)."""
    import transformers

    from autolm.models.nemotron import NemotronConfig

    theirs = json.loads(transformers.NemotronConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    ours = NemotronConfig().to_dict()
    assert (theirs.pop("num_key_value_heads"), ours.pop("num_key_value_heads")) == (None, 48)
    assert ours == theirs


def test_minitron_config_spelling(tmp_path_factory, tmp_path):
    """Minitron's config.json as shipped (transformers 4's spelling): partial_rotary_factor and rope_theta at the
    top level. The same model, saved back in that spelling, loads in transformers with equal logits."""
    config = BIASED.check_top_level_rope(
        tmp_path_factory, tmp_path, {"partial_rotary_factor": 0.25, "rope_theta": 500.0}
    )
    assert config.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize(
    "bad,match",
    [
        # 0.3 of a 16-dimension head is 4.8, 4 rotary dimensions: fine; 0.2 of it is 3.2, 3: odd
        (dict(partial_rotary_factor=0.2), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(mlp_bias=1), "mlp_bias"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="swiglu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="nemotron", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=2, vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes nemotron ----------------------------------------------


def _nemotron_metadata(w, c) -> None:
    """NemotronModel.set_gguf_parameters: TextModel's keys (sizes, head counts, the RoPE base, the head size as
    config.json holds head_dim), the vocabulary size, the LayerNorm epsilon, the rotary dimensions
    int(factor * hidden) // heads, the RoPE scaling type (none without a factor)."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_layer_norm_eps(c.norm_eps)
    w.add_rope_dimension_count(int(rope["partial_rotary_factor"] * c.hidden_size) // c.num_attention_heads)
    if rope.get("factor") is None:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])


CONVERTERS.setdefault("nemotron", ("nemotron", _nemotron_metadata, False))  # q/k not permuted (NeoX RoPE)


def write_nemotron_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter writes of transformers' Nemotron model `hf`: NemotronModel's keys, gguf-py's
    tensor names, q/k not permuted, 1 added to every `*norm.weight` (NemotronModel.modify_tensors: LayerNorm1P
    stored as a plain LayerNorm's weight), a plain vocabulary."""
    shifted = {k: v + 1 if k.endswith("norm.weight") else v for k, v in hf.state_dict().items()}
    write_gguf(SimpleNamespace(config=hf.config, state_dict=lambda: shifted), path)


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file: transformers' logits; the config read back from nemotron.* metadata and the
    tensors present (rotary fraction, biases, epsilon, RoPE base, head size, untied head)."""
    _, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_nemotron_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "NemotronForCausalLM"
    ours, theirs = model.config, hf.config
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "num_key_value_heads", "head_dim",
                "intermediate_size"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.norm_eps == pytest.approx(theirs.norm_eps)
    assert ours.rope_parameters["partial_rotary_factor"] == theirs.rope_parameters["partial_rotary_factor"]
    assert ours.rope_theta == pytest.approx(theirs.rope_parameters["rope_theta"])
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; `autolm inspect` names the class and type; with
    no chat template `autolm chat` says so."""
    check_cli_without_template(NEMOTRON, tmp_path_factory, tmp_path, "NemotronForCausalLM (nemotron)")
