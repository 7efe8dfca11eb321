"""The one-token step compiled ahead of time (autolm.step.graphs, kernels.aot), derived from each model's own
layers: the eager step's tokens and logits (windows, biases, tied int8 head, int4), a family defined in a
single file gets it with no code of its own, packages are cached on disk and picked up by generate() without
ever compiling there, and a compile that fails leaves the eager step."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import padded_batch
from test_decode_steps import greedy_steps, prompt, real_model_int4

import autolm
from autolm import step as step_module
from autolm.kernels import aot
from autolm.models.base import CausalLM, DecoderModel
from autolm.models.llama import LlamaConfig
from autolm.nn import Attention, GatedMLP, RMSNorm


@pytest.fixture(scope="session")
def compiled_home(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled-home")


@pytest.fixture
def home(compiled_home, monkeypatch):
    monkeypatch.setenv("AUTOLM_HOME", str(compiled_home))
    monkeypatch.delenv("AUTOLM_EAGER", raising=False)
    return compiled_home


def compiled(model) -> bool:
    cached = step_module._PLANS.get(model)
    return cached is not None and cached[1] is not None


def assert_subnormals_kept():
    """Loading compiled graphs leaves the process's floating point as it was: a library built with gcc's
    -ffast-math / -funsafe-math-optimizations links crtfastmath.o, which flushes subnormals to zero process-wide."""
    tiny = 2.2250738585072014e-308  # the smallest normal double
    assert tiny / 2 > 0, "subnormal doubles flushed to zero"
    assert torch.tensor([1e-40]).mul(1).item() > 0, "subnormal floats flushed to zero"


def check_against_eager(model, truth_model, n=24):
    """fp32: the forward's tokens and logits. bf16 and quantized: teacher-forced on the fp32 model's tokens,
    logits within bf16 rounding of the eager step's and no further from the fp32 model's."""
    fp32 = model is truth_model
    fed, truth = greedy_steps(truth_model, prompt(), n, "forward")
    eager_tokens, eager = greedy_steps(model, prompt(), n, "eager", forced=None if fp32 else fed)
    assert not compiled(model)  # nothing is compiled until asked
    assert model.precompile_decode()
    assert_subnormals_kept()
    tokens, logits = greedy_steps(model, prompt(), n, "auto", forced=None if fp32 else fed)
    assert compiled(model)
    if fp32:
        assert tokens == eager_tokens == fed
        torch.testing.assert_close(logits, truth, atol=1e-4, rtol=1e-4)
    else:
        assert (logits - eager).abs().max() <= 0.03 * eager.abs().max()
        assert (logits - truth).abs().mean() <= 1.25 * (eager - truth).abs().mean()


@pytest.mark.parametrize(
    "name,dtype,quantization",
    [
        ("mistral_sliding", torch.float32, None),  # GQA, sliding windows of 6 slots over 31
        ("qwen2_tied_bias", None, "int8"),  # q/k/v biases, tied head (int8)
    ],
)
def test_compiled_step_gives_the_eager_steps_tokens(checkpoint, home, name, dtype, quantization):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization=quantization)
    truth = model if dtype else autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    check_against_eager(model, truth)


def test_batched_graphs_give_the_forwards_tokens_for_a_padded_batch(checkpoint, home):
    """Rows of different lengths (left-padded, as generate() and the server lay them out) through the graphs
    compiled for 2 rows and more: the general forward's tokens and logits."""
    directory, hf = checkpoint("mistral_sliding")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids, mask = padded_batch(seed=2)
    model.decode_mode = "forward"
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)  # fmt: skip
    model.decode_mode = "auto"
    assert model.precompile_decode(batched=True)
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip
    assert step_module._BATCHED[model][1] is not None
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.equal(
        fast.sequences, hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    )
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(plain.logits), atol=1e-4, rtol=1e-4)


# ---- a family defined in this file alone: Gemma-style norms, a GeLU MLP, q/k norms, an embedding scale -------


@dataclass(repr=False)
class VariantConfig(LlamaConfig):
    model_type: ClassVar[str] = "test_variant"
    activations: ClassVar[tuple[str, ...]] = ("gelu_pytorch_tanh",)
    hidden_act: str = "gelu_pytorch_tanh"


class VariantLayer(torch.nn.Module):
    def __init__(self, config, i):
        super().__init__()
        h = config.hidden_size

        def norm(dim):
            return RMSNorm(dim, config.rms_norm_eps, offset=1.0)

        heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.self_attn = Attention(h, *heads, i, qk_norm="head", norm=norm, window=5 if i % 2 else None)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_act)
        self.input_layernorm, self.post_attention_layernorm = norm(h), norm(h)

    def forward(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class VariantModel(DecoderModel):
    def __init__(self, config):
        super().__init__(config, VariantLayer, RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0))

    def scale_inputs(self, x, position_ids):
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)


class VariantForCausalLM(CausalLM):
    config_class = VariantConfig

    def __init__(self, config):
        super().__init__(config, VariantModel(config))

    def finish_logits(self, logits):
        return torch.tanh(logits / 30.0) * 30.0


def test_a_family_from_one_file_gets_both_fast_steps(home, tmp_path, private_registry):
    autolm.register("test_variant", VariantConfig, VariantForCausalLM)
    config = VariantConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = autolm.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "variant")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "variant", dtype=torch.float32)
    assert type(model) is VariantForCausalLM
    check_against_eager(model, model)  # the eager one-token step, then the compiled one, against the forward


def test_generate_picks_up_cached_graphs_and_never_compiles(checkpoint, home, monkeypatch):
    """The packages compiled above, found by a new process's generate() with no call to precompile_decode; a
    model they do not fit runs the eager step without compiling; a package that cannot be read is not trusted."""
    directory, hf = checkpoint("mistral_sliding")
    monkeypatch.setattr(aot, "_LOADED", {})  # a new process: nothing loaded yet
    monkeypatch.setattr(aot, "compile_graph", lambda *a, **k: pytest.fail("generate() compiled"))
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = prompt(9)
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert compiled(model)
    assert torch.equal(out, hf.generate(ids, max_new_tokens=16, do_sample=False))
    other = autolm.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16
    )  # no package for bf16
    other.generate(ids, max_new_tokens=4, do_sample=False)
    assert not compiled(other)
    packages = os.listdir(home / "compiled")
    assert packages and all(p.endswith(".pt2") for p in packages)  # no temporary files left behind
    monkeypatch.setattr(aot, "_LOADED", {})
    for p in packages:
        (home / "compiled" / p).write_bytes(b"not a package")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    again = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert not compiled(model) and torch.equal(again, out)


def test_a_failed_compile_warns_and_keeps_the_eager_step(checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUTOLM_HOME", str(tmp_path))
    monkeypatch.setattr(aot, "_LOADED", {})
    monkeypatch.setattr(aot, "_api", lambda: None)  # a torch without AOTInductor, or no C++ compiler
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="autolm"):
        assert model.precompile_decode() is False
    assert "eager path runs instead" in caplog.text
    tokens, _ = greedy_steps(model, prompt(), 6, "auto")
    assert tokens == greedy_steps(model, prompt(), 6, "forward")[0] and not compiled(model)
    assert not (tmp_path / "compiled").exists() or not os.listdir(tmp_path / "compiled")


def test_real_model_int4_compiled_is_as_close_to_fp32_as_the_forward(smol_gguf, home):
    """The CLI's default: SmolLM2's Q4_1 blocks as int4, int8 head, the compiled step. Teacher-forced on the
    float32 model's greedy tokens, its logits are as close to that model's as the general forward's."""
    ids, fed, truth, model = real_model_int4(smol_gguf)
    _, plain = greedy_steps(model, ids, 32, "forward", forced=fed)
    assert model.precompile_decode()
    _, fast = greedy_steps(model, ids, 32, "auto", forced=fed)
    assert compiled(model)
    plain_err, fast_err = (plain - truth).abs().mean(), (fast - truth).abs().mean()
    assert fast_err <= 1.25 * plain_err, (fast_err, plain_err)
    agree = [int((x.argmax(-1) == truth.argmax(-1)).sum()) for x in (plain, fast)]
    assert agree[1] >= agree[0] - 2 and agree[1] >= 28, agree


@pytest.mark.parametrize("edited", ["ggml_mm.cpp", "ggml_avx2.h"])
def test_the_graphs_key_covers_the_cpp_kernels_sources(edited, monkeypatch):
    """The graphs call torch.ops.autolm.ggml_mm: an edit of its C++ source or a header compiles new graphs, as an
    edit of the Python code does."""
    from autolm.models.llama import LlamaForCausalLM
    from autolm.step import graphs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    monkeypatch.setattr(graphs, "_CODE", {})
    before = graphs.code_hash(model)

    def open_edited(path, mode="r"):
        with open(path, mode) as f:
            data = f.read()
        return io.BytesIO(data + b"// edited\n" if os.path.basename(path) == edited else data)

    monkeypatch.setattr(graphs, "_CODE", {})
    monkeypatch.setattr(graphs, "open", open_edited, raising=False)
    assert graphs.code_hash(model) != before
