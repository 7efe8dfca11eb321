"""FP8 block-quantized checkpoints (quantization_config quant_method "fp8", as DeepSeek-V3 and Qwen3's -FP8 releases
ship them) load dequantized, with the weights and logits transformers gives on a machine without an FP8 GPU."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import autolm
from autolm.sources.fp8 import dequantize_fp8

FP8_MAX = 448.0


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization: per bm x bn block (the last ones cut short) scale = amax / 448."""
    rows, cols = w.shape[-2:]
    bm, bn = block
    gm, gn = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.zeros(*w.shape[:-2], gm * bm, gn * bn)
    padded[..., :rows, :cols] = w.float()
    g = padded.reshape(*w.shape[:-2], gm, bm, gn, bn)
    scale = g.abs().amax(dim=(-3, -1)).clamp(min=1e-8) / FP8_MAX
    q = (g / scale[..., :, None, :, None]).reshape(padded.shape)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


def to_fp8(src: str, dst: str, block: tuple[int, int], extra: dict | None = None) -> int:
    """A copy of checkpoint `src` with every projection FP8 block-quantized, as the -FP8 releases are; the count."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors, count = load_file(path), 0
    for name in [n for n in tensors if n.endswith("proj.weight") and tensors[n].dim() >= 2]:
        tensors[name], tensors[name + "_scale_inv"] = quantize(tensors[name], block)
        count += 1
    save_file({**tensors, **(extra or {})}, path, metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}  # fmt: skip
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return count


@pytest.mark.parametrize("name, block", [("qwen3", (16, 16)), ("deepseek_v3", (8, 8))])
def test_fp8_checkpoint_loads_as_transformers_dequantizes_it(checkpoint, tmp_path, name, block):
    import transformers

    src, _ = checkpoint(name)
    assert to_fp8(src, str(tmp_path / "fp8"), block) > 0
    for dtype in (torch.bfloat16, torch.float32):
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=dtype).eval()
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=dtype)
        theirs, ours = ref.state_dict(), model.state_dict()
        assert set(ours) == set(theirs) - {n for n in theirs if n.endswith("rotary_emb.inv_freq")}
        for n, t in ours.items():  # in bf16 transformers keeps the unquantized tensors (and some others) fp32
            torch.testing.assert_close(t, theirs[n].to(t.dtype), rtol=0, atol=0, msg=n)
    ids = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    assert "quantization_config" not in model.config.to_dict()


def test_fp8_model_saves_floats_that_transformers_loads(checkpoint, tmp_path):
    import transformers

    src, _ = checkpoint("qwen3")
    to_fp8(
        src, str(tmp_path / "fp8"), (16, 16), {"model.layers.0.mlp.up_proj.activation_scale": torch.ones(1)}
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    model.save_pretrained(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert not [n for n in saved if "scale" in n] and {t.dtype for t in saved.values()} == {torch.float32}
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_blocks_cut_short_at_the_edges():
    """DeepSeek's 576-row kv_a_proj_with_mqa holds 4.5 blocks of 128: the last block row is cut short."""
    w = torch.randn(3, 20, 12)  # experts stacked, 20 rows in blocks of 8
    q, scale = quantize(w, (8, 8))
    assert scale.shape == (3, 3, 2)
    want = q.float() * scale.repeat_interleave(8, -2)[:, :20].repeat_interleave(8, -1)[..., :12]
    torch.testing.assert_close(dequantize_fp8(q, scale, (8, 8), "w"), want, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_fp8(q, scale, (8, 8), "w"), w, rtol=0.07, atol=1e-6)
    with pytest.raises(autolm.CheckpointError, match="'w'.*weight_block_size"):
        dequantize_fp8(q, scale, None, "w")  # the grid alone cannot say where 20 rows split
    with pytest.raises(autolm.CheckpointError, match="'w'.*scale grid"):
        dequantize_fp8(q, scale[:, :2], (8, 8), "w")


def test_e8m0_scales_and_fp4_pairs_as_transformers_reads_them():
    """MXFP8's power-of-two scales (uint8 bytes) and FP4 weights (two E2M1 values per int8 byte), each against
    transformers' own dequantizer."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    theirs = Fp8Dequantize(None)._dequantize_one
    q, _ = quantize(torch.randn(16, 32), (8, 8))
    e8m0 = torch.randint(120, 134, (2, 4), dtype=torch.uint8)
    torch.testing.assert_close(dequantize_fp8(q, e8m0, None, "w"), theirs(q, e8m0, torch.float32))
    packed = torch.randint(-128, 128, (4, 16), dtype=torch.int8)  # (4, 32) FP4 values
    scale = torch.rand(1, 2) + 0.5
    torch.testing.assert_close(dequantize_fp8(packed, scale, None, "w"), theirs(packed, scale, torch.float32))
