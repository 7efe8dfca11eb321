"""Jais 2 (inceptionai/Jais-2-8B-Chat) against transformers and peft: Llama's layer with LayerNorms (weight and bias)
and Nemotron's ungated relu2 MLP, biases on q/k/v/o and the MLP (transformers' defaults), GQA, linear RoPE scaling;
and a variant without biases, MHA, a head size apart from hidden / heads, a tied head and another epsilon. The
standard battery, config.json in transformers' keys, GGUF as llama.cpp's converter writes "jais2" (in, and out byte
for byte; llama.cpp itself runs autolm's file in tests/test_gguf_llamacpp.py), and what llama.cpp's jais2 graph
cannot run (no biases, Llama 3's RoPE scaling, another activation) refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from gguf_llamacpp import CONVERTERS, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.jais2 import Jais2Config

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # peft has no default for jais2
# Jais-2's shape: q/k/v/o and MLP biases (the defaults), GQA, an untied head; linear RoPE scaling on another base
JAIS2 = Family(
    "Jais2Config",
    dict(SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    lora_targets=TARGETS,
)
# no biases anywhere but the LayerNorms', MHA, head_dim 24 (not 64 / 4), a tied head, another epsilon
PLAIN = Family(
    "Jais2Config",
    dict(SMALL, num_key_value_heads=4, head_dim=24, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
         layer_norm_eps=1e-3),
)  # fmt: skip
FAMILIES = {"jais2": JAIS2, "plain": PLAIN}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    JAIS2.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    JAIS2.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    JAIS2.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    JAIS2.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft

    from autolm.errors import AdapterError

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(hf, peft.LoraConfig())
    with pytest.raises(AdapterError, match="jais2"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    JAIS2.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the checkpoint's tensor names (the LayerNorms' biases, the MLP's
    up_proj / down_proj, no gate_proj) and config.json's keys and values."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.norm.bias", "model.layers.1.post_attention_layernorm.bias"} <= saved
    assert not any("gate_proj" in k for k in saved)
    assert ("model.layers.1.self_attn.o_proj.bias" in saved) == (name == "jais2")


def test_disk_offload(tmp_path_factory, tmp_path):
    JAIS2.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only (no
    rms_norm_eps, no window); transformers' tensor-parallel plan (Nemotron's: no gate_proj)."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert type(model).__name__ == "Jais2ForCausalLM"
    layer = model.model.layers[0]
    assert type(layer.input_layernorm) is torch.nn.LayerNorm and type(model.model.norm) is torch.nn.LayerNorm
    assert layer.self_attn.sliding_window is None


def test_default_config_is_transformers():
    """Jais2Config() holds transformers' defaults (Jais-2-8B's sizes, relu2, both biases on, layer_norm_eps 1e-5,
    bos 0, eos 150024); initializer_range, kept only where config.json has it, aside."""
    import transformers

    check_config_defaults(Jais2Config)
    theirs = json.loads(transformers.Jais2Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Jais2Config().to_dict() == theirs


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(layer_norm_eps="x"), "layer_norm_eps"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(mlp_bias=1), "mlp_bias"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="swiglu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        Jais2Config(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                       **change})  # fmt: skip


# ---- GGUF, as llama.cpp's converter (Jais2Model, conversion/jais.py) writes jais2 ----------------------------------


def _jais2_metadata(w, c) -> None:
    """Jais2Model.set_gguf_parameters: TextModel's keys (sizes, head counts, the RoPE scaling and base, the LayerNorm
    epsilon, the head size as config.json holds head_dim), then the rotary dimensions as the head size."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_parameters
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)


CONVERTERS.setdefault("jais2", ("jais2", _jais2_metadata, False))  # q/k not permuted (NeoX RoPE)


def write_jais2_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter writes of transformers' Jais 2 model `hf`: Jais2Model's keys, gguf-py's tensor
    names (the LayerNorms' biases as *_norm.bias), q/k not permuted, a plain vocabulary."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file: transformers' logits; the config read back from jais2.* metadata and the tensors
    present (biases, epsilon, linear RoPE scaling, head size, untied head)."""
    _, hf = JAIS2.checkpoint(tmp_path_factory)
    write_jais2_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "Jais2ForCausalLM"
    ours, theirs = model.config, hf.config
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings", "num_key_value_heads", "head_dim",
                "intermediate_size", "hidden_act"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.layer_norm_eps == pytest.approx(theirs.layer_norm_eps)
    assert (ours.rope_parameters["rope_type"], ours.rope_parameters["factor"]) == ("linear", 2.0)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


def test_gguf_out_is_the_converters_file(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf writes the converter's metadata and tensors (no vocabulary size, no RMS epsilon); the file loads
    back with the model's logits."""
    from test_gguf_out import IDS, _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = JAIS2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_jais2_gguf(hf, str(tmp_path / "ref.gguf"))
    ours = GGUFFile(path)
    _same_file(ours, GGUFFile(str(tmp_path / "ref.gguf")))
    assert not {"jais2.vocab_size", "jais2.attention.layer_norm_rms_epsilon"} & set(ours.metadata)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(attention_bias=False, mlp_bias=False), "attention_bias, mlp_bias"),
        (dict(mlp_bias=False), "mlp_bias"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
         "rope_parameters"),
        (dict(hidden_act="silu"), "hidden_act"),
    ],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_cannot_run(change, match, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's jais2 graph loads every bias and computes relu2; its converter drops Llama 3's RoPE scaling: such
    a model is refused naming the field, and no file is written."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.jais2 import Jais2ForCausalLM

    config = Jais2Config(**{**SMALL, "vocab_size": 300, **change})
    model = Jais2ForCausalLM(config)
    with pytest.raises(ConfigError, match=match):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_gguf_in_refuses_a_file_without_biases(tmp_path_factory, tmp_path):
    """A jais2 file without the attention and MLP biases (which llama.cpp's graph cannot load) is refused naming
    them."""
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    write_jais2_gguf(hf, str(tmp_path / "m.gguf"))
    with pytest.raises(ConfigError, match="attention_bias, mlp_bias"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
