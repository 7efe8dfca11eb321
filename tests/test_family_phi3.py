"""Phi-3 against transformers: packed qkv_proj / gate_up_proj, partial rotary embeddings, LongRoPE (short
factors up to original_max_position_embeddings, long ones past it: the batches here are longer than it, and a
generation crosses it) as Phi-3.5 / Phi-4-mini use it, a sliding window shorter than the sequence; the standard
battery, GGUF as llama.cpp writes it (fused tensors, factors as tensors), and Phi-3's chat template."""

from __future__ import annotations

import pytest
import torch
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from conftest import VOCAB
from family_checks import Family, check_lora_needs_targets
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
# Phi-4-mini's shape of RoPE: LongRoPE over the first half of each head (head_dim 16: 8 rotary dimensions, 4 factors)
PHI3 = Family(
    "Phi3Config",
    dict(
        SMALL,
        original_max_position_embeddings=8,
        partial_rotary_factor=0.5,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0, 1.3, 1.9, 2.6],
            "long_factor": [3.5, 6.0, 9.0, 14.0],
        },
    ),
    lora_targets=["qkv_proj", "o_proj"],
)
# Phi-3-mini's: full rotary default RoPE, a sliding window (5 slots here)
PHI3_WINDOW = Family("Phi3Config", dict(SMALL, sliding_window=5), lora_targets=["qkv_proj", "gate_up_proj"])


def test_logits(tmp_path_factory):
    PHI3.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    PHI3.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    PHI3.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    PHI3.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    PHI3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    PHI3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    PHI3.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    PHI3.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    PHI3.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("family", [PHI3, PHI3_WINDOW], ids=["longrope", "window"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """Fused attn_qkv / ffn_up, the rotary dimensions as rope.dimension_count, the factors as tensors, a window
    of 0 for none: read back into transformers' config."""
    model, hf = check_gguf(family, tmp_path_factory, tmp_path)
    ours, theirs = model.config, hf.config
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads
    assert ours.sliding_window == theirs.sliding_window
    assert ours.original_max_position_embeddings == theirs.original_max_position_embeddings
    defaults = dict(
        short_factor=None, long_factor=None, partial_rotary_factor=1.0
    )  # transformers fills these in
    ours, theirs = ({**defaults, **c.rope_parameters} for c in (ours, theirs))
    for k in (*defaults, "rope_type", "rope_theta"):  # the file holds the factors in float32
        assert ours[k] == (
            theirs[k] if theirs[k] is None or isinstance(theirs[k], str) else pytest.approx(theirs[k])
        )


@pytest.mark.parametrize("check", ["logits", "generate", "one_token_step", "lora"])
def test_sliding_window(tmp_path_factory, tmp_path, check):
    args = (tmp_path_factory, tmp_path) if check == "lora" else (tmp_path_factory,)
    getattr(PHI3_WINDOW, f"check_{check}")(*args)


def test_generation_crossing_original_length_recomputes_as_transformers(tmp_path_factory):
    """A prompt within original_max_position_embeddings that generates past it: transformers recomputes the whole
    sequence with the long factors at the crossing (its cached keys were rotated with the short ones); so does
    autolm, for greedy search (one row and a batch) and beam search."""
    directory, hf = PHI3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(), dict(num_beams=3)):
        for rows in (ids[:1], ids):
            ours = model.generate(rows, max_new_tokens=12, do_sample=False, **kwargs)
            assert torch.equal(ours, hf.generate(rows, max_new_tokens=12, do_sample=False, **kwargs)), kwargs


@pytest.mark.parametrize("template", ["phi-3.5-mini-instruct.jinja", "phi-4-mini-instruct.jinja"])
def test_chat_template(tmp_path, template):
    ours = check_chat_template(tmp_path, template, eos_token="<|endoftext|>")
    if template.startswith("phi-3.5"):
        text = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
        assert text == "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"


def test_cli(tmp_path_factory, tmp_path):
    check_cli(PHI3, "phi-3.5-mini-instruct.jinja", tmp_path_factory, tmp_path, "Phi3ForCausalLM (phi3)")


@pytest.mark.parametrize("spec", ["phi3_longrope", "olmo2", "granite", "smollm3_nope"])
def test_lora_without_targets_is_refused_as_peft_refuses_it(checkpoint, spec):
    """peft has no default target modules for these types: a LoraConfig naming none is an error in both."""
    check_lora_needs_targets(*checkpoint(spec))


def test_phi35_config_spelling(tmp_path_factory, tmp_path):
    """Phi-3.5's config.json as shipped: transformers 4's spelling, LongRoPE named "su" in rope_scaling, the
    original length and partial_rotary_factor (Phi-4-mini) at the top level only: the same model as the v5
    spelling, and saved back in the spelling it was read in, which transformers loads with equal logits."""
    import json
    import shutil

    import transformers
    from conftest import padded_batch, positions

    src, hf = PHI3.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    for k in ("original_max_position_embeddings", "partial_rotary_factor"):
        rope.pop(k)
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {"type": "su", **{k: v for k, v in rope.items() if k != "rope_type"}}
    path.write_text(json.dumps(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    assert model.config.rope_parameters["rope_type"] == "longrope"
    assert model.config.rope_parameters["original_max_position_embeddings"] == 8
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    assert "rope_scaling" in json.loads((tmp_path / "saved" / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    with torch.no_grad():
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8}),
            "long_factor",
        ),
        (
            dict(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 3,
                    "long_factor": [1.0] * 8,
                }
            ),
            "short_factor must be a list of 8",
        ),
        (
            dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
            "'default' or 'longrope'",
        ),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        autolm.Phi3Config(**{**dict(hidden_size=64, num_attention_heads=4), **bad})
