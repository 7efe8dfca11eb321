"""Cohere Compass against transformers and peft: Cohere 2's parallel block with sliding RoPE layers (rotate-half, the
multimodal sections of the image-text model's RoPE in their entry) and NoPE full layers (a null rope_parameters
entry), the logits scaled, the head tied. A variant: RoPE on every layer type (two bases), attention biases, no
logit scale, an untied head, a head_dim other than hidden / heads. The standard battery, the image-text checkpoint
(cohere_compass: Qwen3-VL's wrapper with a tiny vision tower) loading as its language model with its logits and
tokens, the Hub's dangling RoPE keys, transformers' config defaults and the config's checks. llama.cpp has no Cohere
Compass architecture: no GGUF layout."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, padded_batch, randomize
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models.cohere_compass import CohereCompassForCausalLM, CohereCompassTextConfig

SLIDING = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=5, logit_scale=0.5,
             rope_parameters={"sliding_attention": SLIDING, "full_attention": None}, max_position_embeddings=64)  # fmt: skip
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for cohere_compass_text
COMPASS = Family("CohereCompassTextConfig", SIZES, lora_targets=_TARGETS)
VARIANT = Family(
    "CohereCompassTextConfig",
    dict(SIZES, attention_bias=True, logit_scale=None, tie_word_embeddings=False, head_dim=8,
         rope_parameters={"sliding_attention": SLIDING, "full_attention": {"rope_type": "default", "rope_theta": 5e5}}),
    lora_targets=["q_proj", "v_proj", "down_proj"],
)  # fmt: skip
FAMILIES = {"compass": COMPASS, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    COMPASS.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    COMPASS.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    COMPASS.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    COMPASS.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_names_and_config(tmp_path_factory, tmp_path, name):
    """check_save; transformers' names and shapes, config.json as transformers wrote it,
    the layers' RoPE as rope_parameters says."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.head_dim == hf.config.head_dim == (8 if name == "variant" else 16)
    ropes = [layer.self_attn.rope for layer in model.model.layers]
    full = "full_attention" if name == "variant" else None
    assert ropes == ["sliding_attention", full] * 2
    assert not any(layer.self_attn.rope_interleaved for layer in model.model.layers)


@pytest.mark.parametrize("tie", [False, True])
def test_image_text_checkpoint_is_its_language_model(tmp_path_factory, tmp_path, tie):
    """cohere_compass (the image-text model with a tiny vision tower): loads as CohereCompassForCausalLM with the
    image-text model's logits on a left-padded batch, its head tying and greedy tokens; saved, transformers loads the
    text model with the same logits."""
    import transformers

    text = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
    config = transformers.CohereCompassConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)
    torch.manual_seed(0)
    hf = transformers.CohereCompassForConditionalGeneration(config)
    randomize(hf)
    hf.tie_weights()
    hf.save_pretrained(tmp_path / "vl")
    hf = transformers.CohereCompassForConditionalGeneration.from_pretrained(tmp_path / "vl").eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "vl")
    assert type(model) is CohereCompassForCausalLM and model.config.model_type == "cohere_compass_text"
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie == hf.config.tie_word_embeddings
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[mask.bool()]
        theirs = hf(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    prompt = ids[:1, -9:]
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), want)
    model.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(ours, again, atol=1e-4, rtol=1e-4)


def test_config_as_transformers_reads_it():
    """The Hub's dangling rope_theta / rope_type beside the layer types' entries dropped, head_dim as given, a
    sliding_window_pattern kept as read, as transformers; its defaults (every layer full, no RoPE entries)."""
    import transformers

    d = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "head_dim": 32,
         "layer_types": ["sliding_attention", "full_attention"], "sliding_window_pattern": 2,
         "rope_parameters": {"rope_theta": 3.0, "rope_type": "default", "full_attention": None,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}  # fmt: skip
    ours, theirs = CohereCompassTextConfig.from_dict(d), transformers.CohereCompassTextConfig(**d)
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.head_dim == theirs.head_dim == 32
    assert ours.to_dict()["sliding_window_pattern"] == 2
    check_config_defaults(CohereCompassTextConfig)
    assert CohereCompassTextConfig().layer_types == ["full_attention"] * 40


@pytest.mark.parametrize(
    "key, bad",
    [
        ("rope_parameters", {"sliding_attention": 3}),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 5.0}),
        ("logit_scale", "x"),
        ("layer_norm_eps", 0),
        ("layer_types", ["sliding_attention", "chunked"]),
    ],
)
def test_config_errors_name_the_key(key, bad):
    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(autolm.ConfigError, match=key):
        CohereCompassTextConfig.from_dict({**small, key: bad})


def test_model_needs_a_rope_entry_per_layer_type():
    """transformers' default config (no rope_parameters entries) builds, but no model runs it: refused by name."""
    config = CohereCompassTextConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    with pytest.raises(autolm.ConfigError, match="rope_parameters.*full_attention"):
        CohereCompassForCausalLM(config)
