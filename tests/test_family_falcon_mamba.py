"""Falcon-Mamba against transformers (its torch fallback): Mamba-1 mixers whose time step, B and C are RMS-normed
without weights (a mixer_rms_eps away from the default), an untied head and the
residual in float32. The battery for recurrent families, pieces through the cache against the whole, a long
generation equal to transformers', the CLI with a ChatML template (Falcon-Mamba-7B-instruct's is ChatML; the file
used is tests/data/chat_templates/qwen2-moe-chatml.jinja), config errors, and GGUF in and out as llama.cpp's
MambaModel converter writes Falcon-Mamba ("mamba" with ssm.dt_b_c_rms true)."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

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
    FALCON.check_pieces(tmp_path_factory)


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


# ---- GGUF: llama.cpp's MambaModel converter (Falcon-Mamba as "mamba" with ssm.dt_b_c_rms), emulated -------------

# what llama.cpp's graph runs: the norms of dt, B and C at the layers' epsilon (mixer_rms_eps = layer_norm_epsilon)
GGUF_SIZES = dict(
    hidden_size=64, num_hidden_layers=3, state_size=8, conv_kernel=4, expand=2, time_step_rank=6
)
GGUF_UNTIED = Family(
    "FalconMambaConfig",
    dict(GGUF_SIZES, tie_word_embeddings=False, layer_norm_epsilon=1e-3, mixer_rms_eps=1e-3),
    lora_targets=TARGETS,
)
GGUF_TIED = Family(
    "FalconMambaConfig", dict(GGUF_SIZES, mixer_rms_eps=1e-5, residual_in_fp32=False), lora_targets=TARGETS
)
GGUF_FAMILIES = (GGUF_UNTIED, GGUF_TIED)  # for test_gguf_out
IDS = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", GGUF_FAMILIES, ids=["untied", "tied"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """The converter's file ("mamba", ssm.dt_b_c_rms true) loads as FalconMambaForCausalLM with transformers'
    logits; its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in their blocks, within their
    rounding."""
    from test_family_mamba import write_mamba_gguf

    _, hf = family.checkpoint(tmp_path_factory)
    write_mamba_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "FalconMambaForCausalLM"
    c = model.config
    assert c.mixer_rms_eps == c.rms_norm_eps == pytest.approx(hf.config.mixer_rms_eps)  # a float32 key
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings and c.time_step_rank == 6
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    write_mamba_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.backbone.layers[0].mixer.in_proj, "ggml_type")
    with torch.no_grad():
        got = kept(IDS).logits
    assert 0 < (got - want).norm() / want.norm() < 0.1  # Q8_0's rounding of these random weights


def test_gguf_out_writes_another_mixer_eps_with_a_warning(tmp_path_factory, tmp_path, byte_tokenizer, caplog):  # noqa: F811
    """llama.cpp norms dt, B and C at the layers' epsilon: a model with a mixer_rms_eps of its own (1e-3 against
    1e-5 here; 1e-6 against 1e-5 in transformers' defaults and falcon-mamba-7b) is written as llama.cpp's converter
    writes it, with a warning naming both epsilons; the file loads with llama.cpp's epsilon, and so does the
    converter's own file of the model."""
    from test_family_mamba import write_mamba_gguf

    from autolm.gguf_writer import save_gguf

    directory, hf = FALCON.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with caplog.at_level("WARNING", logger="autolm.gguf"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "ours.gguf"), "f32")
    assert (
        "no mixer_rms_eps: the file computes with 1e-05 where this 'falcon_mamba' model uses 0.001"
        in caplog.text
    )
    ours = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ours.gguf")
    assert ours.config.mixer_rms_eps == ours.config.rms_norm_eps == pytest.approx(1e-5)
    write_mamba_gguf(hf, str(tmp_path / "model.gguf"))
    loaded = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert loaded.config.mixer_rms_eps == loaded.config.rms_norm_eps == pytest.approx(1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, loaded(IDS).logits)
