"""Falcon-H1 against transformers (its Mamba-2 torch fallback): attention and Mamba-2 in parallel in each of 3
layers, every multiplier away from 1 (embeddings, logits, keys, attention in/out, SSM in/out, the MLP's two, the
five of the µP vector), a mixer narrower than mamba_expand * hidden_size (mamba_d_ssm), 2 groups of B/C and chunks
of 8 tokens, biases on attention, MLP and out_proj; the gated RMSNorm of the mixer in both orders (mamba_rms_norm,
mamba_norm_before_gate) with a tied head; the battery for recurrent families, a long generation (the one-token
recurrence) equal to transformers', pieces through the cache across chunks, the CLI with Qwen 3's ChatML template
(Falcon-H1's own is not among tests/data/chat_templates) and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    mamba_d_ssm=96,
    mamba_n_heads=8,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_chunk_size=8,
)
MULTIPLIERS = dict(
    lm_head_multiplier=0.5,
    embedding_multiplier=2.0,
    mlp_multipliers=[1.5, 0.5],
    key_multiplier=0.8,
    attention_out_multiplier=0.7,
    attention_in_multiplier=1.2,
    ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.3],
    ssm_in_multiplier=1.1,
    ssm_out_multiplier=0.6,
)
H1 = Family(
    "FalconH1Config",
    dict(SIZES, **MULTIPLIERS, attention_bias=True, mlp_bias=True, projectors_bias=True),
    # peft has no default for falcon_h1: attention, the mixer's in_proj (peft refuses out_proj) and the MLP
    lora_targets=["q_proj", "v_proj", "in_proj", "gate_proj", "down_proj"],
)
# in_proj's bias at left padding enters the conv's window (in transformers too): not with the recurrent checks
NORMED = Family(
    "FalconH1Config",
    dict(
        SIZES,
        **MULTIPLIERS,
        mamba_rms_norm=True,
        mamba_norm_before_gate=True,
        mamba_proj_bias=True,
        tie_word_embeddings=True,
    ),
)
NORM_AFTER = Family(
    "FalconH1Config",
    dict(SIZES, **MULTIPLIERS, mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_d_ssm=None),
)
ALL = pytest.mark.parametrize("family", [H1, NORMED, NORM_AFTER], ids=["plain", "norm-before", "norm-after"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [H1, NORMED], ids=["plain", "normed"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    H1.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    H1.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill, 9 chunks in all):
    transformers' greedy tokens."""
    directory, hf = H1.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=45, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=45, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache give the logits of one forward, and
    transformers'; every layer keeps keys and values and a Mamba-2 state."""
    directory, hf = H1.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        cache, parts, start = None, [], 0
        for n in (5, 13, 1, 1, 30, 20):
            out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + n
            parts.append(out.logits)
        theirs = hf(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, theirs, atol=1e-4, rtol=1e-4)
    conv, ssm = cache.states[2]
    assert (
        conv.shape == (2, 96 + 2 * 2 * 16, 3) and ssm.shape == (2, 8, 12, 16) and ssm.dtype == torch.float32
    )
    assert set(cache.states) == {0, 1, 2} and cache.layers[2].keys.shape == (2, 2, 70, 16)


def test_lora(tmp_path_factory, tmp_path):
    H1.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    H1.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict and the files; only transformers' config keys saved."""
    from safetensors import safe_open

    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["time_step_limit"] == configs[0]["time_step_limit"]
    assert configs[1]["mamba_d_head"] == configs[0]["mamba_d_head"]


def test_disk_offload(tmp_path_factory, tmp_path):
    H1.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(H1.config_cls, dict(H1.kwargs, max_position_embeddings=2048))  # a long system turn
    check_cli(long, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "FalconH1ForCausalLM (falcon_h1)")


@pytest.mark.parametrize(
    "key, value",
    [
        ("mamba_d_head", 7),
        ("mamba_n_groups", 3),
        ("mamba_chunk_size", 0),
        ("time_step_limit", [0.1]),
        ("mlp_multipliers", [1.0]),
        ("ssm_multipliers", [1, 1, 1, 1, "x"]),
        ("key_multiplier", None),
        ("mamba_rms_norm", "yes"),
        ("projectors_bias", 1),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.falcon_h1 import FalconH1Config

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, mamba_n_heads=8,
                mamba_d_ssm=96)  # fmt: skip
    with pytest.raises(autolm.ConfigError, match=key):
        FalconH1Config.from_dict({**base, key: value})
