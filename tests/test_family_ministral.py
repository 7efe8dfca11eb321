"""Ministral (Ministral-8B-Instruct-2410, model_type ministral) against transformers and peft: Mistral's layer
with a sliding window by layer (layer_types: sliding and full layers interleaved), GQA; every layer sliding where
config.json gives no layer_types; no window at all, a head size apart from hidden / heads and a tied head. The
standard battery, config.json in transformers' keys (layer_types derived, head_dim null), no GGUF layout (llama.cpp
converts no MinistralForCausalLM), the CLI."""

from __future__ import annotations

import json
import os

import pytest
from chat_checks import check_cli
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError
from autolm.models import MinistralConfig

# head_dim given: transformers' Ministral attention cannot derive it from null
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=64)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
# a window of 4 on layers 0 and 2, full attention on layer 1; GQA; an untied head
MINISTRAL = Family(
    "MinistralConfig",
    dict(SIZES, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    lora_targets=TARGETS,
)
# no layer_types: every layer slides (window 3); another RoPE base
ALL_SLIDING = Family(
    "MinistralConfig",
    dict(SIZES, sliding_window=3, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    lora_targets=TARGETS,
)
# full attention on every layer (transformers' Ministral needs a sliding_window even so); head_dim 24 (not 64 / 4);
# a tied head
FULL = Family(
    "MinistralConfig",
    dict(SIZES, sliding_window=4, layer_types=["full_attention"] * 3, head_dim=24, tie_word_embeddings=True),
    lora_targets=TARGETS,
)
FAMILIES = {"ministral": MINISTRAL, "all_sliding": ALL_SLIDING, "full": FULL}
WINDOWS = {"ministral": [4, None, 4], "all_sliding": [3, 3, 3], "full": [None, None, None]}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["ministral", "full"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MINISTRAL.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    MINISTRAL.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MINISTRAL.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    MINISTRAL.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MINISTRAL.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    MINISTRAL.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only;
    transformers' tensor-parallel plan; each layer's window as layer_types says."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert type(model).__name__ == "MinistralForCausalLM"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "full") and ("lm_head" in model.tp_plan()) == (not tied)
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == WINDOWS[name]


def test_default_config_and_errors():
    """MinistralConfig() holds transformers' defaults (layer_types derived; initializer_range, kept only where
    config.json has it, aside); bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.MinistralConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert MinistralConfig().to_dict() == theirs
    none = MinistralConfig(num_hidden_layers=2, sliding_window=None)
    assert none.layer_types == ["full_attention"] * 2 and none.layer_window(0) is None
    assert none.to_dict()["head_dim"] is None and MinistralConfig(head_dim=128).to_dict()["head_dim"] == 128
    for change, key in ((dict(layer_types=["sliding_attention"]), "layer_types"),
                        (dict(layer_types=["local", "global"]), "layer_types"),
                        (dict(sliding_window=0), "sliding_window"), (dict(hidden_act="relu3"), "hidden_act"),
                        (dict(num_key_value_heads=3), "num_key_value_heads")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            MinistralConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "num_hidden_layers": 2, **change})  # fmt: skip


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


def test_gguf_out_is_refused(tmp_path_factory, tmp_path, byte_tokenizer):
    """No llama.cpp architecture holds Ministral (its llama graph has no window; a llama file would load as Llama):
    GGUF out is refused by model type, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(MINISTRAL.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="ministral"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


def test_cli(tmp_path_factory, tmp_path):
    """Mistral's [INST] format (Mixtral's template; Ministral-8B-Instruct-2410's is not in tests/data)."""
    long = Family("MinistralConfig", {**MINISTRAL.kwargs, "max_position_embeddings": 256})
    check_cli(long, "mixtral-8x7b-instruct-v0.1.jinja", tmp_path_factory, tmp_path,
              "MinistralForCausalLM (ministral)")  # fmt: skip
