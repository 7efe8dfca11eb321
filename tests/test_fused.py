"""The fused one-token step (autolm/models/fused.py) against the general forward: the same tokens and logits
on every model family, dtype and quantization, and invisible to everything else (state dicts, saving,
LoRA, hooks, replaced weights)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import SPECS, VOCAB

import autolm
from autolm.models import llama as llama_module


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the one-token steps the fused path took (it returns None where it stands aside)."""
    calls = []
    real = llama_module.decode_token

    def counted(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(llama_module, "decode_token", counted)
    return calls


def greedy_steps(model, ids, n, fused, forced=None):
    """n greedy tokens, one forward per token; `forced` feeds these tokens instead (teacher forcing).
    Returns (the tokens fed, logits (n, vocab))."""
    model.model.fused_decode = fused
    fed, logits = [], []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(n):
            if forced is not None:
                tok = torch.tensor([[forced[i]]])
            fed.append(int(tok))
            out = model(tok, past_key_values=cache)
            logits.append(out.logits[0, -1].float())
            tok = out.logits[:, -1:].argmax(-1)
    model.model.fused_decode = True
    return fed, torch.stack(logits)


def prompt(n=7, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fp32_fused_step_gives_the_forwards_tokens_and_logits(checkpoint, fused_calls, name):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    plain_tokens, plain = greedy_steps(model, prompt(), 24, fused=False)
    assert not fused_calls
    tokens, logits = greedy_steps(model, prompt(), 24, fused=True)
    assert len(fused_calls) == 24 and all(fused_calls)  # sliding windows (5, 6) included
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
def test_bf16_and_quantized_fused_step_stays_within_rounding(
    checkpoint, fused_calls, name, dtype, quantization
):
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization=quantization)
    plain_tokens, plain = greedy_steps(model, prompt(), 16, fused=False)
    _, logits = greedy_steps(model, prompt(), 16, fused=True, forced=plain_tokens)
    assert fused_calls and all(fused_calls)
    # attention in fp32 instead of bf16: differences of bf16's rounding, relative to the logits' size
    assert (logits - plain).abs().max() <= 0.03 * plain.abs().max()


def real_model_int4(smol_gguf):
    """(prompt ids, the float32 SmolLM2's 32 greedy tokens and logits, SmolLM2 loaded as int4 from its GGUF)."""
    directory, name = smol_gguf
    tok = autolm.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ids = torch.tensor([tok.encode("The history of the Roman empire is long. It began when")])
    reference = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    fed, truth = greedy_steps(reference, ids, 32, fused=False)
    return (
        ids,
        fed,
        truth,
        autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, quantization="int4"),
    )


def test_real_model_int4_from_gguf_blocks(smol_gguf, fused_calls):
    """The default CPU set-up: SmolLM2's Q4_1 blocks loaded as they are, int8 head, fused step. Against the
    float32 model's logits (on its own greedy tokens), the fused step is as close as the general forward:
    both round activations to bf16, in different places."""
    from autolm.quant import Int4Linear, Int8Linear

    ids, fed, truth, model = real_model_int4(smol_gguf)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)
    fused_calls.clear()
    _, plain = greedy_steps(model, ids, 32, fused=False, forced=fed)
    _, fused = greedy_steps(model, ids, 32, fused=True, forced=fed)
    assert len(fused_calls) == 32 and all(fused_calls)
    plain_err, fused_err = (plain - truth).abs().mean(), (fused - truth).abs().mean()
    assert fused_err <= 1.5 * plain_err, (fused_err, plain_err)
    agree = [int((x.argmax(-1) == truth.argmax(-1)).sum()) for x in (plain, fused)]
    assert agree[1] >= agree[0] - 2 and agree[1] >= 28, agree


def test_fused_step_is_invisible(checkpoint, fused_calls, tmp_path):
    """Fusing makes q/k/v and gate/up views of fused tensors: names, values, saving and loading do not change."""
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    greedy_steps(model, prompt(), 4, fused=True)
    assert fused_calls and all(fused_calls)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # an optimizer's references stay valid
    model.save_pretrained(tmp_path / "saved")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert all(torch.equal(back.state_dict()[k], before[k]) for k in before)
    # copies and pickles carry nothing of the plan: a copied cache stays the size of its buffers, the model
    # pickles (the plan's closures are left out) and a copy rebuilds its own plan
    with torch.no_grad():
        cache = model(prompt(), use_cache=True).past_key_values
        model(torch.tensor([[5]]), past_key_values=cache)
    kv_bytes = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert cache.fused is not None and len(pickle.dumps(copy.deepcopy(cache))) < kv_bytes + 10_000
    torch.save(model, io.BytesIO())
    twin = copy.deepcopy(model)
    (a, logits_a), (b, logits_b) = (
        greedy_steps(twin, prompt(), 4, fused=True),
        greedy_steps(model, prompt(), 4, fused=True),
    )
    assert a == b and torch.equal(logits_a, logits_b)
    # an in-place change to a module's weight reaches the fused matmul
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    _plain_tokens, plain = greedy_steps(model, prompt(), 6, fused=False)
    _tokens, logits = greedy_steps(model, prompt(), 6, fused=True)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


def test_replaced_weights_lora_and_hooks_are_seen(checkpoint, fused_calls):
    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    greedy_steps(model, prompt(), 3, fused=True)  # builds the plan
    # a weight replaced outright (not in place): the plan is rebuilt from the new tensors
    layer = model.model.layers[1]
    new = {"weight": torch.randn_like(layer.mlp.up_proj.weight)}
    layer.mlp.up_proj.load_state_dict(new, assign=True)
    _, plain = greedy_steps(model, prompt(), 6, fused=False)
    _, logits = greedy_steps(model, prompt(), 6, fused=True)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    # LoRA wraps q_proj / v_proj / o_proj: the step calls the wrapped modules
    peft = autolm.get_peft_model(model, autolm.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    base = peft.get_base_model()
    fused_calls.clear()
    _plain_tokens, plain = greedy_steps(base, prompt(), 6, fused=False)
    _, logits = greedy_steps(base, prompt(), 6, fused=True)
    assert fused_calls and all(fused_calls)
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    # a forward hook: the step stands aside so that the hook runs
    seen = []
    handle = base.model.layers[0].mlp.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    fused_calls.clear()
    greedy_steps(base, prompt(), 3, fused=True)
    handle.remove()
    assert not any(fused_calls) and len(seen) == 4  # the prompt and three one-token steps


def test_fusing_under_inference_mode_leaves_weights_that_train(checkpoint):
    """generate runs under inference_mode; the fused weights the modules then view must still take part in
    autograd (fine-tuning after generating)."""
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.inference_mode():
        model.generate(prompt(), max_new_tokens=3, do_sample=False)
    assert model.model._fused[0] is not None
    assert not model.model.layers[0].self_attn.q_proj.weight.is_inference()
    peft = autolm.get_peft_model(model, autolm.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    peft.train()
    peft(prompt(), labels=prompt()).loss.backward()
    assert all(p.grad is not None for n, p in peft.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_fusing_again_copies_nothing(checkpoint, quantization):
    """A plan rebuilt (e.g. by precompile_decode after eager decoding) finds q/k already views of one fused
    tensor and reuses it: no second copy of the weights, and the modules keep viewing what the plan reads."""
    from autolm.models.layers import fuse_linears

    directory, _ = checkpoint("qwen3")
    model = autolm.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, quantization=quantization
    )
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj]  # (int4's packed layout fuses whole blocks of 64 rows: q has 64)
    first = fuse_linears(parts)
    tensors = [n for n, t in first.state_dict().items() if t.numel()]
    ptrs = [getattr(first, n).data_ptr() for n in tensors]
    again = fuse_linears(parts)
    assert [getattr(again, n).data_ptr() for n in tensors] == ptrs
    assert all(torch.equal(getattr(again, n), getattr(first, n)) for n in tensors)
    assert attn.q_proj.weight.data_ptr() == ptrs[tensors.index("weight")]
