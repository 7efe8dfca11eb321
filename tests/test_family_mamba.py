"""Mamba against transformers (its torch fallback): every layer a Mamba-1 mixer with in_proj/out_proj biases and a
conv bias, an explicit time_step_rank, the residual in float32 and a tied head; a second checkpoint without biases,
with the residual in the model's dtype and an untied head. The battery for recurrent families (no attention at all:
the cache holds only states), the blocked scan against the one-token recurrence, pieces through the cache against
the whole, a long generation equal to transformers', the CLI (Mamba ships no chat template) and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family

import autolm

SIZES = dict(hidden_size=64, num_hidden_layers=3, state_size=8, conv_kernel=4, expand=2)
# peft has no default for mamba, refuses out_proj and conv1d; transformers bypasses an adapter on dt_proj
TARGETS = ["in_proj", "x_proj"]
MAMBA = Family("MambaConfig", dict(SIZES, use_bias=True, time_step_rank=6), lora_targets=TARGETS)
PLAIN = Family(
    "MambaConfig",
    dict(SIZES, use_conv_bias=False, residual_in_fp32=False, tie_word_embeddings=False, conv_kernel=3),
)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MAMBA.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without use_bias: with it, padding's inputs are zeroed before in_proj, whose bias then reaches the
    convolution (as in transformers), so a left-padded row's state is not its unpadded one."""
    PLAIN.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the scan): transformers' tokens."""
    directory, hf = MAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=45, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=45, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pieces_equal_the_whole(tmp_path_factory, monkeypatch):
    """170 tokens in pieces of 5, 13, 1, 1, 130 and 20 through the cache (scan blocks of 64 crossed, single tokens
    between pieces) give the logits of one forward, and transformers'; the cache keeps only states."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 64)
    directory, hf = MAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 170), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        cache, parts, start = None, [], 0
        for n in (5, 13, 1, 1, 130, 20):
            out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + n
            parts.append(out.logits)
        theirs = hf(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, theirs, atol=1e-4, rtol=1e-4)
    conv, ssm = cache.states[0]
    assert conv.shape == (2, 128, 3) and ssm.shape == (2, 128, 8) and ssm.dtype == torch.float32
    assert all(k.shape[-1] == 0 for k in cache.keys)


def test_scan_is_the_recurrence(monkeypatch):
    """selective_scan from a given state over 23 tokens (blocks of 4) equals selective_step token by token."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    b, t, width, n = 2, 23, 6, 5
    x, dt = torch.randn(b, t, width, generator=g), torch.rand(b, t, width, generator=g)
    B, C = torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)
    A = -torch.rand(width, n, generator=g) - 0.5
    state = torch.randn(b, width, n, generator=g)
    y, final = mamba1.selective_scan(x, dt, A, B, C, state)
    ys = []
    for i in range(t):
        out, state = mamba1.selective_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state)
        ys.append(out)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(final, state, atol=1e-6, rtol=1e-6)


def test_lora(tmp_path_factory, tmp_path):
    MAMBA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MAMBA.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict and the saved files; only transformers' config keys saved."""
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
        assert "backbone.layers.0.mixer.A_log" in set(ours.keys())
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert (
        configs[1]["intermediate_size"] == 128
        and configs[1]["time_step_rank"] == configs[0]["time_step_rank"]
    )


def test_old_embedding_name(tmp_path_factory, tmp_path):
    """Checkpoints that name the embeddings `backbone.embedding` (as transformers' load hook reads) load."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    sd = load_file(old / "model.safetensors")
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(old)
    assert torch.equal(model.backbone.embeddings.weight, hf.backbone.embeddings.weight)


def test_disk_offload(tmp_path_factory, tmp_path):
    MAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(PLAIN, tmp_path_factory, tmp_path, "MambaForCausalLM (mamba)")


def test_config_reads_the_hub_file():
    """A released config.json (mamba-130m-hf's keys): intermediate_size and time_step_rank as written, no attention
    keys written back."""
    from autolm.models.mamba import MambaConfig

    d = dict(hidden_size=768, num_hidden_layers=24, intermediate_size=1536, time_step_rank=48, state_size=16,
             layer_norm_epsilon=1e-5, fused_add_norm=True, n_layer=24, rms_norm=True)  # fmt: skip
    c = MambaConfig.from_dict(d)
    assert c.intermediate_size == 1536 and c.time_step_rank == 48 and c.rms_norm_eps == 1e-5
    out = c.to_dict()
    assert out["fused_add_norm"] is True and "num_attention_heads" not in out and "rope_parameters" not in out
    assert MambaConfig(hidden_size=100).time_step_rank == 7


@pytest.mark.parametrize(
    "key, value",
    [
        ("state_size", 0),
        ("expand", 1.5),
        ("conv_kernel", "4"),
        ("time_step_rank", -1),
        ("use_bias", "no"),
        ("residual_in_fp32", 1),
        ("hidden_act", "relu6"),
        ("layer_norm_epsilon", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.mamba import MambaConfig

    with pytest.raises(autolm.ConfigError, match=key.replace("layer_norm_epsilon", "rms_norm_eps")):
        MambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, key: value})
