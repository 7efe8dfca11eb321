"""Jamba against transformers (its Mamba torch fallback): four layers, Mamba (with experts), attention (dense MLP,
GQA, no position embedding), Mamba (with experts), Mamba (dense MLP); the Mamba layers' dt/B/C RMS norms with
weights, an explicit mamba_dt_rank, 4 experts of which each token uses 2 (not renormalised). The checkpoint holds
one tensor per expert, as transformers writes it. The battery for recurrent families, pieces through the cache
against the whole, a long generation equal to transformers', the CLI (Jamba-v0.1 ships no chat template) and
config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family

import autolm

JAMBA = Family(
    "JambaConfig",
    dict(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=4,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_dt_rank=6,
        max_position_embeddings=256,
    ),
    lora_targets=["q_proj", "v_proj", "in_proj", "x_proj", "out_proj", "gate_proj", "up_proj", "down_proj"],
)


def test_logits(tmp_path_factory):
    JAMBA.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    JAMBA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    JAMBA.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    JAMBA.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the scan): transformers' tokens."""
    JAMBA.check_long_generation(tmp_path_factory)


def test_pieces_equal_the_whole(tmp_path_factory, monkeypatch):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (scan blocks of 16 crossed) give the logits
    of one forward, and transformers'; attention layers keep keys, Mamba layers only states."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 16)
    directory, hf = JAMBA.checkpoint(tmp_path_factory)
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
    assert sorted(cache.states) == [0, 2, 3] and cache.keys[1].shape[1:] == (2, cache.capacity, 16)


def test_lora(tmp_path_factory, tmp_path):
    JAMBA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    JAMBA.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only transformers' config
    keys in the files autolm saves."""
    from safetensors import safe_open

    JAMBA.check_save(tmp_path_factory, tmp_path)
    directory, hf = JAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert {"model.layers.0.mamba.dt_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
                "model.layers.0.feed_forward.experts.3.up_proj.weight"} <= set(ours.keys())  # fmt: skip
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}


def test_disk_offload(tmp_path_factory, tmp_path):
    JAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(JAMBA, tmp_path_factory, tmp_path, "JambaForCausalLM (jamba)")


def test_layer_kinds():
    """Attention and experts where the periods and offsets say (transformers' defaults: attention every 8th layer
    from the 5th, experts every 2nd from the 2nd)."""
    from autolm.models.jamba import JambaConfig

    c = JambaConfig(num_hidden_layers=16)
    assert [i for i in range(16) if c.is_attention(i)] == [4, 12]
    assert [i for i in range(16) if c.has_experts(i)] == list(range(1, 16, 2))
    assert not JambaConfig(num_experts=1, num_experts_per_tok=1).has_experts(1)
    assert JambaConfig(hidden_size=100, num_attention_heads=4, num_key_value_heads=2).mamba_dt_rank == 7


@pytest.mark.parametrize(
    "key, value",
    [
        ("attn_layer_offset", 8),
        ("expert_layer_offset", -1),
        ("attn_layer_period", 0),
        ("mamba_d_state", 0),
        ("mamba_dt_rank", "big"),
        ("mamba_conv_bias", "yes"),
        ("num_experts_per_tok", 5),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.jamba import JambaConfig

    base = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_experts=4
    )
    with pytest.raises(autolm.ConfigError, match=key):
        JambaConfig.from_dict({**base, key: value})
