"""XGLM (facebook/xglm-564M ... 7.5B) against transformers and peft: embeddings times sqrt(d_model)
(scale_embedding), fixed sinusoidal positions read two rows on (the row at pad_token_id zero; an odd d_model's
zero column), OPT's pre-norm layer with biases and a GELU fc1 / fc2 MLP, the final `layer_norm`, a tied head;
the standard battery, config.json in fairseq's names, refused configs (add_cross_attention) and the refused
tensor-parallel plan (llama.cpp has no XGLM: no GGUF)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(ffn_dim=96, num_layers=2, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]  # peft has no default targets for xglm
# xglm-564M's options: scaled embeddings, GELU, a tied head
XGLM = Family("XGLMConfig", dict(SMALL, d_model=64, attention_heads=4), lora_targets=TARGETS)
# an odd d_model (the sinusoids' zero column), unscaled embeddings, an untied head, ReLU
ODD = Family(
    "XGLMConfig",
    dict(SMALL, d_model=63, attention_heads=3, scale_embedding=False, tie_word_embeddings=False,
         activation_function="relu"),
    lora_targets=["q_proj", "fc2"],
)  # fmt: skip
FAMILIES = {"xglm": XGLM, "odd": ODD}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    XGLM.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    XGLM.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    XGLM.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    ODD.check_disk_offload(tmp_path_factory, tmp_path)


def test_padding_row_of_the_positions(tmp_path_factory, tmp_path):
    """The position table's row at pad_token_id is zero: with pad_token_id 4, position 2 adds nothing, in
    autolm as in transformers (same files, equal logits); positions past max_position_embeddings computed as
    transformers grows its table."""
    import transformers

    src, _ = XGLM.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "pad4")
    path = tmp_path / "pad4" / "config.json"
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "pad_token_id": 4, "max_position_embeddings": 4})
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pad4", attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "pad4")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    from autolm.models.xglm import sinusoidal_positions

    assert not sinusoidal_positions(torch.tensor([[2]]), 64, 4).any()
    assert sinusoidal_positions(torch.tensor([[1, 3]]), 64, 4).abs().sum(-1).gt(0).all()


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (model.layer_norm, out_proj, no position table); the saved
    config.json has transformers' keys and values (d_model, ffn_dim, ...), no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """XGLMConfig() holds transformers' defaults (d_model 1024, dropout 0.1, pad 1, bos 0, ...); fairseq's names
    as keyword arguments and attributes, as in transformers."""
    import transformers

    from autolm.models import XGLMConfig

    theirs = json.loads(transformers.XGLMConfig().to_json_string())
    theirs.pop("transformers_version")
    assert XGLMConfig().to_dict() == theirs
    check_config_defaults(XGLMConfig)
    ours = XGLMConfig(d_model=64, attention_heads=4, ffn_dim=96, num_layers=2)
    assert (ours.hidden_size, ours.num_attention_heads, ours.intermediate_size, ours.num_hidden_layers) == (
        64,
        4,
        96,
        2,
    )
    assert ours.d_model == 64 and ours.to_dict()["ffn_dim"] == 96


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(dropout=2.0), "dropout"),
        (dict(layerdrop=-1), "layerdrop"),
        (dict(scale_embedding="yes"), "scale_embedding"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(d_model=66), "d_model"),  # not divisible by 4 heads
        (dict(d_model=2, attention_heads=1), "d_model must be at least 4"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="xglm", d_model=64, attention_heads=4, num_layers=2, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for XGLM: tp_plan='auto' is a ConfigError naming the type."""
    directory, _ = XGLM.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'xglm' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
