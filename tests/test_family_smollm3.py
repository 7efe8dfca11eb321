"""SmolLM3 against transformers: every second layer without RoPE (NoPE) and with a sliding window of 5 slots,
GQA, tied embeddings; the standard battery, GGUF as llama.cpp writes it, and its chat template."""

from __future__ import annotations

import pytest
from chat_checks import CONVERSATIONS, check_chat_template, check_cli
from family_checks import Family
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

SMOLLM3 = Family(
    "SmolLM3Config",
    dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        no_rope_layer_interval=2,
        use_sliding_window=True,
        sliding_window=5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    lora_targets=["q_proj", "v_proj"],
)


def test_logits(tmp_path_factory):
    SMOLLM3.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    SMOLLM3.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SMOLLM3.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SMOLLM3.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SMOLLM3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    SMOLLM3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SMOLLM3.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    SMOLLM3.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    SMOLLM3.check_disk_offload(tmp_path_factory, tmp_path)


# What a GGUF can hold: llama.cpp's SmolLM3 fixes the NoPE interval at 4 (the default) and has no sliding window
SMOLLM3_GGUF = Family("SmolLM3Config", dict(SMOLLM3.kwargs, num_hidden_layers=4, no_rope_layer_interval=4,
                                            use_sliding_window=False, sliding_window=None))  # fmt: skip


def test_gguf(tmp_path_factory, tmp_path):
    check_gguf(SMOLLM3_GGUF, tmp_path_factory, tmp_path)


def test_chat_template(tmp_path):
    """SmolLM3's: reasoning on by default, off with enable_thinking=False or a system message saying /no_think
    (and on again with /think), the system message replaced by /system_override, XML and Python tools."""
    conversations = [
        *CONVERSATIONS,
        [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Think hard /think"}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Only this. /system_override"}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}],
    ]
    tool = {"name": "get_weather", "description": "Weather in a city", "parameters": {"city": "string"}}
    variants = ({}, {"enable_thinking": False}, {"enable_thinking": True}, {"xml_tools": [tool]},
                {"python_tools": [tool], "enable_thinking": False})  # fmt: skip
    ours = check_chat_template(tmp_path, "smollm3-3b.jinja", conversations, variants)
    no_think = ours.apply_chat_template(conversations[3], add_generation_prompt=True, tokenize=False)
    assert "Reasoning Mode: /no_think" in no_think and no_think.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n"
    )


def test_cli(tmp_path_factory, tmp_path):
    long = Family(
        SMOLLM3.config_cls, dict(SMOLLM3.kwargs, max_position_embeddings=2048)
    )  # its template's long system turn
    check_cli(long, "smollm3-3b.jinja", tmp_path_factory, tmp_path, "SmolLM3ForCausalLM (smollm3)")


def test_config_defaults_and_errors():
    """transformers' derivations: no_rope_layers from the interval, layer_types from both (sliding only on NoPE
    layers, only with use_sliding_window), the 2e6 RoPE base; a wrong no_rope_layers names the key."""
    import transformers

    kw = dict(num_hidden_layers=8, use_sliding_window=True, sliding_window=16)
    ours, theirs = autolm.SmolLM3Config(**kw), transformers.SmolLM3Config(**kw)
    assert ours.no_rope_layers == theirs.no_rope_layers and ours.layer_types == theirs.layer_types
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 2000000.0
    with pytest.raises(autolm.ConfigError, match="no_rope_layers must list 8"):
        autolm.SmolLM3Config(num_hidden_layers=8, no_rope_layers=[1, 0])
