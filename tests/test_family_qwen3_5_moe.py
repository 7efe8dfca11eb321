"""Qwen 3.5 MoE (text) against transformers and peft: Qwen 3.5's hybrid layers (Gated DeltaNet with separate
projections and grouped value heads, gated attention with partial RoPE and mrope sections, q/k/v/o biases) with 4
experts of which each token uses 2 and a gated shared expert in every layer; the recurrent battery, generation past
a chunk boundary, the per-expert checkpoint tensors, the image-text checkpoint's language model (tied by the outer
config, the vision tower skipped), config errors, and the CLI with Qwen 3's chat template."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family
from test_family_qwen3_5 import _logits, write_qwen3_5_gguf
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 100.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    attention_bias=True,
)
MOE = Family(
    "Qwen3_5MoeTextConfig",
    dict(
        SIZES,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
    lora_targets=["q_proj", "v_proj", "in_proj_qkv", "out_proj"],  # peft has no default for qwen3_5_moe
)


def test_logits(tmp_path_factory):
    MOE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    MOE.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the prompt chunked, each new token by the one-step recurrence, 70
    tokens in all) are transformers' tokens; the logits of all 70 tokens at once (chunks of 64) equal the
    decoded ones (up to the two algorithms' rounding, which the random tiny model magnifies)."""
    MOE.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_recurrent(tmp_path_factory, tmp_path):
    MOE.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    MOE.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    MOE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MOE.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    MOE.check_disk_offload(tmp_path_factory, tmp_path)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the files; only transformers' config keys."""
    from safetensors import safe_open

    MOE.check_save(tmp_path_factory, tmp_path)
    directory, hf = MOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert "model.layers.2.mlp.experts.3.down_proj.weight" in set(ours.keys())
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}


def _image_text_checkpoint(directory):
    """A transformers Qwen3_5MoeForConditionalGeneration (tiny vision tower, embeddings tied by the outer config)."""
    import transformers

    text = dict(MOE.kwargs, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3_5MoeForConditionalGeneration(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return model.eval()


def test_image_text_checkpoint(tmp_path):
    """model_type qwen3_5_moe: the language model of Qwen3_5MoeForConditionalGeneration (its head tied by the outer
    config), the vision tower skipped; saved as the text model transformers' Qwen3_5MoeForCausalLM loads. (This
    random checkpoint magnifies rounding: differences in the last bits grow to 6e-4 in the logits, while
    transformers' own text and image-text models agree to 5e-6; hence 1e-3.)"""
    import transformers

    hf = _image_text_checkpoint(tmp_path / "it")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM" and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours, hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-3, rtol=1e-3
        )
        model.save_pretrained(tmp_path / "text")
        text = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "text", attn_implementation="eager"
        )
        assert type(text).__name__ == "Qwen3_5MoeForCausalLM"
        torch.testing.assert_close(
            ours, text(input_ids=ids, attention_mask=mask).logits[real], atol=1e-3, rtol=1e-3
        )


def test_config_defaults_are_transformers():
    from family_checks import check_config_defaults

    from autolm.models.qwen3_5_moe import Qwen3_5MoeTextConfig

    check_config_defaults(Qwen3_5MoeTextConfig)


def test_config_errors_name_the_key():
    from autolm.models.qwen3_5_moe import Qwen3_5MoeConfig, Qwen3_5MoeTextConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16)
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "sliding_attention"]),
        "linear_num_value_heads": dict(linear_num_key_heads=3, linear_num_value_heads=4),
        "linear_value_head_dim": dict(linear_value_head_dim=-1),
        "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0,
                                                       "partial_rotary_factor": 1.5}),
        "full_attention_interval": dict(full_attention_interval="4"),
        "num_experts_per_tok": dict(num_experts=2, num_experts_per_tok=3),
        "shared_expert_intermediate_size": dict(shared_expert_intermediate_size=0),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Qwen3_5MoeTextConfig.from_dict({**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Qwen3_5MoeConfig.from_dict({"text_config": None})


def test_cli(tmp_path_factory, tmp_path):
    """No Qwen 3.5 MoE chat template among the test data: Qwen 3's (qwen3-moe.jinja), the closest."""
    check_cli(MOE, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "Qwen3_5MoeForCausalLM (qwen3_5_moe_text)")


# ---- GGUF: llama.cpp's Qwen3_5MoeTextModel converter (--no-mtp), emulated -----------------------------------------

# what llama.cpp's qwen35moe runs: key and value heads of one size, no attention biases (test_family_qwen3_5 has the
# converter mimic and the refusals)
GGUF_FAMILY = Family("Qwen3_5MoeTextConfig", dict(MOE.kwargs, attention_bias=False, linear_value_head_dim=8,
                                                  full_attention_interval=2))  # fmt: skip


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's F32 file loads as Qwen3_5MoeForCausalLM with transformers' logits; its Q8_0 file (kept in
    its blocks) gives logits close to them."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_qwen3_5_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    theirs = _logits(hf, ids)
    torch.testing.assert_close(_logits(model, ids), theirs, atol=1e-4, rtol=1e-4)
    write_qwen3_5_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    # this random model amplifies Q8_0's rounding (experts picked otherwise): the dequantized file is as far off
    assert (_logits(quant, ids) - theirs).abs().mean() <= 0.15 * theirs.abs().mean()
