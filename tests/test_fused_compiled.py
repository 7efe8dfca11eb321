"""The one-token step compiled ahead of time (fused.precompile, kernels.aot): the eager step's tokens and
logits on every kind of layer (sliding windows, q/k norms, biases, int8, int4), cached on disk and loaded
without compiling, and a compile that fails leaves the eager step."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_fused import greedy_steps, prompt, real_model_int4

import autolm
from autolm.kernels import aot


@pytest.fixture(scope="session")
def compiled_home(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled-home")


@pytest.fixture
def home(compiled_home, monkeypatch):
    monkeypatch.setenv("AUTOLM_HOME", str(compiled_home))
    return compiled_home


def compiled(model) -> bool:
    plan = model.model._fused[0]
    return plan is not None and plan.graphs is not None


@pytest.mark.parametrize(
    "name,dtype,quantization",
    [
        ("mistral_sliding", torch.float32, None),  # GQA, sliding windows of 5 and 6 slots
        ("qwen3", torch.float32, None),  # q/k norms
        ("qwen2_tied_bias", None, "int8"),  # q/k/v biases, tied head (int8)
        ("llama_gqa_llama3_sharded", None, "int4"),  # int4 parts too small to fuse: concatenated in the graph
    ],
)
def test_compiled_step_gives_the_eager_steps_tokens(checkpoint, home, name, dtype, quantization):
    """fp32: the forward's tokens and logits. bf16 and quantized: teacher-forced on the fp32 model's tokens,
    logits within bf16 rounding of the eager step's and no further from the fp32 model's."""
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization=quantization)
    truth_model = (
        model
        if dtype is torch.float32
        else autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    )
    fed, truth = greedy_steps(truth_model, prompt(), 24, fused=False)
    plain_tokens, plain = greedy_steps(model, prompt(), 24, fused=False)
    eager_tokens, eager = greedy_steps(model, prompt(), 24, fused=True, forced=None if dtype else fed)
    assert not compiled(model)  # nothing is compiled until asked
    assert model.precompile_decode()
    tokens, logits = greedy_steps(model, prompt(), 24, fused=True, forced=None if dtype else fed)
    assert compiled(model)
    if dtype is torch.float32:
        assert tokens == eager_tokens == plain_tokens
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    else:
        assert (logits - eager).abs().max() <= 0.03 * eager.abs().max()
        assert (logits - truth).abs().mean() <= 1.25 * (eager - truth).abs().mean()
        agree = [int((x.argmax(-1) == truth.argmax(-1)).sum()) for x in (eager, logits)]
        assert agree[1] >= agree[0] - 1, agree


def test_compiled_graphs_load_from_disk_without_compiling(checkpoint, home, monkeypatch):
    directory, _ = checkpoint("mistral_sliding")
    first = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert first.precompile_decode()
    packages = sorted(os.listdir(home / "compiled"))
    assert packages and all(p.endswith(".pt2") for p in packages)  # no temporary files left behind
    # a new process: nothing loaded yet, compiling is not allowed; precompile_decode finds the packages on disk
    monkeypatch.setattr(aot, "_LOADED", {})
    monkeypatch.setattr(aot, "compile_graph", lambda *a, **k: pytest.fail("compiled again"))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    greedy_steps(model, prompt(), 2, fused=True)
    assert not compiled(model)  # a model uses the compiled step once asked to, not because a package exists
    assert model.precompile_decode()
    tokens, _ = greedy_steps(model, prompt(), 8, fused=True)
    assert compiled(model)
    assert tokens == greedy_steps(model, prompt(), 8, fused=False)[0]
    assert sorted(os.listdir(home / "compiled")) == packages
    # a package that cannot be read is compiled again when asked, not trusted
    for p in packages:
        (home / "compiled" / p).write_bytes(b"not a package")
    monkeypatch.setattr(aot, "_LOADED", {})
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.model.compiled_decode = True  # look the packages up without compiling
    tokens, _ = greedy_steps(model, prompt(), 8, fused=True)
    assert not compiled(model) and tokens == greedy_steps(model, prompt(), 8, fused=False)[0]


def test_a_failed_compile_warns_and_keeps_the_eager_step(checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUTOLM_HOME", str(tmp_path))
    monkeypatch.setattr(aot, "_LOADED", {})
    monkeypatch.setattr(aot, "_api", lambda: None)  # a torch without AOTInductor, or no C++ compiler
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="autolm"):
        assert model.precompile_decode() is False
    assert "eager path runs instead" in caplog.text
    tokens, _logits = greedy_steps(model, prompt(), 6, fused=True)
    plain_tokens, _plain = greedy_steps(model, prompt(), 6, fused=False)
    assert tokens == plain_tokens and not compiled(model)
    assert not (tmp_path / "compiled").exists() or not os.listdir(tmp_path / "compiled")


def test_real_model_int4_compiled_is_as_close_to_fp32_as_the_forward(smol_gguf, home):
    """The CLI's default: SmolLM2's Q4_1 blocks as int4, int8 head, the compiled step. Teacher-forced on the
    float32 model's greedy tokens, its logits are as close to that model's as the general forward's."""
    ids, fed, truth, model = real_model_int4(smol_gguf)
    _, plain = greedy_steps(model, ids, 32, fused=False, forced=fed)
    assert model.precompile_decode()
    _, fast = greedy_steps(model, ids, 32, fused=True, forced=fed)
    assert compiled(model)
    plain_err, fast_err = (plain - truth).abs().mean(), (fast - truth).abs().mean()
    assert fast_err <= 1.25 * plain_err, (fast_err, plain_err)
    agree = [int((x.argmax(-1) == truth.argmax(-1)).sum()) for x in (plain, fast)]
    assert agree[1] >= agree[0] - 2 and agree[1] >= 28, agree
