"""Emu3's text model (BAAI's Emu3) against transformers and peft: Llama's architecture with Emu3's defaults (RoPE base
1e6, attention_dropout 0.1, not applied in eval); a variant with q/k/v/o and MLP biases, head_dim given, a tied head.
transformers' AutoModelForCausalLM takes only the image-text config (emu3), so the text checkpoints are built and
loaded with Emu3ForCausalLM itself (Family.hf_class). The standard battery, the image-text checkpoint read as its
language model, config defaults. llama.cpp has no Emu3: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models.emu3 import Emu3ForCausalLM, Emu3TextConfig

TARGETS = ["q_proj", "v_proj"]  # peft has no default for emu3_text_model
EMU3 = Family(
    "Emu3TextConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64),
    hf_class="Emu3ForCausalLM",
    lora_targets=TARGETS,
)  # fmt: skip
# biases everywhere (config keys Emu3's config reads without fields), head_dim given, a tied head, MHA, 3 layers
BIASED = Family(
    "Emu3TextConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
         head_dim=32, attention_bias=True, mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64,
         rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    hf_class="Emu3ForCausalLM",
)  # fmt: skip
FAMILIES = {"emu3": EMU3, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    EMU3.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    EMU3.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    BIASED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    EMU3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    EMU3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    EMU3.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_files(tmp_path_factory, tmp_path, name):
    """Saved: transformers' Emu3ForCausalLM loads it with equal logits; its tensor names, config.json as the
    checkpoint's (no attention_bias / head_dim keys where the checkpoint has none)."""
    model, _ = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "biased")


def test_image_text_checkpoint_is_its_language_model(tmp_path):
    """An image-text checkpoint (model_type emu3, a tiny VQ-VAE; its files name the language model
    text_model.model.* / text_model.lm_head.*) loads as Emu3ForCausalLM with the image-text model's text logits and
    greedy tokens, the VQ-VAE skipped; saved, it is the text model transformers' Emu3ForCausalLM loads alike."""
    import transformers

    text = dict(EMU3.kwargs, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vq = dict(embed_dim=8, codebook_size=16, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
              attn_resolutions=[], latent_channels=4, double_latent=False, temporal_downsample_factor=1)  # fmt: skip
    config = transformers.Emu3Config(text_config=text, vq_config=vq, vocabulary_map={"<image>": VOCAB - 1})
    torch.manual_seed(0)
    full = transformers.Emu3ForConditionalGeneration(config)
    randomize(full)
    full.save_pretrained(tmp_path / "vl")
    full = full.eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "vl")
    assert type(model) is Emu3ForCausalLM and model.config.model_type == "emu3_text_model"
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[mask.bool()]
        theirs = full(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    want = full.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), want)
    model.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "emu3_text_model"
    back = transformers.Emu3ForCausalLM.from_pretrained(tmp_path / "text")
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, again, atol=1e-4, rtol=1e-4)


def test_config_defaults():
    """Emu3TextConfig() holds transformers' defaults (attention_dropout 0.1; RoPE base 1e6 where config.json gives
    none)."""
    check_config_defaults(Emu3TextConfig)
    assert Emu3TextConfig().attention_dropout == 0.1
    bare = Emu3TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert bare.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    with pytest.raises(autolm.ConfigError, match="attention_dropout"):
        Emu3TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "attention_dropout": 3})
