"""Muse Spark's language model (muse_spark_text; muse_spark: the image-audio-text checkpoints) against transformers'
MuseSparkForConditionalGeneration (tiny vision and audio towers; transformers has no text-only causal LM) and peft.

Two checkpoints: SPARK (every quirk set by hand: dense and sparse layers mixed, the mixture at its own width, random
router correction biases, routed_scaling_factor, a residual gate temperature, a sliding layer without RoPE and a full
layer with it, qk_scale_factor, output_multiplier (the head's and the router's) and post_norm_eps apart, a window
shorter than the prompts) and DERIVED (transformers' derived layer_types, layer_rope_theta and mlp_layer_types,
attention biases, the GeLU-tanh activation, tie_word_embeddings set, which the image-text model ignores). The battery
(a padded batch's logits, the correction biases, generate with beams, bf16, the eager one-token step and the compiled
step, LoRA vs peft, int8 / int4 (the experts stay float); disk offload: test_family_muse_glimmer), the head never tied, the text model saved
(transformers' MuseSparkTextModel loads it; autolm reads it back), config defaults and errors naming the field.
llama.cpp has no Muse Spark architecture."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import padded_batch, positions
from family_checks import RoutedFamily, check_config_defaults, check_wrapper_lora
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_muse_glimmer import SIZES, VISION

import autolm
from autolm.errors import ConfigError
from autolm.models.muse_spark import MuseSparkConfig, MuseSparkExperts, MuseSparkTextConfig
from autolm.nn import Experts

# transformers maps muse_spark to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.MuseSparkConfig, transformers.MuseSparkForConditionalGeneration, exist_ok=True
)
AUDIO = dict(patch_sizes=[2, 2], hidden_sizes=[8, 16], depths=[1, 1], num_hidden_layers=2, out_hidden_size=64)
WRAPPER = dict(vision_config=VISION, audio_config=AUDIO, out_hidden_size=128, projector_hidden_size=32)
MOE = dict(moe_intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=32)
TEXT = dict(SIZES, **MOE, num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "dense"],
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            layer_rope_theta=[10000.0, 500.0, 0, 0], routed_scaling_factor=1.5, residual_gate_temperature=0.5)  # fmt: skip
DERIVED_TEXT = dict(SIZES, **MOE, num_hidden_layers=5, attention_bias=True, hidden_act="gelu_pytorch_tanh",
                    tie_word_embeddings=True)  # fmt: skip
TARGETS = [
    "q_proj",
    "o_proj",
    "gate_proj",
    "pre_expert_proj",
    "post_expert_proj",
    "up_proj",
]  # peft has no default
SPARK = RoutedFamily("MuseSparkConfig", dict(WRAPPER, text_config=TEXT), lora_targets=TARGETS)
DERIVED = RoutedFamily("MuseSparkConfig", dict(WRAPPER, text_config=DERIVED_TEXT, tie_word_embeddings=True),
                       lora_targets=["k_proj", "v_proj", "down_proj"])  # fmt: skip
FAMILIES = {"spark": SPARK, "derived": DERIVED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_correction_bias(tmp_path_factory, tmp_path):
    SPARK.check_correction_bias(tmp_path_factory, tmp_path)


def test_layers_and_quirks(tmp_path_factory):
    """Dense and sparse layers, RoPE and windows as the config says (derived where absent); the head never tied;
    without the experts' own norm, or with plain residual sums, the logits are not transformers'."""
    model = autolm.AutoModelForCausalLM.from_pretrained(SPARK.checkpoint(tmp_path_factory)[0])
    layers = model.model.layers
    assert [isinstance(getattr(la.mlp, "experts", None), MuseSparkExperts) for la in layers] == [0, 1, 1, 0]
    assert [(la.self_attn.rope, la.self_attn.sliding_window) for la in layers] == [
        ("default", 4), ("default", None), (None, 4), (None, None)]  # fmt: skip
    derived = autolm.AutoModelForCausalLM.from_pretrained(DERIVED.checkpoint(tmp_path_factory)[0])
    assert derived.config.mlp_layer_types == ["sparse"] * 5 and derived.config.layer_rope_theta[0] == 0
    assert derived.config.rope_parameters["rope_theta"] == 500_000.0
    assert (
        not derived.config.tie_word_embeddings
        and derived.lm_head.weight is not derived.model.embed_tokens.weight
    )
    hf = SPARK.checkpoint(tmp_path_factory)[1]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[real]
        experts = layers[1].mlp.experts
        experts.expert = lambda x, e: Experts.expert(experts, x, e)  # without post_expert_norm
        assert (model(ids, attention_mask=mask).logits[real] - theirs).abs().max() > 1e-3
        del experts.expert
        layers[0].post_attention_residual_gate.forward = lambda residual, x: residual + x
        assert (model(ids, attention_mask=mask).logits[real] - theirs).abs().max() > 1e-3


def test_generate(tmp_path_factory):
    SPARK.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SPARK.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SPARK.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    check_wrapper_lora(FAMILIES[name], tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name, bits", [("spark", "int8"), ("derived", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The language model's tensors under transformers' text names (the towers and the vision adapter skipped);
    saved, it is the muse_spark_text model: text_config's keys and values (untied whatever text_config said),
    transformers' MuseSparkTextModel loads it with hidden states whose head (times output_multiplier, soft-capped)
    gives autolm's logits, and autolm loads it back bit-identical."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "MuseSparkForCausalLM" and model.config.model_type == "muse_spark_text"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    assert written.pop("tie_word_embeddings") is False
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.AutoModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert type(text).__name__ == "MuseSparkTextModel"
    ids, mask = padded_batch()
    real = mask.bool()
    c = model.config
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        logits = text(ids, attention_mask=mask).last_hidden_state[real] @ model.lm_head.weight.T
        cap = c.final_logit_softcapping
        torch.testing.assert_close(
            ours, torch.tanh(logits * c.output_multiplier / cap) * cap, atol=1e-4, rtol=1e-4
        )
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


def test_default_config_is_transformers():
    """Every field autolm writes by default holds transformers' default (the derived lists alike); the wrapper's
    text config too, never tied."""
    check_config_defaults(MuseSparkTextConfig)
    for n in (1, 6):
        ours, theirs = (
            MuseSparkTextConfig(num_hidden_layers=n),
            transformers.MuseSparkTextConfig(num_hidden_layers=n),
        )
        for key in ("layer_types", "layer_rope_theta", "mlp_layer_types", "rope_parameters"):
            assert getattr(ours, key) == getattr(theirs, key), key
    written = transformers.MuseSparkConfig(
        text_config=dict(num_hidden_layers=2, tie_word_embeddings=True)
    ).to_dict()
    config = MuseSparkConfig.from_dict(json.loads(json.dumps(written)))
    assert type(config) is MuseSparkTextConfig and not config.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == 500_000.0 and config.to_dict()["hidden_act"] == "silu"
    assert "hidden_activation" not in config.to_dict()


@pytest.mark.parametrize(
    "key, bad",
    [("mlp_layer_types", ["dense", "moe"]), ("num_experts_per_tok", 300), ("moe_hidden_size", 0),
     ("residual_gate_temperature", -1.0), ("routed_scaling_factor", "x"), ("layer_rope_theta", None)],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    match = "experts|num_experts_per_tok" if key == "num_experts_per_tok" else key
    d = dict(num_hidden_layers=2, **{key: bad})
    if key == "layer_rope_theta":
        d[key] = [1.0, "x"]
    with pytest.raises(ConfigError, match=match):
        MuseSparkTextConfig.from_dict(d)
