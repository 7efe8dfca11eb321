"""CTRL (Salesforce/ctrl) against transformers and peft: embeddings `w` times sqrt(n_embd) (given inputs_embeds
too), sinusoidal positions (transformers' table, row for row) under left padding and their end at n_positions,
pre-norm layers at transformers' hard-coded epsilon with Wq / Wk / Wv / dense and the `ffn` Sequential, the final
`layernorm` at layer_norm_epsilon, the tied head's own bias (resized as transformers resizes it), token_type_ids,
config.json in CTRL's names, LoRA (peft has no default targets), int8/int4, files of the bare model, the refused
tensor-parallel plan (llama.cpp has no CTRL: no GGUF)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults, check_lora_needs_targets
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

DROPS = dict(resid_pdrop=0.0, embd_pdrop=0.0)
# CTRL's options: a tied head (with its bias); widths divide int4's groups of 32
CTRL = Family(
    "CTRLConfig",
    dict(DROPS, n_embd=64, n_layer=2, n_head=4, dff=96, n_positions=64),
    lora_targets=["Wq", "Wv", "dense", "ffn.0", "ffn.2"],
)
# an untied head, more heads and layers, a final-norm epsilon other than the layers' 1e-6
VARIANT = Family(
    "CTRLConfig",
    dict(DROPS, n_embd=64, n_layer=3, n_head=8, dff=80, n_positions=48, layer_norm_epsilon=1e-2,
         tie_word_embeddings=False),
    lora_targets=["Wk", "ffn.2"],
)  # fmt: skip
FAMILIES = {"ctrl": CTRL, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_greedy_and_beam(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    CTRL.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    CTRL.check_compiled_step(tmp_path_factory, home)


def test_hidden_states(tmp_path_factory):
    CTRL.check_hidden_states(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_does(tmp_path_factory):
    """peft has no default target_modules for ctrl: both refuse a LoraConfig that names none."""
    check_lora_needs_targets(*CTRL.checkpoint(tmp_path_factory))


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    CTRL.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    VARIANT.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (w, Wq ..., ffn.0 / ffn.2, lm_head.bias, no position table);
    the saved config.json has transformers' keys and values (n_embd, dff, ...), no others."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.model is model.transformer and model.model.norm is model.transformer.layernorm
    assert model.get_input_embeddings() is model.transformer.w and model.lm_head.bias is not None
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "ctrl" and written["architectures"] == ["CTRLLMHeadModel"]


def test_default_config_is_transformers():
    """CTRLConfig() holds transformers' defaults and writes transformers' keys; CTRL's names as keyword arguments
    and attributes, as in transformers."""
    import transformers

    from autolm.models import CTRLConfig

    theirs = json.loads(transformers.CTRLConfig().to_json_string())
    theirs.pop("transformers_version")
    assert CTRLConfig().to_dict() == theirs
    check_config_defaults(CTRLConfig)
    ours = CTRLConfig(n_embd=32, n_layer=1, n_head=2, dff=48, n_positions=16)
    assert (ours.hidden_size, ours.intermediate_size, ours.max_position_embeddings) == (32, 48, 16)
    assert ours.n_embd == 32 and ours.dff == 48 and ours.to_dict()["dff"] == 48


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(n_head=5), "n_head"),
        (dict(dff=0), "dff"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(resid_pdrop=2.0), "resid_pdrop"),
        (dict(embd_pdrop=-1), "embd_pdrop"),
    ],
)
def test_config_errors_name_ctrl_keys(tmp_path, bad, match):
    base = dict(model_type="ctrl", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_position_encodings_are_transformers_table():
    """Each position's encoding is transformers' table's row, bit for bit (an odd width too)."""
    from transformers.models.ctrl.modeling_ctrl import positional_encoding as theirs

    from autolm.models.ctrl import positional_encoding

    for dim in (64, 1280, 33):
        ids = torch.tensor([[0, 1, 5], [255, 17, 2]])
        assert torch.equal(positional_encoding(ids, dim), theirs(256, dim, torch.float)[ids])


def test_positions_follow_the_padding_and_stop_at_n_positions(tmp_path_factory):
    """Left padding shifts the positions (a padded row gives the unpadded row's logits, as transformers' generate
    counts positions over the mask); a position past n_positions is a clear error (transformers' table ends)."""
    VARIANT.check_learned_positions(tmp_path_factory)


def test_inputs_embeds_and_token_type_ids_as_transformers(tmp_path_factory):
    """Given inputs_embeds are scaled by sqrt(n_embd) as transformers scales them; token_type_ids are embedded by
    `w`, scaled, and added."""
    directory, hf = CTRL.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    types = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    pos, real = positions(mask), mask.bool()
    embeds = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids, token_type_ids=types), dict(inputs_embeds=embeds)):
            ours = model(attention_mask=mask, position_ids=pos, **kwargs).logits
            theirs = hf(attention_mask=mask, position_ids=pos, **kwargs).logits
            torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
        plain = model(ids, attention_mask=mask, position_ids=pos).logits
    assert not torch.allclose(model(ids, attention_mask=mask, token_type_ids=types).logits[real], plain[real])


@pytest.mark.parametrize("name", FAMILIES)
def test_resizing_resizes_the_head_bias_as_transformers(tmp_path_factory, tmp_path, name):
    """resize_token_embeddings grows `w`, the head (tied, or its own) and the head's bias as transformers does;
    the resized model saves and loads back in transformers with equal logits."""
    import transformers

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    model.resize_token_embeddings(VOCAB + 8)
    theirs.resize_token_embeddings(VOCAB + 8)
    assert model.lm_head.bias.shape == theirs.lm_head.bias.shape == (VOCAB + 8,)
    assert torch.equal(model.lm_head.bias, theirs.lm_head.bias)
    assert (model.lm_head.weight is model.transformer.w.weight) == model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "resized")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "resized", attn_implementation="eager"
    )
    ids = torch.tensor([[VOCAB + 3, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, back(ids).logits, atol=1e-4, rtol=1e-4)


def test_bare_model_file_without_prefix(tmp_path_factory, tmp_path):
    """A file naming the body's tensors without `transformer.` (w.weight, h.0...): transformers' logits; saved
    as transformers saves."""
    directory, hf = CTRL.checkpoint(tmp_path_factory)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert "w.weight" in bare and "h.0.multi_head_attention.Wq.weight" in bare
    (tmp_path / "bare").mkdir()
    save_file(bare, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bare" / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(tensors)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for CTRL: tp_plan='auto' is a ConfigError naming the type."""
    directory, _ = CTRL.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="model type 'ctrl' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")
