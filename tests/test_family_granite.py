"""Granite against transformers: every multiplier away from 1 (embedding, residual, attention scale, logits),
GQA, q/k/v/o and MLP biases; the standard battery, GGUF as llama.cpp writes it, and its chat template."""

from __future__ import annotations

import pytest
from chat_checks import check_chat_template, check_cli
from family_checks import Family
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

GRANITE = Family(
    "GraniteConfig",
    dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        embedding_multiplier=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.09,
        logits_scaling=2.5,
        attention_bias=True,
        mlp_bias=True,
    ),
    lora_targets=["q_proj", "v_proj"],
)


def test_logits(tmp_path_factory):
    GRANITE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GRANITE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GRANITE.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GRANITE.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GRANITE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GRANITE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GRANITE.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    GRANITE.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    GRANITE.check_disk_offload(tmp_path_factory, tmp_path)


def test_gguf(tmp_path_factory, tmp_path):
    check_gguf(GRANITE, tmp_path_factory, tmp_path)


def test_chat_template(tmp_path):
    """Granite 3.3's: its default system message with today's date, documents, tools, and `controls`."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    documents = [{"doc_id": 1, "text": "Paris is the capital of France."}]
    variants = ({}, {"tools": tools}, {"documents": documents}, {"tools": tools, "documents": documents},
                {"documents": documents, "controls": {"citations": True}}, {"thinking": True})  # fmt: skip
    check_chat_template(tmp_path, "granite-3.3-2b-instruct.jinja", variants=variants)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(
        GRANITE.config_cls, dict(GRANITE.kwargs, max_position_embeddings=2048)
    )  # its template's long system turn
    check_cli(
        long, "granite-3.3-2b-instruct.jinja", tmp_path_factory, tmp_path, "GraniteForCausalLM (granite)"
    )


def test_config_errors_name_the_key():
    with pytest.raises(autolm.ConfigError, match="logits_scaling"):
        autolm.GraniteConfig(logits_scaling=0)
    with pytest.raises(autolm.ConfigError, match="embedding_multiplier"):
        autolm.GraniteConfig(embedding_multiplier="12")
