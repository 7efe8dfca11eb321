"""OpenAI GPT (GPT-1, model_type "openai-gpt") against transformers and peft: learned positions under left padding,
post-norm blocks (no final norm), Conv1D weights stored (in, out) and the fused c_attn, `afn` as transformers'
ACT_FNS ("gelu" the tanh approximation), config.json in GPT-1's names with the hyphenated model_type, LoRA on
Conv1D (peft's fan_in_fan_out; peft has no default targets), files of the bare model (no `transformer.` prefix,
causal-mask buffers), token_type_ids, int8/int4, the refused tensor-parallel plan (llama.cpp has no GPT-1: no
GGUF)."""

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

TARGETS = ["c_attn", "c_proj", "c_fc"]  # peft has no default targets for openai-gpt
DROPS = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
# GPT-1's options: afn "gelu" (gelu_new), a tied head; widths divide int4's groups of 32
GPT = Family(
    "OpenAIGPTConfig", dict(DROPS, n_embd=64, n_layer=2, n_head=4, n_positions=64), lora_targets=TARGETS
)
# an untied head, ReLU, more heads and layers, a larger LayerNorm epsilon
VARIANT = Family(
    "OpenAIGPTConfig",
    dict(DROPS, n_embd=64, n_layer=3, n_head=8, n_positions=48, afn="relu", layer_norm_epsilon=1e-3,
         tie_word_embeddings=False),
    lora_targets=["c_attn", "mlp.c_proj"],
)  # fmt: skip
# "swish" (SiLU), a narrow model
SWISH = Family("OpenAIGPTConfig", dict(DROPS, n_embd=32, n_layer=1, n_head=2, n_positions=32, afn="swish"))
FAMILIES = {"gpt": GPT, "variant": VARIANT, "swish": SWISH}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["gpt", "variant"])
def test_generate_greedy_and_beam(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GPT.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["gpt", "variant"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GPT.check_compiled_step(tmp_path_factory, home)


def test_hidden_states(tmp_path_factory):
    VARIANT.check_hidden_states(tmp_path_factory)


@pytest.mark.parametrize("name", ["gpt", "variant"])
def test_lora_on_conv1d_both_ways(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_does(tmp_path_factory):
    """peft has no default target_modules for openai-gpt: both refuse a LoraConfig that names none."""
    check_lora_needs_targets(*GPT.checkpoint(tmp_path_factory))


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GPT.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", ["gpt", "variant"])
def test_save_loads_in_transformers(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    VARIANT.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (Conv1D (in, out), no final norm, no buffers); the saved
    config.json has transformers' keys and values (model_type "openai-gpt", afn, n_embd, ...), no others."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.model is model.transformer and model.model.layers is model.transformer.h
    assert model.get_input_embeddings() is model.transformer.tokens_embed
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["model_type"] == "openai-gpt" and written["architectures"] == ["OpenAIGPTLMHeadModel"]


def test_default_config_is_transformers():
    """OpenAIGPTConfig() holds transformers' defaults and writes transformers' keys; GPT-1's names as keyword
    arguments and attributes, as in transformers."""
    import transformers

    from autolm.models import OpenAIGPTConfig

    theirs = json.loads(transformers.OpenAIGPTConfig().to_json_string())
    theirs.pop("transformers_version")
    assert OpenAIGPTConfig().to_dict() == theirs
    check_config_defaults(OpenAIGPTConfig)
    ours = OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=2, n_positions=16, afn="relu")
    assert (ours.hidden_size, ours.num_hidden_layers, ours.max_position_embeddings) == (32, 1, 16)
    assert ours.n_embd == 32 and ours.afn == "relu" and ours.intermediate_size == 128
    assert ours.to_dict()["afn"] == "relu" and "use_cache" not in ours.to_dict()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(n_head=5), "n_head"),
        (dict(afn="gelu_new"), "afn"),  # not in transformers' ACT_FNS either
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(attn_pdrop=2.0), "attn_pdrop"),
        (dict(resid_pdrop=-1), "resid_pdrop"),
        (dict(summary_use_proj="yes"), "summary_use_proj"),
    ],
)
def test_config_errors_name_gpt_keys(tmp_path, bad, match):
    base = dict(model_type="openai-gpt", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_bare_model_file_without_prefix_and_with_mask_buffers(tmp_path_factory, tmp_path):
    """A file of the bare model (`h.0.attn.c_attn.weight`, `tokens_embed.weight`, attn.bias buffers): loads with
    transformers' logits and saves as transformers saves."""
    directory, hf = GPT.checkpoint(tmp_path_factory)
    n = hf.config.n_positions
    old = {
        k.removeprefix("transformer."): v
        for k, v in load_file(os.path.join(directory, "model.safetensors")).items()
    }
    for i in range(hf.config.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    assert "h.0.attn.c_attn.weight" in old and "tokens_embed.weight" in old
    (tmp_path / "bare").mkdir()
    save_file(old, tmp_path / "bare" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bare" / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "resaved")
    assert set(load_file(tmp_path / "resaved" / "model.safetensors")) == set(
        load_file(os.path.join(directory, "model.safetensors"))
    )


def test_token_type_ids_as_transformers(tmp_path_factory):
    """Segment ids are embedded by tokens_embed and added to the inputs, as transformers does."""
    directory, hf = GPT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    types = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    pos, real = positions(mask), mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos, token_type_ids=types).logits
        theirs = hf(ids, attention_mask=mask, position_ids=pos, token_type_ids=types).logits
        plain = model(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[real], plain[real])


def test_positions_follow_the_padding_and_stop_at_n_positions(tmp_path_factory):
    """Left padding shifts the learned positions (a padded row gives the unpadded row's logits, as transformers'
    generate counts positions over the mask); a position past n_positions is a clear error."""
    SWISH.check_learned_positions(tmp_path_factory)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers has no tensor-parallel plan for GPT-1 (c_attn packs every head's q, k and v): neither has
    autolm, and tp_plan='auto' says so before anything is launched."""
    directory, _ = GPT.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="model type 'openai-gpt' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_resizing_keeps_the_tie(tmp_path_factory):
    """resize_token_embeddings replaces tokens_embed (the head stays tied, the old rows kept)."""
    directory, _ = GPT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    old = model.transformer.tokens_embed.weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 8)
    assert model.transformer.tokens_embed.weight.shape == (VOCAB + 8, 64)
    assert model.lm_head.weight is model.transformer.tokens_embed.weight
    assert torch.equal(model.transformer.tokens_embed.weight[:VOCAB], old)
    assert model(torch.tensor([[VOCAB + 3, 5]])).logits.shape == (1, 2, VOCAB + 8)
