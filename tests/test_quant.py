"""Weight-only int8 / int4: kernels against their own dequantized weights, perplexity, save/load round trips."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch, positions

import autolm
from autolm.errors import ConfigError
from autolm.quant import Int4Linear, Int8Linear, QuantConfig, quantize

TEXT = os.path.join(os.path.dirname(__file__), "data", "english.txt")


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_dequantized_weights(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    lin = torch.nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = torch.nn.Sequential()
    model.add_module("l", lin)
    q = (
        Int8Linear(128, 96, True, torch.float32)
        if bits == 8
        else Int4Linear(128, 96, True, torch.float32, 32)
    )
    parts = Int8Linear.quantize(w, torch.float32) if bits == 8 else Int4Linear.quantize(w, 32)
    q.load_state_dict({**parts, "bias": lin.bias.detach()})
    deq = q.dequantize()
    # Quantization error is bounded by half a step of each row / group.
    step = (w.amax(1) - w.amin(1)) / 254 if bits == 8 else None
    if bits == 8:
        assert ((deq - w).abs() <= step[:, None] / 2 + 1e-6).all()
    else:
        assert (deq - w).abs().max() < 0.05 * w.abs().max()
    x = torch.randn(3, 5, 128, generator=g)
    ref = torch.nn.functional.linear(x, deq, lin.bias.detach())
    torch.testing.assert_close(q(x), ref, atol=0.03, rtol=0.02)  # the kernels take bf16 activations
    # The portable on-disk form survives the kernel's packed layout.
    again = type(q)(*(128, 96, True, torch.float32) if bits == 8 else (128, 96, True, torch.float32, 32))
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.dequantize(), deq)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("inputs", [8, 24, 40])
def test_int8_inputs_the_kernel_does_not_take_are_computed_dequantized(inputs):
    """PyTorch's int8 CPU kernel reads its inputs in blocks of 16: other widths gave inf or crashed the process
    (an expert width of 24); they take the dequantized weight."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, inputs, generator=g) * 0.05
    q = Int8Linear(inputs, 64, False, torch.float32)
    q.load_state_dict(Int8Linear.quantize(w, torch.float32))
    x = torch.randn(11, inputs, generator=g)
    torch.testing.assert_close(q(x), x @ q.dequantize().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [16, 48, 80, 4160, 4176, 4208])
@pytest.mark.parametrize("kernel_packs", [False, True], ids=["bytes", "kernel"])
def test_int4_packing_equals_the_kernels_packing_of_the_whole(rows, kernel_packs, monkeypatch):
    """kernels.int4_pack writes the kernel's layout with byte operations (or has the kernel pack, where the
    layout is not the one it recognizes), some rows at a time (bounded temporaries): the same bytes as the
    kernel's own packing of the whole matrix, whole blocks of rows and a last partial one alike; int4_unpack
    reads them back (by byte operations, or with the kernel)."""
    from autolm.kernels import quant

    if quant.INT4_PACK.get() is None:
        pytest.skip("no CPU int4 kernel in this torch")
    assert quant._int4_layout() is not None  # x86 and ARM builds: the byte operations pack
    if kernel_packs:
        monkeypatch.setattr(quant, "_int4_layout", lambda: None)
    q = torch.randint(0, 16, (rows, 576), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = quant.int4_pack(quant.pack_nibbles(q))  # 4160 rows: parts of 1792 (or 448), and a rest
    assert torch.equal(packed, quant.INT4_PACK.call(q.to(torch.int32), 1))
    sz = torch.zeros(576 // 32, rows, 2, dtype=quant.COMPUTE)  # (the kernel's way back reads them)
    assert torch.equal(quant.int4_unpack(packed, 32, 576, sz), q)  # and back


def _perplexity(model, ids):
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


def test_perplexity_of_smollm2_rises_little(smol_dir):
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)
    ids = tok(open(TEXT).read(), return_tensors="pt")["input_ids"][:, :1024]  # int8 / int4: 0.997x / 1.003x
    assert ids.shape[1] == 1024
    base = _perplexity(autolm.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32), ids)
    int8 = _perplexity(autolm.AutoModelForCausalLM.from_pretrained(smol_dir, quantization="int8"), ids)
    int4 = _perplexity(autolm.AutoModelForCausalLM.from_pretrained(smol_dir, quantization="int4"), ids)
    assert base < 30
    assert int8 <= base * 1.01, (base, int8)
    assert int4 <= base * 1.05, (base, int4)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("llama_gqa_llama3_sharded", "int8"),
        ("llama_gqa_llama3_sharded", "int4"),
        ("qwen3", "int4"),
        ("llama_gqa_llama3_sharded", QuantConfig(bits=4, group_size=32, lm_head=True)),
        ("qwen2_tied_bias", QuantConfig(bits=8, lm_head=True)),  # a quantized copy of the tied embeddings
    ],
)
def test_saved_quantized_model_loads_with_identical_logits(checkpoint, tmp_path, name, cfg):
    directory, ref = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=cfg)
    qcfg = QuantConfig.parse(cfg)
    kinds = {type(m) for m in model.modules()}
    assert (Int8Linear if qcfg.bits == 8 else Int4Linear) in kinds
    assert isinstance(model.lm_head, torch.nn.Linear) != qcfg.lm_head
    ids, mask = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        want = ref(ids, attention_mask=mask, position_ids=positions(mask)).logits
    # close to the float model on real tokens (tiny random models are harsh on int4), and the same once saved
    real = mask.bool()
    err = (out.float() - want)[real].abs().mean() / want[real].abs().mean()
    assert err < (0.05 if qcfg.bits == 8 else 0.3), err
    model.save_pretrained(tmp_path / "q", max_shard_size="30KB")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"] == qcfg.to_dict()
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        again = back(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert torch.equal(out, again)
    with pytest.raises(ConfigError, match="already quantized"):
        autolm.AutoModelForCausalLM.from_pretrained(
            tmp_path / "q", quantization=QuantConfig(bits=8, group_size=64)
        )


def test_quantize_a_loaded_model_equals_quantizing_while_loading(checkpoint):
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    streamed = autolm.AutoModelForCausalLM.from_pretrained(
        directory, quantization="int4", dtype=torch.float32
    )
    later = quantize(autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), "int4")
    ids = padded_batch()[0]
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, later(ids).logits)
    with pytest.raises(ConfigError, match="bits must be 8 or 4"):
        QuantConfig(bits=3)


def test_quantized_greedy_generation_on_smollm2_answers(smol_dir):
    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir, quantization="int4")
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Name the capital of France."}],  # a clear first token (see test_cli)
        add_generation_prompt=True,
        tokenize=False,
    )
    text = autolm.generate_text(model, tok, prompt, max_new_tokens=12)
    assert "Paris" in text
