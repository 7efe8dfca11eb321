"""compressed-tensors checkpoints (llm-compressor's FP8-dynamic, W8A8, W4A16 releases) load dequantized, with the
weights and logits transformers gives with dequantize=True. The checkpoints are written by compressed-tensors
itself from a tiny transformers model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model
from safetensors.torch import load_file

import autolm

ct = pytest.importorskip("compressed_tensors")


def _calibrate(model) -> None:
    """Each quantized linear's weight scale (and zero point) from its own weight's range, as llm-compressor's
    min-max observer sets them."""
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        args, w = module.quantization_scheme.weights, module.weight.data
        if args.strategy == "channel":
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        elif args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif args.strategy == "group":
            g = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = g.amin(-1), g.amax(-1)
        else:
            bm, bn = args.block_structure
            g = w.reshape(w.shape[0] // bm, bm, w.shape[1] // bn, bn)
            lo, hi = g.amin((1, 3)), g.amax((1, 3))
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                module.weight_zero_point.shape
            )


def write_compressed(directory, weights: dict, fmt: str, activations: dict | None = None) -> None:
    """A tiny Qwen3 checkpoint quantized with `weights` (compressed-tensors' QuantizationArgs) and saved in `fmt`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    model = make_hf_model("qwen3")
    act = QuantizationArgs(**activations) if activations else None
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights), input_activations=act
    )
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"g": scheme}, ignore=["lm_head"], format=fmt)
    )
    _calibrate(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)


DYNAMIC = dict(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
CASES = {
    "fp8-channel": (
        dict(num_bits=8, type="float", strategy="channel", symmetric=True),
        "float-quantized",
        DYNAMIC,
    ),
    "fp8-tensor-static": (
        dict(num_bits=8, type="float", strategy="tensor", symmetric=True),
        "float-quantized",
        dict(num_bits=8, type="float", strategy="tensor", symmetric=True),
    ),
    "fp8-block": (
        dict(num_bits=8, type="float", strategy="block", block_structure=[16, 16], symmetric=True),
        "float-quantized",
        None,
    ),
    "w8a8-int": (dict(num_bits=8, type="int", strategy="channel", symmetric=True), "int-quantized", None),
    "w4a16": (
        dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True),
        "pack-quantized",
        None,
    ),
    "w4a16-asym": (
        dict(num_bits=4, type="int", strategy="group", group_size=16, symmetric=False),
        "pack-quantized",
        None,
    ),
    "w8a16-packed-channel": (
        dict(num_bits=8, type="int", strategy="channel", symmetric=True),
        "pack-quantized",
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_checkpoint_loads_as_transformers_dequantizes_it(tmp_path, case):
    import transformers

    weights, fmt, activations = CASES[case]
    write_compressed(tmp_path, weights, fmt, activations)
    stored = load_file(tmp_path / "model.safetensors")
    assert [n for n in stored if n.endswith(("_packed", "_scale"))], "the checkpoint holds quantized weights"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
    ).eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    theirs, ours = ref.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for n, t in ours.items():
        torch.testing.assert_close(t, theirs[n], rtol=0, atol=0, msg=n)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


def test_mixed_weight_schemes_are_refused_by_field(tmp_path):
    write_compressed(tmp_path, CASES["w4a16"][0], "pack-quantized")
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    quant = config["quantization_config"]
    (group,) = quant["config_groups"].values()
    quant["config_groups"]["other"] = {**group, "weights": {**CASES["fp8-channel"][0]}}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(autolm.CheckpointError, match="config_groups"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("case", ["w4a16", "w4a16-asym-32"])
def test_int4_keeps_the_checkpoints_codes(tmp_path, case):
    """quantization="int4" on a W4A16 checkpoint: autolm's int4 layers in the checkpoint's groups, holding its
    codes as stored (not quantized again) and its scales and zero points within bf16's rounding."""
    from autolm.kernels.quant import unpack_nibbles
    from autolm.sources.compressed import unpack_int32

    weights = {**CASES["w4a16-asym" if "asym" in case else "w4a16"][0], "group_size": 32}
    write_compressed(tmp_path, weights, "pack-quantized")
    stored = load_file(tmp_path / "model.safetensors")
    floats = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    from unittest import mock

    from autolm import quant

    with mock.patch.object(quant, "quantize_weight", wraps=quant.quantize_weight) as quantized:
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, quantization="int4")
    assert {c.args[1] for c in quantized.call_args_list} == {"lm_head"}  # the projections came as codes
    assert model.config.quantization_config["group_size"] == 32
    ours, want = model.state_dict(), floats.state_dict()
    name = "model.layers.1.mlp.down_proj"
    _, cols = stored[f"{name}.weight_shape"].tolist()
    codes = unpack_int32(stored[f"{name}.weight_packed"], 4, cols) + 8
    assert torch.equal(unpack_nibbles(ours[f"{name}.weight"]).long(), codes)
    layer = model.get_submodule(name)
    torch.testing.assert_close(layer.dequantize().float(), want[f"{name}.weight"], rtol=1e-2, atol=1e-3)
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():  # the int4 model computes in bf16, its head in int8
        torch.testing.assert_close(model(ids).logits.float(), floats(ids).logits, rtol=0.05, atol=0.15)
