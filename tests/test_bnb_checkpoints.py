"""bitsandbytes checkpoints (quant_method "bitsandbytes": the "-bnb-4bit" releases, or a model transformers
quantized with BitsAndBytesConfig and saved) load dequantized: NF4 and FP4, with and without double quantization,
and LLM.int8, each weight equal to bitsandbytes' own dequantization and the logits transformers gives running the
quantized model on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, randomize
from safetensors.torch import load_file

import autolm

bnb = pytest.importorskip("bitsandbytes")

CASES = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Qwen3 whose linears bitsandbytes' CPU kernels take (inputs in whole blocks of 64)."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    model = transformers.Qwen3ForCausalLM(config)
    randomize(model)
    directory = tmp_path_factory.mktemp("bnb") / "float"
    model.save_pretrained(directory)
    return directory


def _reference(stored: dict, name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of the stored weight `name`."""
    import bitsandbytes.functional as F

    if f"{name.removesuffix('.weight')}.SCB" in stored:
        return bnb.functional.int8_vectorwise_dequant(
            stored[name], stored[f"{name.removesuffix('.weight')}.SCB"]
        )
    parts = {k: v for k, v in stored.items() if k.startswith(name + ".")}
    state = F.QuantState.from_dict({k[len(name) + 1 :]: v for k, v in parts.items()}, torch.device("cpu"))
    return F.dequantize_4bit(stored[name], state).float()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bitsandbytes_checkpoint_loads_dequantized(source, tmp_path, case):
    import transformers

    quant = transformers.BitsAndBytesConfig(**CASES[case], bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, device_map="cpu"
    )
    ref.save_pretrained(tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert stored[name].dtype in (torch.uint8, torch.int8)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ours = model.state_dict()
    linears = [n for n in stored if n.endswith("proj.weight")]
    for n in linears:
        torch.testing.assert_close(ours[n], _reference(stored, n), rtol=0, atol=0, msg=n)
    # transformers' float model holding bitsandbytes' dequantized weights (its bitsandbytes layers compute on the
    # CPU in their own way: int8 activations for LLM.int8)
    floats = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    floats.load_state_dict({n: _reference(stored, n) for n in linears}, strict=False)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, floats(ids).logits, rtol=1e-4, atol=1e-4)
        assert (model(ids).logits - ref.eval()(ids).logits.float()).abs().max() < 0.2
    model.save_pretrained(tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float32}


def test_a_4bit_weight_without_its_quant_state_parts_is_refused_by_name(source, tmp_path):
    import transformers
    from safetensors.torch import save_file

    quant = transformers.BitsAndBytesConfig(**CASES["fp4"])
    transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, device_map="cpu"
    ).save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    del stored["model.layers.0.self_attn.q_proj.weight.absmax"]
    save_file(stored, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(autolm.CheckpointError, match="q_proj.weight.*absmax"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
