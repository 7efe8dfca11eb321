"""Muse Glimmer's language model (muse_glimmer_text; muse_glimmer: the image-text checkpoints) against transformers'
MuseGlimmerForConditionalGeneration (a tiny vision tower; transformers has no text-only causal LM) and peft.

Two checkpoints: GLIMMER (every quirk set by hand: a sliding layer without RoPE and a full layer with it, another
theta in layer_rope_theta (transformers rotates with rope_parameters' theta), qk_scale_factor, output_multiplier and a
soft-cap that matter, post_norm_eps apart from rms_norm_eps, a window shorter than the prompts) and DERIVED
(transformers' derived layer_types and layer_rope_theta, attention biases, the GeLU-tanh activation, the head tied by
the outer config). The battery (a padded batch's logits, generate with beams, bf16, the eager one-token step and the
compiled step, LoRA vs peft, int8 / int4, disk offload), the wrapper's head tying (the outer config's alone: the text
config's is ignored), the text model saved (transformers' MuseGlimmerTextModel loads it; autolm reads it back), config
defaults and errors naming the field. GGUF in and out (llama.cpp's "muse-glimmer"): tests/test_muse_glimmer_gguf.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import Family, check_config_defaults, check_wrapper_lora
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.muse_glimmer import MuseGlimmerConfig, MuseGlimmerTextConfig

# transformers maps muse_glimmer to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.MuseGlimmerConfig, transformers.MuseGlimmerForConditionalGeneration, exist_ok=True
)
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, pos_emb_height=4,
              pos_emb_width=4, patch_size=4)  # fmt: skip
WRAPPER = dict(vision_config=VISION, out_hidden_size=128, projector_hidden_size=32)
SIZES = dict(TOKENS, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, sliding_window=4, qk_scale_factor=2.0, output_multiplier=0.5,
             final_logit_softcapping=3.0, post_norm_eps=1e-3)  # fmt: skip
TEXT = dict(SIZES, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention", "sliding_attention",
            "full_attention"], layer_rope_theta=[10000.0, 500.0, 0, 0])  # fmt: skip
DERIVED_TEXT = dict(SIZES, num_hidden_layers=5, attention_bias=True, hidden_activation="gelu_pytorch_tanh",
                    rope_parameters={"rope_type": "default", "rope_theta": 1000.0})  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
GLIMMER = Family("MuseGlimmerConfig", dict(WRAPPER, text_config=TEXT), lora_targets=TARGETS)
DERIVED = Family("MuseGlimmerConfig", dict(WRAPPER, text_config=DERIVED_TEXT, tie_word_embeddings=True),
                 lora_targets=["q_proj", "v_proj"])  # fmt: skip
FAMILIES = {"glimmer": GLIMMER, "derived": DERIVED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_layers_and_quirks(tmp_path_factory):
    """The layers' RoPE and windows as layer_rope_theta and layer_types say (derived where absent); dropping the
    head's multiplier or the queries' scale changes the logits."""
    model = autolm.AutoModelForCausalLM.from_pretrained(GLIMMER.checkpoint(tmp_path_factory)[0])
    attns = [layer.self_attn for layer in model.model.layers]
    assert [(a.rope, a.sliding_window) for a in attns] == [
        ("default", 4),
        ("default", None),
        (None, 4),
        (None, None),
    ]
    derived = autolm.AutoModelForCausalLM.from_pretrained(DERIVED.checkpoint(tmp_path_factory)[0])
    assert derived.config.layer_types == ["full_attention", *["sliding_attention"] * 3, "full_attention"]
    assert derived.config.layer_rope_theta == [0, 1000.0, 1000.0, 1000.0, 0]
    assert [a.self_attn.rope for a in derived.model.layers] == [None, "default", "default", "default", None]
    hf = GLIMMER.checkpoint(tmp_path_factory)[1]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[real]
        model.output_multiplier = 1.0
        assert (model(ids, attention_mask=mask).logits[real] - theirs).abs().max() > 1e-2
        model.output_multiplier = 0.5
        attns[0].scaling = 16**-0.5
        assert (model(ids, attention_mask=mask).logits[real] - theirs).abs().max() > 1e-3


def test_generate(tmp_path_factory):
    GLIMMER.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GLIMMER.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GLIMMER.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    check_wrapper_lora(FAMILIES[name], tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name, bits", [("glimmer", "int8"), ("derived", "int4")])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    GLIMMER.check_disk_offload(tmp_path_factory, tmp_path)


def _wrapper(tmp_path_factory, outer_tie, text_tie):
    """transformers' image-text model with the head tied (or not) by the outer / text config, saved."""
    kwargs = {} if outer_tie is None else dict(tie_word_embeddings=outer_tie)
    config = transformers.MuseGlimmerConfig(
        text_config=dict(TEXT, tie_word_embeddings=text_tie), **WRAPPER, **kwargs
    )
    torch.manual_seed(0)
    model = transformers.MuseGlimmerForConditionalGeneration(config)
    randomize(model)
    model.tie_weights()
    directory = tmp_path_factory.mktemp("muse_glimmer_tie")
    model.save_pretrained(directory)
    return str(directory), model.eval()


@pytest.mark.parametrize("outer_tie, text_tie", [(None, True), (True, False), (False, True)])
def test_wrapper_ties_as_transformers(tmp_path_factory, outer_tie, text_tie):
    """The image-text model ties its head by the outer config alone (text_config's setting ignored): autolm's head
    is tied exactly where transformers' is, with its logits over a left-padded batch (and, tied, its greedy tokens)."""
    directory, hf = _wrapper(tmp_path_factory, outer_tie, text_tie)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tied = hf.lm_head.weight is hf.get_input_embeddings().weight
    assert tied == bool(outer_tie) == model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours, hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )
    if tied:  # greedy tokens (the untied head's: test_generate)
        prompt = ids[:1, -9:]
        theirs = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
        )
        assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), theirs)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The language model's tensors under transformers' text names (the vision tower and adapter skipped); saved, it
    is the muse_glimmer_text model: text_config's keys and values, transformers' MuseGlimmerTextModel loads it with
    hidden states whose head (times output_multiplier, soft-capped) gives autolm's logits, and autolm loads it back
    bit-identical."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "MuseGlimmerForCausalLM" and model.config.model_type == "muse_glimmer_text"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    assert written.pop("tie_word_embeddings") == (name == "derived")
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.AutoModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert type(text).__name__ == "MuseGlimmerTextModel"
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
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == (name == "derived")


def test_default_config_is_transformers():
    """Every field autolm writes by default holds transformers' default (layer_types and layer_rope_theta derived
    alike); the wrapper's text config too, untied."""
    check_config_defaults(MuseGlimmerTextConfig)
    for n in (1, 6, 9):
        ours, theirs = (
            MuseGlimmerTextConfig(num_hidden_layers=n),
            transformers.MuseGlimmerTextConfig(num_hidden_layers=n),
        )
        assert ours.layer_types == theirs.layer_types and ours.layer_rope_theta == theirs.layer_rope_theta
    written = transformers.MuseGlimmerConfig(text_config=dict(num_hidden_layers=2)).to_dict()
    config = MuseGlimmerConfig.from_dict(json.loads(json.dumps(written)))
    assert type(config) is MuseGlimmerTextConfig and not config.tie_word_embeddings
    assert config.to_dict()["hidden_activation"] == "silu" and "query_pre_attn_scalar" not in config.to_dict()


@pytest.mark.parametrize(
    "key, bad",
    [("qk_scale_factor", 0), ("output_multiplier", "x"), ("final_logit_softcapping", None), ("post_norm_eps", 2.0),
     ("layer_rope_theta", [1.0]), ("layer_rope_theta", [1.0, -1.0])],
)  # fmt: skip
def test_config_errors_name_the_key(key, bad):
    with pytest.raises(ConfigError, match=key):
        MuseGlimmerTextConfig.from_dict(dict(num_hidden_layers=2, **{key: bad}))
