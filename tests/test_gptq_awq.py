"""GPTQ and AWQ checkpoints (quant_method "gptq" / "awq": TheBloke's and Qwen's -GPTQ-Int4 and -AWQ releases) load
dequantized. transformers needs gptqmodel to read them, which is not installable here, so the oracle is a transformers
model whose weights are set to the dequantized reference: AWQ files are packed by autoawq's own WQLinear_GEMM and
read back with its dequantize_gemm; GPTQ files are packed test-side following AutoGPTQ's pack loops exactly, and
checked against the integers the test packed."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import autolm
from autolm.sources import CheckpointSource
from autolm.sources.gptq import awq_parts, gptq_parts, unpack_bits


def _projections(tensors: dict) -> list[str]:
    """The decoder's linear layers (the quantizers leave the embeddings and lm_head as floats)."""
    return [n.removesuffix(".weight") for n in tensors if n.endswith("proj.weight") and tensors[n].dim() == 2]


def _write(src: str, dst: str, tensors: dict, quant: dict) -> None:
    shutil.copytree(src, dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quant
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def gptq_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool):
    """GPTQ's min-max quantizer per group of input columns (act-order: groups follow a permutation, as desc_act
    orders the columns): (int values (out, in), scales (groups, out) fp16, zeros (groups, out), g_idx (in,)).
    Zeros are at least 1: v1's stored `zero - 1` cannot hold zero 0 (AutoGPTQ's packing wraps it)."""
    cols = w.shape[1]
    size = cols if group_size == -1 else group_size
    perm = torch.randperm(cols) if act_order else torch.arange(cols)
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(cols) // size).to(torch.int32)
    maxq = 2**bits - 1
    scales, zeros = [], []
    for g in range(cols // size):
        x = w[:, g_idx == g]
        lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        scale = ((hi - lo) / maxq).clamp(min=1e-6).half()
        zero = (
            torch.full_like(lo, (maxq + 1) // 2) if sym else torch.round(-lo / scale.float()).clamp(1, maxq)
        )
        scales.append(scale)
        zeros.append(zero)
    scales, zeros = torch.stack(scales), torch.stack(zeros).to(torch.int32)
    g = g_idx.long()
    q = torch.clamp(torch.round(w / scales.float()[g].T) + zeros[g].T, 0, maxq).to(torch.int32)
    return q, scales, zeros, g_idx


def autogptq_pack(intweight: np.ndarray, zeros: np.ndarray, bits: int, v1: bool):
    """AutoGPTQ's QuantLinear.pack loops (qlinear_cuda_old), from the int values (in, out) and zeros (groups, out):
    qweight packed down the rows, qzeros along the columns, 3-bit values straddling words; v1 stores zero - 1."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    _pack_rows(qweight, lambda j: intweight[j], bits)
    zeros = (zeros - 1 if v1 else zeros).astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32).T.copy()
    _pack_rows(qzeros, lambda j: zeros[:, j], bits)  # the columns' loop, transposed
    return torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.T.astype(np.int32).copy())


def _pack_rows(out: np.ndarray, value, bits: int) -> None:
    i, row = 0, 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= value(j) << (bits * (j - i))
            i += 32 // bits
            row += 1
            continue
        for j in range(i, i + 10):
            out[row] |= value(j) << (3 * (j - i))
        i += 10
        out[row] |= value(i) << 30
        row += 1
        out[row] |= (value(i) >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            out[row] |= value(j) << (3 * (j - i) + 1)
        i += 10
        out[row] |= value(i) << 31
        row += 1
        out[row] |= (value(i) >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            out[row] |= value(j) << (3 * (j - i) + 2)
        i += 10
        row += 1


def to_gptq(
    src, dst, bits: int, group_size: int, sym=True, act_order=False, fmt="gptq", g_idx=True, bias=False
):
    """A copy of checkpoint `src` with its projections GPTQ-packed (`g_idx` stored or, in order, left out; `bias`:
    all zeros for every projection, as older AutoGPTQ files hold for models without biases); the dequantized
    weights it stands for."""
    tensors, want = load_file(os.path.join(src, "model.safetensors")), {}
    for m in _projections(tensors):
        q, scales, zeros, groups = gptq_quantize(tensors[m + ".weight"], bits, group_size, sym, act_order)
        qweight, qzeros = autogptq_pack(q.T.numpy(), zeros.numpy(), bits, fmt == "gptq")
        g = groups.long()
        want[m + ".weight"] = (q - zeros[g].T).float() * scales.float()[g].T
        del tensors[m + ".weight"]
        tensors |= {m + ".qweight": qweight, m + ".qzeros": qzeros, m + ".scales": scales}
        if g_idx:
            tensors[m + ".g_idx"] = groups
        if bias:
            tensors[m + ".bias"] = torch.zeros(scales.shape[1], dtype=torch.float16)
    quant = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
             "checkpoint_format": fmt}  # fmt: skip
    _write(src, dst, tensors, quant)
    return want


def to_awq(src: str, dst: str, group_size: int, quant: dict) -> dict:
    """A copy of checkpoint `src` with its projections quantized and packed by autoawq (its min-max zero-point
    quantizer, WQLinear_GEMM.from_linear); the weights awq's dequantize_gemm reads back."""
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.packing_utils import dequantize_gemm

    tensors, want = load_file(os.path.join(src, "model.safetensors")), {}
    setting = SimpleNamespace(group_size=group_size, zero_point=True, w_bit=4)
    for m in _projections(tensors):
        w = tensors.pop(m + ".weight")
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).half()
        linear.weight.data, scales, zeros = AwqQuantizer.pseudo_quantize_tensor(setting, w.half())
        packed = WQLinear_GEMM.from_linear(linear, 4, group_size, scales=scales.t().contiguous(),
                                           zeros=zeros.t().contiguous())  # fmt: skip
        qweight, qzeros, s = packed.qweight, packed.qzeros, packed.scales
        tensors |= {m + ".qweight": qweight, m + ".qzeros": qzeros, m + ".scales": s}
        want[m + ".weight"] = dequantize_gemm(qweight, qzeros, s.float(), 4, group_size).T
    _write(src, dst, tensors, {"quant_method": "awq", **quant})
    return want


def _check(src: str, directory, want: dict, tmp_path) -> None:
    """autolm's load holds `want` exactly, gives the logits of a transformers model holding it, and saves floats."""
    import transformers

    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref.load_state_dict(want, strict=False)
    theirs, ours = ref.state_dict(), model.state_dict()
    assert set(ours) == set(theirs) - {n for n in theirs if n.endswith("rotary_emb.inv_freq")}
    for n, t in ours.items():
        torch.testing.assert_close(t, theirs[n], rtol=0, atol=0, msg=n)
    shapes = CheckpointSource(str(directory)).shapes()
    assert {n: tuple(shapes[n]) for n in ours} == {n: tuple(t.shape) for n, t in ours.items()}
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(ours) and {t.dtype for t in saved.values()} == {torch.float32}
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


GPTQ = {
    "v1-4bit-sym": dict(bits=4, group_size=16, g_idx=False, bias=True),
    "v1-4bit-act-order-asym": dict(bits=4, group_size=32, sym=False, act_order=True),
    "v2-4bit-asym": dict(bits=4, group_size=16, sym=False, fmt="gptq_v2"),
    "v1-8bit-one-group": dict(bits=8, group_size=-1, sym=False, g_idx=False),
    "v1-3bit-asym": dict(bits=3, group_size=32, sym=False),
    "v2-2bit-act-order": dict(bits=2, group_size=16, act_order=True, fmt="gptq_v2"),
}


@pytest.mark.parametrize("case", sorted(GPTQ))
def test_gptq_checkpoint_loads_dequantized(checkpoint, tmp_path, case):
    src, _ = checkpoint("qwen3")
    want = to_gptq(src, str(tmp_path / "q"), **GPTQ[case])
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert {t.dtype for n, t in stored.items() if n.endswith("qweight")} == {torch.int32}
    _check(src, tmp_path / "q", want, tmp_path)


AWQ = {
    "gemm": (
        32,
        {"bits": 4, "group_size": 32, "zero_point": True, "version": "gemm", "modules_to_not_convert": None},
    ),
    "autoawq-fields": (16, {"w_bit": 4, "q_group_size": 16, "zero_point": True, "version": "GEMM"}),
}


@pytest.mark.parametrize("case", sorted(AWQ))
def test_awq_checkpoint_loads_as_autoawq_dequantizes_it(checkpoint, tmp_path, case):
    pytest.importorskip("awq")
    src, _ = checkpoint("qwen3")
    group_size, quant = AWQ[case]
    want = to_awq(src, str(tmp_path / "q"), group_size, quant)
    _check(src, tmp_path / "q", want, tmp_path)


def test_straddling_bits_read_as_one_stream():
    """Values wider than a word's remainder continue in the next word's lowest bits (GPTQ's 3-bit layout)."""
    values = torch.randint(0, 8, (5, 64))
    packed = np.zeros((6, 5), dtype=np.uint32)
    _pack_rows(packed, lambda j: values[:, j].numpy().astype(np.uint32), 3)
    torch.testing.assert_close(unpack_bits(torch.from_numpy(packed.T.astype(np.int32)), 3, 64), values)
    with pytest.raises(autolm.CheckpointError, match="fewer than 65"):
        unpack_bits(torch.from_numpy(packed.T.astype(np.int32)), 3, 65)


REFUSED = {
    "gptq bits": ({"quant_method": "gptq", "bits": 5, "group_size": 16}, "bits 5"),
    "gptq format": (
        {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
        "checkpoint_format 'marlin'",
    ),
    "gptq pack_dtype": ({"quant_method": "gptq", "bits": 4, "pack_dtype": "int16"}, "pack_dtype 'int16'"),
    "awq version": ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
    "awq bits": ({"quant_method": "awq", "w_bit": 8, "version": "gemm"}, "bits 8"),
    "awq zero_point": ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
}


def test_unreadable_layouts_are_refused_by_field(checkpoint, tmp_path):
    src, _ = checkpoint("qwen3")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for i, (quant, field) in enumerate(REFUSED.values()):
        _write(src, str(tmp_path / str(i)), tensors, quant)
        with pytest.raises(autolm.CheckpointError, match=field):
            autolm.AutoModelForCausalLM.from_pretrained(tmp_path / str(i))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_keeps_the_checkpoints_codes(checkpoint, tmp_path, method):
    """quantization="int4" on a 4-bit GPTQ (groups in order) or AWQ checkpoint: autolm's int4 layers in the
    checkpoint's groups hold its codes as stored (nothing quantized twice), its scales and zero points folded into
    (q - 8) * scale + zero within bf16's rounding; an act-order GPTQ file is dequantized and quantized again."""
    from autolm.kernels.quant import unpack_nibbles

    if method == "awq":
        pytest.importorskip("awq")
    src, _ = checkpoint("qwen3")
    if method == "gptq":
        want = to_gptq(src, str(tmp_path / "q"), bits=4, group_size=32, sym=False)
    else:
        want = to_awq(src, str(tmp_path / "q"), 32, {"bits": 4, "group_size": 32, "zero_point": True})
    from unittest import mock

    from autolm import quant

    with mock.patch.object(quant, "quantize_weight", wraps=quant.quantize_weight) as quantized:
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization="int4")
    assert {c.args[1] for c in quantized.call_args_list} == {"lm_head"}  # the projections came as codes
    assert model.config.quantization_config["group_size"] == 32
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    torch.testing.assert_close(layer.dequantize().float(), want[f"{name}.weight"], rtol=1e-2, atol=1e-3)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    parts = [stored[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales")]
    if method == "gptq":
        codes = gptq_parts(*parts, None, 4, 32, True, name)[0]
    else:
        codes = awq_parts(*parts, 4, 32, name)[0]
    assert torch.equal(unpack_nibbles(model.state_dict()[f"{name}.weight"]).long(), codes.T)
    if method == "gptq":  # act-order: quantized again in the layer's groups, still close
        to_gptq(src, str(tmp_path / "a"), bits=4, group_size=32, sym=False, act_order=True)
        again = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "a", quantization="int4")
        assert again.get_submodule(name).dequantize().shape == layer.dequantize().shape
