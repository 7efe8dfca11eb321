"""GLM-4 (GLM-4-9B/32B-0414, GLM-Z1) against transformers and peft: four RMSNorms per layer (the attention and MLP
outputs normed again before the residual adds), q/k/v biases, a packed gate_up_proj, partial RoPE over interleaved
pairs (half of each head by default), head_dim != hidden / heads, GQA, an untied head (and a tied one, which the
config allows). The standard battery, config.json as transformers writes it and as GLM-4-0414 ships it (v4
spelling, partial_rotary_factor at the top level), GGUF as llama.cpp's converter writes glm4 (in and out), and
the CLI (no chat template: GLM-4-0414's is not among the test data)."""

from __future__ import annotations

import json

import pytest
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
# peft has no default target modules for glm4
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
# GLM-4-0414's shape: biases, untied head, head_dim (32) twice hidden / heads, 16 of its 32 dimensions rotary
GLM4 = Family("Glm4Config", dict(_SHAPE, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                                       "partial_rotary_factor": 0.5}),
              lora_targets=_TARGETS)  # fmt: skip
# what the config allows besides: no biases, tied embeddings, head_dim 16 with a quarter of it rotary
TIED = Family("Glm4Config", dict(_SHAPE, head_dim=16, attention_bias=False, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.25}),
              lora_targets=["q_proj", "gate_up_proj"])  # fmt: skip
FAMILIES = {"glm4": GLM4, "tied_nobias": TIED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GLM4.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GLM4.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GLM4.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GLM4.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    GLM4.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (the four norms, gate_up_proj, no o_proj bias);
    the saved config.json has transformers' keys and values, no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """Glm4Config() holds transformers' defaults (head_dim 128, 2 KV heads, partial_rotary_factor 0.5 in the RoPE
    parameters, three EOS ids, rms_norm_eps 1.5625e-7, ...); initializer_range, kept only where given, aside."""
    import transformers

    from autolm.models.glm4 import Glm4Config

    theirs = json.loads(transformers.Glm4Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Glm4Config().to_dict() == theirs


def test_glm4_0414_config_spelling(tmp_path_factory, tmp_path):
    """GLM-4-0414's config.json as shipped: rope_theta and partial_rotary_factor at the top level, no RoPE
    parameters: the same model, saved back in that spelling, which transformers loads with equal logits; with no
    factor anywhere, transformers' 0.5."""
    config = GLM4.check_top_level_rope(
        tmp_path_factory, tmp_path, {"rope_theta": 1000.0, "partial_rotary_factor": 0.5}
    )
    assert config.rope_parameters == GLM4.checkpoint(tmp_path_factory)[1].config.rope_parameters
    path = tmp_path / "v4" / "config.json"
    path.write_text(
        json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "partial_rotary_factor"})
    )
    assert autolm.AutoConfig.from_pretrained(tmp_path / "v4").rope_parameters["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(partial_rotary_factor=0), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(partial_rotary_factor="0.5"), "partial_rotary_factor"),
        (dict(head_dim=16, partial_rotary_factor=0.3125), "partial_rotary_factor 0.3125 gives 5"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="glm4", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes glm4 -----------------------------------------------------


def _glm4(w, c) -> None:
    """Glm4Model.set_gguf_parameters (conversion/glm.py): TextModel's keys (sizes, head counts, the RoPE base, the
    RMS epsilon, the head size as key/value length: transformers' config.json always has head_dim; no vocabulary
    size), then the rotary dimensions int(head_dim * partial_rotary_factor)."""
    add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 0.5)))


# q/k not permuted: llama.cpp's glm4 rotates interleaved pairs, as transformers' GLM-4 does (the converter permutes
# only for M-RoPE, which Glm4ForCausalLM checkpoints do not use)
CONVERTERS.setdefault("glm4", ("glm4", _glm4, False))


def write_glm4_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter writes of transformers' GLM-4 model `hf` (gate_up_proj whole as ffn_up, the
    post norms as post_attention_norm / post_ffw_norm, an output tensor where the head is untied)."""
    write_gguf(hf, path)


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as Glm4ForCausalLM with transformers' logits: the head size from key_length, the
    rotary share from rope.dimension_count, biases and the tied head from the tensors present."""
    model, hf = check_gguf(FAMILIES[name], tmp_path_factory, tmp_path)
    c, want = model.config, hf.config
    assert c.model_type == "glm4" and (c.head_dim, c.num_key_value_heads) == (want.head_dim, 2)
    assert (c.attention_bias, c.tie_word_embeddings) == (want.attention_bias, want.tie_word_embeddings)
    rope = c.rope_parameters
    assert (rope["rope_theta"], rope["partial_rotary_factor"]) == pytest.approx(
        (want.rope_parameters["rope_theta"], want.rope_parameters["partial_rotary_factor"])
    )


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; `autolm inspect` names the class and type; with
    no chat template `autolm chat` says so."""
    check_cli_without_template(GLM4, tmp_path_factory, tmp_path, "Glm4ForCausalLM (glm4)")
