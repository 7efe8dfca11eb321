"""Mllama's text model (Llama 3.2 Vision's language model) against transformers and peft: Llama 3's layers with
cross-attention layers at `cross_attention_layers`, which transformers skips on text (no image states, none cached),
embeddings of vocab_size + 8 rows. transformers' AutoModelForCausalLM takes only the image-text config (mllama), so
the text checkpoints are built and loaded with MllamaForCausalLM itself (Family.hf_class). The standard battery, the
image-text checkpoint read as its language model, config defaults and errors. llama.cpp has no Mllama: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError
from autolm.models.mllama import MllamaCrossAttentionDecoderLayer, MllamaForCausalLM, MllamaTextConfig

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, cross_attention_layers=[1, 3])  # fmt: skip
TARGETS = [
    "q_proj",
    "v_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]  # peft has no default for mllama_text_model
MLLAMA = Family("MllamaTextConfig", SIZES, hf_class="MllamaForCausalLM", lora_targets=TARGETS)
# MHA, the last layer a cross-attention layer (and an index past the last, which transformers ignores), Llama 3's
# RoPE scaling, another epsilon. (Not layer 0: transformers' cache then counts no tokens, as it asks layer 0.)
VARIANT = Family(
    "MllamaTextConfig",
    dict(SIZES, num_hidden_layers=3, num_key_value_heads=4, cross_attention_layers=[2, 7], rms_norm_eps=1e-6,
         rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    hf_class="MllamaForCausalLM",
)  # fmt: skip
FAMILIES = {"mllama": MLLAMA, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    MLLAMA.check_generate(tmp_path_factory)


def test_bf16_and_hidden_states(tmp_path_factory):
    """bf16 as close as transformers'; hidden_states: the self-attention layers' inputs and the final norm's output
    (the skipped cross-attention layers record none, as transformers)."""
    MLLAMA.check_bf16(tmp_path_factory)
    MLLAMA.check_hidden_states(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    VARIANT.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MLLAMA.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    MLLAMA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MLLAMA.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_files(tmp_path_factory, tmp_path, name):
    """Saved: transformers' MllamaForCausalLM loads it with equal logits; the cross-attention layers' tensors under
    transformers' names; config.json as the checkpoint's."""
    model, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    cross = model.config.cross_attention_layers[0]
    assert {f"model.layers.{cross}.cross_attn.q_proj.weight", f"model.layers.{cross}.cross_attn_attn_gate",
            f"model.layers.{cross}.cross_attn.k_norm.weight"} <= saved  # fmt: skip
    assert model.model.embed_tokens.weight.shape[0] == VOCAB + 8 and model.lm_head.weight.shape[0] == VOCAB


def test_disk_offload(tmp_path_factory, tmp_path):
    MLLAMA.check_disk_offload(tmp_path_factory, tmp_path)


def test_cross_attention_layers_are_skipped(tmp_path_factory):
    """The cross-attention layers change nothing on text (their weights and gates scaled: the same logits), keep
    no cache entry, and image inputs are refused by name."""
    directory, _ = MLLAMA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                for p in layer.parameters():
                    p.mul_(3.0).add_(0.5)
        out = model(ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits, before, atol=0, rtol=0)
    assert [s[1] for s in model.attention_shapes()] == [16, 0, 16, 0]
    with pytest.raises(GenerationError, match="cross_attention_states"):
        model(ids, cross_attention_states=torch.zeros(3, 4, 64))
    with pytest.raises(GenerationError, match="pixel_values"):
        model(ids, pixel_values=torch.zeros(1, 1, 4, 3, 28, 28))


def test_image_text_checkpoint_is_its_language_model(tmp_path):
    """An image-text checkpoint (model_type mllama, a tiny vision model) loads as transformers'
    AutoModelForCausalLM loads it: MllamaForCausalLM with the language model's tensors and logits, the vision
    tensors skipped; saved, it is the text model transformers' MllamaForCausalLM loads with the same logits."""
    import transformers

    text = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, vision_output_dim=32, intermediate_layers_indices=[0])  # fmt: skip
    config = transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1)
    torch.manual_seed(0)
    full = transformers.MllamaForConditionalGeneration(config)
    randomize(full)
    full.save_pretrained(tmp_path / "vl")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "vl").eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "vl")
    assert type(model) is MllamaForCausalLM and model.config.model_type == "mllama_text_model"
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[mask.bool()]
        theirs = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       hf.generate(prompt, max_new_tokens=6, do_sample=False))  # fmt: skip
    model.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "mllama_text_model"
    back = transformers.MllamaForCausalLM.from_pretrained(tmp_path / "text")
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, again, atol=1e-4, rtol=1e-4)


def test_config_defaults_and_errors():
    """MllamaTextConfig() holds transformers' defaults (cross-attention layers 3, 8, ..., 38; RoPE base 500000
    where config.json gives none); bad values raise ConfigError naming the key."""
    check_config_defaults(MllamaTextConfig)
    assert MllamaTextConfig().cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    bare = MllamaTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert bare.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    for change, key in ((dict(cross_attention_layers=[1, "x"]), "cross_attention_layers"),
                        (dict(cross_attention_layers=3), "cross_attention_layers"), (dict(head_dim=8), "head_dim"),
                        (dict(dropout=2), "dropout"), (dict(tie_word_embeddings=True), "tie_word_embeddings")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            MllamaTextConfig.from_dict({**small, **change})
