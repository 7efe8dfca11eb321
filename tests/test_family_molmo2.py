"""Molmo 2's language model against transformers and peft: Llama's layer with q/k RMSNorm per head ("qwen3") or over
the whole projection ("olmo"), norm_after (the norms on the sublayers' outputs), q/k/v biases, embeddings with
additional_vocab_size rows beyond the head's, and a scaled RoPE on rope_scaling_layers only.

transformers has no causal-LM class for molmo2_text: the Family battery's reference is transformers' Molmo2TextModel
with a head (conftest.register_reference), which writes the original layout (att_proj, ff_proj,
attn_norm, wte.embedding / wte.new_embedding, ...); the image-text cases check autolm against
Molmo2ForConditionalGeneration on text (logits over a left-padded batch, the head never tied, greedy tokens, the
saved text model). llama.cpp has no Molmo 2 architecture (no GGUF)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_deepseek_ocr2 import register_reference
from test_family_image_text import _logits
from test_family_image_text_more import check_language_model

import autolm


@pytest.fixture(scope="module", autouse=True)
def references():
    register_reference("Molmo2Text", "Molmo2PreTrainedModel", "Molmo2TextModel", None)


SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, additional_vocab_size=8, max_position_embeddings=128)  # fmt: skip
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Molmo2-8B's shape: per-head q/k norms, pre-norm layers
QWEN3 = Family("Molmo2TextConfig", SIZES, lora_targets=_TARGETS)
# Molmo2-O's: whole-projection q/k norms, norms after the sublayers, q/k/v biases; YaRN on layers 0 and 2 only
OLMO = Family("Molmo2TextConfig",
              dict(SIZES, qk_norm_type="olmo", norm_after=True, attention_bias=True, rope_scaling_layers=[0, 2],
                   rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=4.0,
                                        original_max_position_embeddings=32)),
              lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"qwen3": QWEN3, "olmo": OLMO}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    OLMO.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OLMO.check_compiled_step(tmp_path_factory, home)


def test_bf16_lora_quantized(tmp_path_factory, tmp_path):
    OLMO.check_bf16(tmp_path_factory)
    QWEN3.check_lora(tmp_path_factory, tmp_path)
    QWEN3.check_quantized(tmp_path_factory, "int8")


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """autolm's save loads in transformers with its logits and back in autolm bit-identical; transformers' names and
    shapes in the state dict (the embeddings' extra rows included); the saved text model's names are transformers'
    module names (which transformers loads as they are)."""
    from safetensors import safe_open

    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()
    }
    assert model.model.embed_tokens.weight.shape[0] == VOCAB + 8 and model.lm_head.weight.shape[0] == VOCAB
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" in set(f.keys())
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original


def test_additional_vocabulary_as_input(tmp_path_factory):
    """Tokens of the embeddings' extra rows (the image and video special tokens) are read as transformers does."""
    directory, hf = QWEN3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.tensor([[5, VOCAB, VOCAB + 7, 9, VOCAB + 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_defaults_and_errors():
    """Molmo2TextConfig() holds transformers' defaults; the original's qkv_bias / layer_norm_eps read as transformers'
    attribute_map reads them; bad values name their key."""
    import transformers

    from autolm.models.molmo2 import Molmo2TextConfig

    check_config_defaults(Molmo2TextConfig)
    ours = Molmo2TextConfig.from_dict(dict(qkv_bias=True, layer_norm_eps=1e-5, num_hidden_layers=2))
    theirs = transformers.Molmo2TextConfig(qkv_bias=True, layer_norm_eps=1e-5, num_hidden_layers=2)
    assert (ours.attention_bias, ours.rms_norm_eps, ours.rope_scaling_layers) == (
        theirs.attention_bias, theirs.rms_norm_eps, theirs.rope_scaling_layers)  # fmt: skip
    for key, bad in (("qk_norm_type", "gemma"), ("additional_vocab_size", -1), ("rope_scaling_layers", "all"),
                     ("tie_word_embeddings", True)):  # fmt: skip
        with pytest.raises(autolm.ConfigError, match=key):
            Molmo2TextConfig.from_dict({key: bad})


# ---- the image-text checkpoint --------------------------------------------------------------------------------------

VISION = dict(vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, head_dim=16),
              adapter_config=dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                                  head_dim=16, text_hidden_size=64, vision_feature_layer=[0]))  # fmt: skip
TEXT = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("text", [TEXT, OLMO.kwargs], ids=["qwen3", "olmo"])
def test_language_model_is_the_image_text_models(text, tmp_path_factory, tmp_path):
    """Molmo2ForConditionalGeneration's files (the original layout, the vision backbone skipped) load as the text
    family with its logits over a left-padded batch, its untied head and greedy tokens; saved, the text model
    loads in transformers with the same logits. A text_config asking to tie the head is read untied, as
    transformers runs it."""
    import transformers

    config = transformers.Molmo2Config(text_config=dict(TEXT, **text), tie_word_embeddings=True, **VISION)
    torch.manual_seed(0)
    hf = transformers.Molmo2ForConditionalGeneration(config)
    randomize(hf)
    hf.save_pretrained(tmp_path / "molmo2")
    check_language_model(str(tmp_path / "molmo2"), hf.eval(), "Molmo2TextForCausalLM", tmp_path)
    ids, mask = padded_batch()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "molmo2")
    torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
