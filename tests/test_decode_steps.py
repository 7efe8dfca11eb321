"""The eager one-token decode step (autolm.step.OneTokenStep: the model's own layers under a OneToken context)
against the general forward: the same tokens and logits on every model family, dtype and quantization, and
invisible to everything else (state dicts, saving, LoRA, hooks, replaced weights, training afterwards)."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, VOCAB, padded_batch

import autolm
from autolm import step as step_module


@pytest.fixture
def one_token_calls(monkeypatch):
    """Counts the one-token steps generation took."""
    calls = []
    real = step_module.OneTokenStep.__call__

    def counted(self, *args):
        calls.append(self.plan is not None)
        return real(self, *args)

    monkeypatch.setattr(step_module.OneTokenStep, "__call__", counted)
    return calls


def greedy_steps(model, ids, n, mode, forced=None):
    """n greedy tokens with the model's decode_mode set to `mode` ("forward": the general forward every token;
    "eager": the eager one-token step; "auto": compiled graphs where cached); `forced` feeds these tokens
    instead (teacher forcing). Returns (the tokens fed, logits (n, vocab))."""
    model.decode_mode = mode
    fed, logits = [], []
    with torch.inference_mode():
        cache = model.make_cache(1, ids.shape[1] + n + 1)
        out = model(ids, past_key_values=cache)
        decode = step_module.decoder(model, cache, torch.ones_like(ids))
        tok = out.logits[:, -1:].argmax(-1)
        mask = torch.ones_like(ids)
        for i in range(n):
            if forced is not None:
                tok = torch.tensor([[forced[i]]])
            fed.append(int(tok))
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            row = decode(tok, mask, torch.tensor([[cache.length]]), cache)
            logits.append(row[0].float())
            tok = row.argmax(-1)[:, None]
    model.decode_mode = "auto"
    return fed, torch.stack(logits)


def prompt(n=7, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fp32_one_token_step_gives_the_forwards_tokens_and_logits(checkpoint, one_token_calls, name):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    plain_tokens, plain = greedy_steps(model, prompt(), 24, "forward")
    assert not one_token_calls
    tokens, logits = greedy_steps(model, prompt(), 24, "eager")
    # sliding windows (5, 6) and recurrent layers included; a family without the step (Unlimited-OCR's reference
    # window) decodes every token with the forward
    assert len(one_token_calls) == (24 if getattr(model, "one_token_step", True) else 0)
    assert tokens == plain_tokens
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name,dtype,quantization",
    [
        ("llama_bf16", torch.bfloat16, None),
        ("qwen3", torch.bfloat16, None),
        ("llama_gqa_llama3_sharded", None, "int8"),
        ("llama_gqa_llama3_sharded", None, "int4"),
        ("qwen2_tied_bias", None, "int8"),
    ],
)
def test_bf16_and_quantized_one_token_step_stays_within_rounding(
    checkpoint, one_token_calls, name, dtype, quantization
):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization=quantization)
    plain_tokens, plain = greedy_steps(model, prompt(), 16, "forward")
    _, logits = greedy_steps(model, prompt(), 16, "eager", forced=plain_tokens)
    assert one_token_calls
    # attention in fp32 instead of bf16: differences of bf16's rounding, relative to the logits' size
    assert (logits - plain).abs().max() <= 0.03 * plain.abs().max()


def real_model_int4(smol_gguf):
    """(prompt ids, the float32 SmolLM2's 32 greedy tokens and logits, SmolLM2 loaded as int4 from its GGUF)."""
    directory, name = smol_gguf
    tok = autolm.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ids = torch.tensor([tok.encode("The history of the Roman empire is long. It began when")])
    reference = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    fed, truth = greedy_steps(reference, ids, 32, "forward")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, quantization="int4")
    return ids, fed, truth, model


def test_real_model_int4_from_gguf_blocks(smol_gguf, one_token_calls):
    """The default CPU set-up: SmolLM2's Q4_1 blocks loaded as they are, int8 head, the one-token step. Against
    the float32 model's logits (on its own greedy tokens), the step is as close as the general forward: both
    round activations to bf16, in different places."""
    from autolm.quant import Int4Linear, Int8Linear

    ids, fed, truth, model = real_model_int4(smol_gguf)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)
    one_token_calls.clear()
    _, plain = greedy_steps(model, ids, 32, "forward", forced=fed)
    _, fast = greedy_steps(model, ids, 32, "eager", forced=fed)
    assert len(one_token_calls) == 32
    plain_err, fast_err = (plain - truth).abs().mean(), (fast - truth).abs().mean()
    assert fast_err <= 1.5 * plain_err, (fast_err, plain_err)
    agree = [int((x.argmax(-1) == truth.argmax(-1)).sum()) for x in (plain, fast)]
    assert agree[1] >= agree[0] - 2 and agree[1] >= 28, agree


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_fused_projections_are_invisible(checkpoint, quantization, tmp_path):
    """nn.fuse lays q/k/v and gate/up out as views of one tensor each (one matmul in the step): names, values,
    parameter objects and saved files do not change, fusing twice copies nothing, in-place changes reach the
    fused matmul, and generating under inference_mode leaves weights that still train."""
    from autolm.nn import fuse

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, quantization=quantization
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    _, plain = greedy_steps(model, prompt(), 6, "forward")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.inference_mode():
        fused = [fuse([attn.q_proj, attn.k_proj, attn.v_proj]), fuse([mlp.gate_proj, mlp.up_proj])]
    assert any(fused) or quantization == "int4"  # int4 parts of 96 rows cannot share 64-row kernel blocks
    ptr = attn.q_proj.weight.data_ptr()
    assert fuse([attn.q_proj, attn.k_proj, attn.v_proj]) == fused[0] and attn.q_proj.weight.data_ptr() == ptr
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # an optimizer's references stay valid
    _, logits = greedy_steps(model, prompt(), 6, "eager")
    torch.testing.assert_close(logits, plain, atol=3e-2 if quantization else 1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert all(torch.equal(back.state_dict()[k], before[k]) for k in before)
    if quantization is None:
        with torch.no_grad():  # an in-place change to a part reaches the fused matmul
            attn.k_proj.weight.mul_(1.5)
        _, plain = greedy_steps(model, prompt(), 6, "forward")
        _, logits = greedy_steps(model, prompt(), 6, "eager")
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
        assert not attn.q_proj.weight.is_inference()
        peft = autolm.get_peft_model(model, autolm.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
        peft.train()
        peft(prompt(), labels=prompt()).loss.backward()
        assert all(p.grad is not None for n, p in peft.named_parameters() if "lora_" in n)


def test_replaced_weights_lora_and_hooks_are_seen(checkpoint, one_token_calls):
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    layer = model.model.layers[1]
    layer.mlp.up_proj.load_state_dict({"weight": torch.randn_like(layer.mlp.up_proj.weight)}, assign=True)
    _, plain = greedy_steps(model, prompt(), 6, "forward")
    _, logits = greedy_steps(model, prompt(), 6, "eager")
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    # LoRA wraps q_proj / v_proj / o_proj: the step calls the wrapped modules
    peft = autolm.get_peft_model(model, autolm.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    base = peft.get_base_model()
    one_token_calls.clear()
    _, plain = greedy_steps(base, prompt(), 6, "forward")
    _, logits = greedy_steps(base, prompt(), 6, "eager")
    assert one_token_calls
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    # a forward hook runs at every step, the one-token step's included
    seen = []
    handle = base.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    greedy_steps(base, prompt(), 3, "eager")
    handle.remove()
    assert len(seen) == 4  # the prompt and three one-token steps


def test_generate_takes_the_one_token_step_for_one_row_and_left_padded_batches(checkpoint, one_token_calls):
    directory, hf = checkpoint("mistral_sliding")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = prompt(9)
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert len(one_token_calls) == 19
    assert torch.equal(out, hf.generate(ids, max_new_tokens=20, do_sample=False))
    # a left-padded batch: every row's real tokens end at the same slot, each row starts where its pads end
    one_token_calls.clear()
    ids, mask = padded_batch(seed=3, lengths=(11, 6, 2))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert len(one_token_calls) == 11
    assert torch.equal(out, hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    # padding on the right (holes in the cache): only the forward's masks keep it out
    one_token_calls.clear()
    right = torch.cat([ids[:, -2:], torch.zeros(3, 2, dtype=torch.long)], 1)
    right_mask = torch.tensor([[1, 1, 0, 0]] * 3)
    model.generate(right, attention_mask=right_mask, max_new_tokens=4, do_sample=False)
    assert not one_token_calls


@pytest.mark.parametrize("name", ["qwen2_sliding", "llama_gqa_llama3_sharded", "qwen3"])
def test_padded_batch_one_token_step_gives_the_forwards_logits(checkpoint, name):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids, mask = padded_batch(seed=1)
    outs = []
    for mode in ("forward", "eager"):
        model.decode_mode = mode
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True))  # fmt: skip
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[1].logits), torch.stack(outs[0].logits), atol=1e-4, rtol=1e-4)


# ---- the eager step's small ops in autolm's C++ kernel (kernels/cpu_ops.cpp) ----------------------------------


@pytest.fixture
def cpu_ops():
    from autolm.kernels import native

    if not native.available():
        pytest.skip("autolm's C++ kernels are not built on this machine (no AVX2 or no compiler)")
    return native


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "B, nh, n_kv, hd, first, span, softcap, sinks, starts",
    [
        (1, 9, 3, 64, 0, 37, None, False, None),  # SmolLM2's heads, one sequence
        (2, 8, 2, 128, 5, 40, 30.0, True, [0, 9]),  # a window, soft-capping, sinks, a left-padded row
        (3, 4, 4, 80, 0, 1, None, False, [0, 0, 0]),  # one slot, no grouping
        # many runs of slots merged: a long window, rows padded past a run's end, a head size of 64 + 16
        (2, 8, 2, 80, 7, 301, None, True, [0, 150]),
        (1, 6, 2, 36, 0, 70, 20.0, False, None),  # a head size the 8-wide loops do not take
    ],
)
def test_native_decode_attention_is_the_eager_arithmetic(
    cpu_ops, monkeypatch, dtype, B, nh, n_kv, hd, first, span, softcap, sinks, starts
):
    """The C++ one-token attention writes the new slot as the eager ops do and gives their output within float
    rounding (fp32 sums in another order), for every cache dtype and option."""
    import importlib

    attention_module = importlib.import_module(
        "autolm.kernels.attention"
    )  # the package shadows it with a function
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, 1, hd, generator=g).to(dtype) for h in (nh, n_kv, n_kv))
    cache = [torch.randn(B, n_kv, first + span + 3, hd, generator=g).to(dtype) for _ in range(2)]
    sink = torch.randn(nh, generator=g) if sinks else None
    rows = torch.tensor(starts) if starts is not None else None
    seen = first + span

    def run(native_on: bool):
        keys, values = (c.clone() for c in cache)
        monkeypatch.setattr(cpu_ops, "ready", lambda: native_on)
        out = attention_module.decode_attention(q, k, v, keys, values, seen, span, None, softcap, sink, rows)
        return out, keys, values

    calls = []
    real = cpu_ops.decode_attention
    monkeypatch.setattr(cpu_ops, "decode_attention", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        ours, keys, values = run(True)
        theirs, keys_ref, values_ref = run(False)
    assert calls == [1]  # the kernel ran once, for the first of the two
    assert ours.dtype == dtype and ours.shape == (B, 1, nh, hd)
    assert torch.equal(keys, keys_ref) and torch.equal(values, values_ref)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(ours.float(), theirs.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_rms_norm_is_f_rms_norm_in_fp32(cpu_ops, dtype):
    from autolm import kernels

    x = (torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.inference_mode():
        ours = cpu_ops.rms_norm(x, 1e-5)
        assert kernels.rms_norm(x, 1e-5).dtype == torch.float32
    torch.testing.assert_close(ours, torch.nn.functional.rms_norm(x.float(), (576,), None, 1e-5))
    assert ours.dtype == torch.float32


def test_the_eager_ops_never_build_the_kernels(tmp_path):
    """A plain model's eager step uses the C++ kernels only once they are built (the GGUF matmuls, the CLI's
    first run or precompile_decode() build them): its first generation never waits for a compiler."""
    import os
    import subprocess
    import sys

    code = "from autolm.kernels import native; print(native.ready())"
    env = dict(os.environ, AUTOLM_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, T, hd, rd", [(1, 9, 1, 64, 64), (2, 4, 7, 128, 64), (1, 3, 5, 80, 80)])
def test_native_rotary_is_apply_rotary_bit_for_bit(cpu_ops, monkeypatch, dtype, B, H, T, hd, rd):
    """RoPE in one C++ call rounds as PyTorch's six ops do (each product, then the sum, in x's dtype): equal bits,
    partial rotary and a transposed (B, H, T, hd) view included."""
    import importlib

    rope = importlib.import_module("autolm.nn.rope")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, H, hd, generator=g).to(dtype).transpose(1, 2)
    cos, sin = (torch.randn(B, 1, T, rd, generator=g).to(dtype) for _ in range(2))
    with torch.inference_mode():
        ours = rope.apply_rotary(x, cos, sin)
        monkeypatch.setattr(cpu_ops, "ready", lambda: False)
        theirs = rope.apply_rotary(x, cos, sin)
    assert torch.equal(ours, theirs) and torch.equal(cpu_ops.rotary(x, cos, sin), theirs)
