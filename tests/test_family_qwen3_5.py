"""Qwen 3.5 (text) against transformers and peft: Gated DeltaNet layers with Qwen 3.5's separate projections,
grouped value heads (4 value heads over 2 key heads, value heads wider than key heads), gated full attention with
partial RoPE (mrope sections in rope_parameters: the same positions for every section on text), q/k/v/o biases, a
dense MLP; the recurrent battery, generation past a chunk boundary, the image-text checkpoint's language model
(tied by the outer config, the vision tower skipped), config errors, and the CLI with Qwen 3's chat template."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family

import autolm
from autolm.errors import ConfigError

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
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
DENSE = Family(
    "Qwen3_5TextConfig",
    SIZES,
    lora_targets=["q_proj", "v_proj", "in_proj_qkv", "out_proj"],  # peft has no default for qwen3_5
)


def test_logits(tmp_path_factory):
    DENSE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    DENSE.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the prompt chunked, each new token by the one-step recurrence, 70
    tokens in all) are transformers' tokens; the logits of all 70 tokens at once (chunks of 64) equal the
    decoded ones (up to the two algorithms' rounding, which the random tiny model magnifies)."""
    directory, hf = DENSE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    want = hf.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert torch.equal(out.sequences, want)
    with torch.no_grad():
        whole = model(out.sequences).logits[0, 29:-1]
    torch.testing.assert_close(torch.cat(out.logits), whole, atol=1e-3, rtol=1e-3)


def test_recurrent(tmp_path_factory, tmp_path):
    DENSE.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    DENSE.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    DENSE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DENSE.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DENSE.check_disk_offload(tmp_path_factory, tmp_path)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the files; only transformers' config keys."""
    from safetensors import safe_open

    DENSE.check_save(tmp_path_factory, tmp_path)
    directory, hf = DENSE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    assert "model.layers.0.linear_attn.in_proj_a.weight" in model.state_dict()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}


def test_mrope_on_text_is_plain_rope():
    """transformers' multimodal RoPE with the same position in every section gives the plain (partial) RoPE
    tables autolm computes."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from autolm.models.qwen3_5 import Qwen3_5TextConfig
    from autolm.nn import Rotary

    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
            "mrope_interleaved": True}  # fmt: skip
    theirs = Qwen3_5TextRotaryEmbedding(transformers.Qwen3_5TextConfig(rope_parameters=rope))
    ours = Qwen3_5TextConfig(rope_parameters=rope)
    rotary = Rotary(
        ours.rope_kinds(), ours.head_dim, ours.max_position_embeddings, ours.partial_rotary_default
    )
    pos = torch.tensor([[0, 1, 2, 7, 300, 5000]])
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), pos)
    mine = rotary.tables(pos, torch.float32)["default"]
    assert cos.shape[-1] == 64
    torch.testing.assert_close(mine[0][:, 0], cos)
    torch.testing.assert_close(mine[1][:, 0], sin)


def _image_text_checkpoint(directory):
    """A transformers Qwen3_5ForConditionalGeneration (tiny vision tower, embeddings tied by the outer config)."""
    import transformers

    text = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForConditionalGeneration(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return model.eval()


def test_image_text_checkpoint(tmp_path):
    """model_type qwen3_5: the language model of Qwen3_5ForConditionalGeneration (its head tied by the outer
    config), the vision tower skipped; saved as the text model transformers' Qwen3_5ForCausalLM loads."""
    import transformers

    hf = _image_text_checkpoint(tmp_path / "it")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Qwen3_5ForCausalLM" and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours, hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )
        model.save_pretrained(tmp_path / "text")
        text = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "text", attn_implementation="eager"
        )
        assert type(text).__name__ == "Qwen3_5ForCausalLM"
        torch.testing.assert_close(
            ours, text(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )


def test_config_defaults_are_transformers():
    import transformers

    from autolm.models.qwen3_5 import Qwen3_5TextConfig

    ours, theirs = Qwen3_5TextConfig(), transformers.Qwen3_5TextConfig()
    for key, value in ours.to_dict().items():
        if key not in ("model_type", "transformers_version"):
            assert getattr(theirs, key) == value, key


def test_config_errors_name_the_key():
    from autolm.models.qwen3_5 import Qwen3_5Config, Qwen3_5TextConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16)
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "sliding_attention"]),
        "linear_num_value_heads": dict(linear_num_key_heads=3, linear_num_value_heads=4),
        "linear_value_head_dim": dict(linear_value_head_dim=-1),
        "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0,
                                                       "partial_rotary_factor": 1.5}),
        "full_attention_interval": dict(full_attention_interval="4"),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Qwen3_5TextConfig.from_dict({**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Qwen3_5Config.from_dict({"model_type": "qwen3_5", "text_config": None})


def test_cli(tmp_path_factory, tmp_path):
    """No Qwen 3.5 chat template among the test data: Qwen 3's (qwen3-moe.jinja), the closest."""
    check_cli(DENSE, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "Qwen3_5ForCausalLM (qwen3_5_text)")
