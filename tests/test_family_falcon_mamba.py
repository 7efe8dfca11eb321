"""Falcon-Mamba against transformers (its torch fallback): Mamba-1 mixers whose time step, B and C are RMS-normed
without weights (a mixer_rms_eps away from the default), an untied head and the
residual in float32. The battery for recurrent families, pieces through the cache against the whole, a long
generation equal to transformers', the CLI with a ChatML template (Falcon-Mamba-7B-instruct's is ChatML; the file
used is tests/data/chat_templates/qwen2-moe-chatml.jinja) and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family

import autolm

# peft has no default for falcon_mamba and refuses out_proj and conv1d; transformers bypasses an adapter on dt_proj
TARGETS = ["in_proj", "x_proj"]
FALCON = Family(
    "FalconMambaConfig",
    dict(
        hidden_size=64,
        num_hidden_layers=3,
        state_size=8,
        conv_kernel=4,
        expand=2,
        time_step_rank=6,
        tie_word_embeddings=False,
        mixer_rms_eps=1e-3,
    ),
    lora_targets=TARGETS,
)


def test_logits(tmp_path_factory):
    FALCON.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    FALCON.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    FALCON.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    FALCON.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the scan): transformers' tokens."""
    FALCON.check_long_generation(tmp_path_factory)


def test_pieces_equal_the_whole(tmp_path_factory, monkeypatch):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (scan blocks of 16 crossed) give the logits
    of one forward, and transformers'."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 16)
    directory, hf = FALCON.checkpoint(tmp_path_factory)
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


def test_norms_matter(tmp_path_factory):
    """The weightless norms of dt, B and C are applied: without them the logits differ from transformers'."""
    from autolm.nn.mamba1 import MambaMixer

    directory, hf = FALCON.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    for m in model.modules():
        if isinstance(m, MambaMixer):
            m.bcdt_norm = None
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-3)


def test_lora(tmp_path_factory, tmp_path):
    FALCON.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FALCON.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the saved files; only transformers' config keys saved."""
    from safetensors import safe_open

    FALCON.check_save(tmp_path_factory, tmp_path)
    directory, hf = FALCON.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys()) and "lm_head.weight" in set(ours.keys())
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["mixer_rms_eps"] == 1e-3


def test_disk_offload(tmp_path_factory, tmp_path):
    FALCON.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli(FALCON, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path,
              "FalconMambaForCausalLM (falcon_mamba)")  # fmt: skip


@pytest.mark.parametrize(
    "key, value",
    [("mixer_rms_eps", 0), ("mixer_rms_eps", "1e-6"), ("state_size", -2), ("use_conv_bias", None)],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.falcon_mamba import FalconMambaConfig

    with pytest.raises(autolm.ConfigError, match=key):
        FalconMambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, key: value})
