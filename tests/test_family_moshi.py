"""Moshi's text decoder (transformers' MoshiForCausalLM) against transformers and peft: GQA with RoPE, the gated MLP
of one fc1 split in halves, fp32-weighted RMSNorm (epsilon 1e-8), the MoshiLinear `.linear` names, embeddings with
vocab_size + 1 rows and a head never tied; a variant with GELU, MHA, a head_dim narrower than hidden_size / heads,
another RoPE base and tie_word_embeddings set (transformers ties nothing). The standard battery, config.json in
transformers' keys (the Mimi and depth-decoder sub-configs kept), `last_hidden_state` in the output, and the sliding
window: transformers' cached decoding keeps sliding_window keys, which autolm keeps in its forward too (transformers'
uncached forward beyond the window attends to every key: pinned as the documented difference). llama.cpp has no Moshi
architecture: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.moshi import MoshiConfig

MOSHI = Family(
    "MoshiConfig",
    dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64),
    lora_targets=["fc1", "fc2"],  # peft has no default for moshi (its q/k/v/o are MoshiLinear, wrapping `linear`)
)  # fmt: skip
VARIANT = Family(
    "MoshiConfig",
    dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, head_dim=8, hidden_act="gelu",
         max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
WINDOW = Family("MoshiConfig", {**MOSHI.kwargs, "sliding_window": 6})
FAMILIES = {"moshi": MOSHI, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MOSHI.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    MOSHI.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MOSHI.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    MOSHI.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MOSHI.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    MOSHI.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names (`self_attn.q_proj.linear.weight`) and shapes (vocab_size + 1 embedding rows);
    config.json round-trips with transformers' keys only, the sub-configs as given; the head is never tied."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape[0] == VOCAB + 1 == hf.model.embed_tokens.weight.shape[0]
    assert "model.layers.0.self_attn.q_proj.linear.weight" in hf.state_dict()
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    with open(f"{directory}/config.json") as f:
        original = json.load(f)
    assert model.config.audio_encoder_config == original["audio_encoder_config"]
    assert original["tie_word_embeddings"] == (name == "variant") and not model.config.tie_word_embeddings
    with pytest.raises(ConfigError, match="tensor-parallel"):  # transformers declares no plan for Moshi
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_output_and_loss(tmp_path_factory):
    """The output's fields, in transformers' order: loss, logits, last_hidden_state (the states the head read, cut
    by logits_to_keep), past_key_values; the loss is transformers'."""
    directory, hf = MOSHI.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        # a label whose logits come from a padding slot (nobody's to compare) is ignored
        labels = ids.masked_fill(mask * torch.nn.functional.pad(mask[:, :-1], (1, 0)) == 0, -100)
        ours = model(ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
        assert (
            list(ours.keys())
            == list(theirs.keys())
            == ["loss", "logits", "last_hidden_state", "past_key_values"]
        )
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-4, rtol=1e-4)
        ours = model(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=3)
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=3)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-4, rtol=1e-4)
    assert ours.last_hidden_state.shape[1] == 3 and len(ours.to_tuple()) == 3


def test_sliding_window(tmp_path_factory):
    """sliding_window 6: autolm's forward over 14 tokens gives transformers' logits of a cached decode (a prompt
    within the window, then one token at a time, its cache keeping the window), and greedy generation well past
    the window gives transformers' tokens. transformers' uncached forward differs past the window (it attends to
    every key): the documented difference."""
    directory, hf = WINDOW.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(ids[:, :4], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(4, 14):
            out = hf(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        cached = torch.cat(steps, 1)
        ours = model(ids).logits
        uncached = hf(ids).logits
    torch.testing.assert_close(ours, cached, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(uncached[:, :6], cached[:, :6], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(uncached[:, 6:], cached[:, 6:], atol=1e-3)
    row = ids[:, :5]
    assert torch.equal(model.generate(row, max_new_tokens=16, do_sample=False),
                       hf.generate(row, max_new_tokens=16, do_sample=False))  # fmt: skip


def test_default_config_and_errors():
    """MoshiConfig() holds transformers' defaults (the sub-configs aside: transformers fills a default Mimi config,
    autolm keeps config.json's as given); bad values raise ConfigError naming the key."""
    import transformers

    check_config_defaults(MoshiConfig)
    theirs = json.loads(transformers.MoshiConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "audio_encoder_config", "depth_decoder_config"):
        theirs.pop(key)
    assert MoshiConfig().to_dict() == theirs
    small = dict(hidden_size=64, num_attention_heads=4, ffn_dim=96)
    for change, key in ((dict(ffn_dim=97), "ffn_dim"), (dict(num_codebooks=0), "num_codebooks"),
                        (dict(sliding_window=0), "sliding_window"), (dict(hidden_act="tanh"), "hidden_act"),
                        (dict(rms_norm_eps=0), "rms_norm_eps"), (dict(num_key_value_heads=3), "num_key_value_heads")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            MoshiConfig(**{**small, **change})
