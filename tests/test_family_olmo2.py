"""OLMo 2 against transformers: post-sublayer norms, q/k norms over the whole projection, OLMo's fp32 norm
weights, GQA, q/k/v/o biases; the standard battery, GGUF as llama.cpp writes it (of a checkpoint without biases,
which llama.cpp's olmo2 cannot run; the biased one refused on GGUF out), and its chat template."""

from __future__ import annotations

import pytest
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from family_checks import Family
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

OLMO2 = Family(
    "Olmo2Config",
    dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
    ),
    lora_targets=["q_proj", "v_proj"],
)
# what llama.cpp's olmo2 runs (OLMo 2's released shape): no biases (it loads no attn_output.bias), untied head
OLMO2_GGUF = Family("Olmo2Config", dict(OLMO2.kwargs, attention_bias=False))


def test_logits(tmp_path_factory):
    OLMO2.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    OLMO2.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    OLMO2.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    OLMO2.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OLMO2.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    OLMO2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    OLMO2.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    OLMO2.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    OLMO2.check_disk_offload(tmp_path_factory, tmp_path)


def test_gguf(tmp_path_factory, tmp_path):
    check_gguf(OLMO2_GGUF, tmp_path_factory, tmp_path)


@pytest.mark.parametrize(
    ("family", "field"),
    [
        (OLMO2, "attention_bias"),
        (Family("Olmo2Config", dict(OLMO2_GGUF.kwargs, tie_word_embeddings=True)), "tie_word_embeddings"),
        (Family("Olmo2Config", dict(OLMO2_GGUF.kwargs, head_dim=32)), "head_dim"),
    ],
    ids=["bias", "tied", "head_dim"],
)
def test_gguf_out_refuses(family, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Biases (llama.cpp's olmo2 loads no attn_output.bias), a tied head (it requires output.weight), a head size
    but hidden_size / heads (its graph takes that): a ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'olmo2' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_chat_template(tmp_path):
    ours = check_chat_template(tmp_path, "olmo-2-1124-instruct.jinja", bos_token="<s>", eos_token="</s>")
    text = ours.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    assert text == "<s><|user|>\nHi\n<|assistant|>\n\nHello!</s>"


def test_cli(tmp_path_factory, tmp_path):
    check_cli(OLMO2, "olmo-2-1124-instruct.jinja", tmp_path_factory, tmp_path, "Olmo2ForCausalLM (olmo2)")
