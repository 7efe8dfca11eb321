"""ERNIE 4.5 (the dense one: ERNIE-4.5-0.3B-PT) against transformers and peft: RoPE over interleaved pairs in fp32,
GQA, head_dim set apart from hidden / heads, a tied head; and a variant with `use_bias` (biases on q/k/v/o and
gate/up/down), an untied head, a wider head and another RoPE base. The standard battery, config.json in
transformers' keys, GGUF as llama.cpp's converter writes "ernie4_5" (in and out), a chat template and the CLI."""

from __future__ import annotations

import json
import os

import pytest
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError
from autolm.models.ernie4_5 import Ernie4_5Config

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
# ERNIE-4.5-0.3B's shape: no biases, a tied head, GQA; head_dim given (transformers' default is 128)
ERNIE = Family(
    "Ernie4_5Config",
    dict(_SHAPE, head_dim=16),
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],  # peft has no default for ernie4_5
)
# what the config allows besides: use_bias, an untied head, head_dim 32 (twice hidden / heads), RoPE base 1000
VARIANT = Family(
    "Ernie4_5Config",
    dict(_SHAPE, head_dim=32, use_bias=True, tie_word_embeddings=False,
         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    lora_targets=["q_proj", "up_proj"],
)  # fmt: skip
FAMILIES = {"ernie4_5": ERNIE, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ERNIE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ERNIE.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ERNIE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    ERNIE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (MLP biases where use_bias); config.json round-trips with
    transformers' keys only; transformers' tensor-parallel plan; the head tied where the config says."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert ("model.layers.0.mlp.up_proj.bias" in model.state_dict()) == (name == "variant")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "ernie4_5") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors(tmp_path):
    """Ernie4_5Config() holds transformers' defaults (head_dim 128, 2 KV heads, RoPE base 500000, a tied head;
    initializer_range, kept only where config.json has it, aside); a config.json with no RoPE base gets 500000;
    bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.Ernie4_5Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Ernie4_5Config().to_dict() == theirs
    base = dict(model_type="ernie4_5", hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert autolm.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 500000.0
    for change, key in ((dict(use_bias="no"), "use_bias"), (dict(hidden_act="swiglu"), "hidden_act"),
                        (dict(head_dim=0), "head_dim")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes ernie4_5 -------------------------------------------------


def _ernie4_5_metadata(w, c) -> None:
    """Ernie4_5Model.set_gguf_parameters (conversion/ernie.py) is TextModel's: sizes, head counts, the RoPE base,
    the RMS epsilon, the head size as key/value length (transformers' config.json always has head_dim); no
    vocabulary size, no rope.dimension_count. Its modify_tensors only splits fused qkv_proj / up_gate_proj
    (transformers' checkpoints have none): q/k rows are not permuted."""
    add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


CONVERTERS.setdefault("ernie4_5", ("ernie4_5", _ernie4_5_metadata, False))


def write_ernie4_5_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' ERNIE 4.5 `hf` (F32; no output tensor when tied)."""
    write_gguf(hf, path)


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as Ernie4_5ForCausalLM with transformers' logits: the head size from key_length,
    the biases and the tied head from the tensors present."""
    model, hf = check_gguf(FAMILIES[name], tmp_path_factory, tmp_path)
    c, want = model.config, hf.config
    assert c.model_type == "ernie4_5" and (c.head_dim, c.num_key_value_heads) == (want.head_dim, 2)
    assert (c.use_bias, c.tie_word_embeddings) == (want.use_bias, want.tie_word_embeddings)
    assert c.rope_parameters["rope_theta"] == pytest.approx(want.rope_parameters["rope_theta"])


def test_gguf_out_refuses_use_bias(tmp_path_factory, tmp_path):
    """llama.cpp's ernie4_5 reads no MLP biases: a use_bias model is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tok = _byte_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match="use_bias"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- a chat template and the command line -----------------------------------------------------------------------

# the shape of ERNIE-4.5-0.3B-PT's template ("User: ... / Assistant: ..." after a begin-of-sentence token), with
# this test vocabulary's special tokens
ERNIE_TEMPLATE = (
    "{%- if not cls_token is defined -%}{%- set cls_token = '<s>' -%}{%- endif -%}"
    "{%- if not sep_token is defined -%}{%- set sep_token = '</s>' -%}{%- endif -%}"
    "{{- cls_token -}}{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + message['content'] + sep_token -}}"
    "{%- elif message['role'] == 'system' -%}{{- message['content'] + '\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def _template(tmp_path) -> str:
    """The template as a file (an absolute path: chat_checks reads it from there)."""
    path = tmp_path / "ernie4_5.jinja"
    path.write_text(ERNIE_TEMPLATE)
    return str(path)


def test_chat_template(tmp_path):
    ours = check_chat_template(tmp_path / "tok", _template(tmp_path))
    prompt = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>User: What is the capital of France?\nAssistant: "
    text = ours.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    assert text == "<s>User: Hi\nAssistant: \nHello!</s>"


def test_cli(tmp_path_factory, tmp_path):
    check_cli(ERNIE, _template(tmp_path), tmp_path_factory, tmp_path, "Ernie4_5ForCausalLM (ernie4_5)")
