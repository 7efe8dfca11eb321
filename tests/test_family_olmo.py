"""OLMo (the first one: OLMo-1B-hf, OLMo-7B-hf, OLMo-7B-0424-hf) against transformers and peft: LayerNorms with no
parameters (fp32, epsilon 1e-5), q/k/v clamped to clip_qkv (small enough here to clip a good part of them), GQA,
a tied head; and a variant with biases on q/k/v/o, an untied head, no clipping, another RoPE base. The standard
battery, config.json in transformers' keys, GGUF as llama.cpp's converter writes "olmo" (in and out), OLMo
Instruct's chat template and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import OlmoConfig

CLIP = 0.8  # the q/k/v projections of the randomized weights have a standard deviation of about 1.2
# clipped q/k/v, GQA, a tied head (OLMo-1B's); widths divisible by 32 for int4
OLMO = Family(
    "OlmoConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, clip_qkv=CLIP, tie_word_embeddings=True),
    lora_targets=["q_proj", "k_proj", "v_proj", "down_proj"],  # peft has no default for olmo
)  # fmt: skip
# biases, an untied head (OLMo-7B's), no clipping, another RoPE base
VARIANT = Family(
    "OlmoConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         max_position_embeddings=64, attention_bias=True, rope_theta=500.0),
)  # fmt: skip
FAMILIES = {"olmo": OLMO, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    OLMO.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    OLMO.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OLMO.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    OLMO.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    OLMO.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    OLMO.check_disk_offload(tmp_path_factory, tmp_path)


def test_clipping_matters_and_is_transformers(tmp_path_factory):
    """The checkpoint's clip changes the logits (it clips), and without it both give the same other logits."""
    import transformers

    directory, _ = OLMO.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    unclipped = autolm.AutoModelForCausalLM.from_pretrained(directory, clip_qkv=None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        directory, clip_qkv=None, attn_implementation="eager"
    )
    assert (model.config.clip_qkv, unclipped.config.clip_qkv) == (CLIP, None)
    with torch.no_grad():
        clipped = model(ids, attention_mask=mask).logits[real]
        ours = unclipped(ids, attention_mask=mask).logits[real]
        want = theirs(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)
    assert (clipped - ours).abs().mean() > 0.05 * ours.abs().mean()


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (no norm parameters at all); config.json round-trips with
    transformers' keys only; transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert not any("norm" in k for k in model.state_dict())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "olmo") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors():
    """OlmoConfig() holds transformers' defaults (initializer_range, kept only where config.json has it, aside);
    bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.OlmoConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert OlmoConfig().to_dict() == theirs
    for change, key in ((dict(clip_qkv=0), "clip_qkv"), (dict(clip_qkv="8"), "clip_qkv"),
                        (dict(clip_qkv=True), "clip_qkv"), (dict(attention_bias="yes"), "attention_bias"),
                        (dict(hidden_act="swiglu"), "hidden_act")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            OlmoConfig(hidden_size=64, num_attention_heads=4, **change)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes olmo ---------------------------------------------------


def _olmo_metadata(w, c) -> None:
    """OlmoModel.set_gguf_parameters (conversion/olmo.py): TextModel's keys for a config with no head size and no
    norm epsilon of its own (sizes, head counts, RoPE base), the LayerNorm epsilon 1e-5, clamp_kqv where clip_qkv
    is set. Its modify_tensors permutes q/k rows as LlamaModel does."""
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_eps(1e-5)
    if c.clip_qkv is not None:
        w.add_clamp_kqv(c.clip_qkv)


CONVERTERS.setdefault("olmo", ("olmo", _olmo_metadata, True))


def write_olmo_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' OLMo `hf` (F32)."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """Clipping (attention.clamp_kqv), permuted q/k with GQA and a tied head read back: transformers' logits."""
    model, _ = check_gguf(OLMO, tmp_path_factory, tmp_path)
    c = model.config
    assert c.clip_qkv == pytest.approx(CLIP) and c.tie_word_embeddings and c.num_key_value_heads == 2


def test_gguf_out_refuses_biases(tmp_path_factory, tmp_path, smol_gguf):
    """llama.cpp's olmo reads no q/k/v/o biases: a model with them is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tok = autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])
    with pytest.raises(ConfigError, match="attention_bias"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- chat template (OLMo-7B-Instruct-hf's tokenizer_config.json) and the command line ---------------------------

OLMO_INSTRUCT_TEMPLATE = (
    "{{ eos_token }}{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
    "message['content'] }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] "
    "+ eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}"
    "\n{% endfor %}"
)


def _template(tmp_path) -> str:
    """The template as a file (an absolute path: chat_checks reads it from there)."""
    path = tmp_path / "olmo-7b-instruct.jinja"
    path.write_text(OLMO_INSTRUCT_TEMPLATE)
    return str(path)


def test_chat_template(tmp_path):
    ours = check_chat_template(tmp_path / "tok", _template(tmp_path), eos_token="</s>")
    text = ours.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    assert text == "</s><|user|>\nHi\n<|assistant|>\n\nHello!</s>\n"
    prompt = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=False)
    assert prompt == "</s><|user|>\nWhat is the capital of France?\n<|assistant|>\n"


def test_cli(tmp_path_factory, tmp_path):
    check_cli(OLMO, _template(tmp_path), tmp_path_factory, tmp_path, "OlmoForCausalLM (olmo)")
