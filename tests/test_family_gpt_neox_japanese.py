"""GPT-NeoX Japanese against transformers and peft: GPT-NeoX's fused query_key_value laid out per head, no biases
on the Linear layers, the last layer's `dense_bias` added after its attention, the sequential residual, an MLP
intermediate_multiple_size times hidden_size wide. Checkpoints: transformers' defaults in small (the whole head
rotated, a tied head, GELU); and three layers, a quarter of each head rotated with another base, another multiple,
epsilon and GELU, an untied head (`embed_out` on disk). The standard battery, transformers' names (`lm_head` in the
model, as GPT-NeoX's) and config.json, abeja's config.json in transformers 4's keys (rotary_pct, rotary_emb_base)
with old files' buffers, the config's defaults and errors. llama.cpp has no GPT-NeoX Japanese: no GGUF."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB
from family_checks import Family, check_config_defaults, same_logits
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.gpt_neox_japanese import GPTNeoXJapaneseConfig

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2,
             max_position_embeddings=64)  # fmt: skip
JAPANESE = Family("GPTNeoXJapaneseConfig", SMALL, lora_targets=["query_key_value", "dense_h_to_4h"])
QUARTER = Family(
    "GPTNeoXJapaneseConfig",
    dict(SMALL, num_hidden_layers=3, intermediate_multiple_size=3, tie_word_embeddings=False, hidden_act="gelu_fast",
         layer_norm_eps=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}),
)  # fmt: skip
FAMILIES = {"japanese": JAPANESE, "quarter": QUARTER}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    JAPANESE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    QUARTER.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    JAPANESE.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = JAPANESE.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="gpt_neox_japanese"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    QUARTER.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_names_and_config(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves (equal logits); the file holds transformers' names (the head as
    embed_out) and config.json its keys and values; the model's names are transformers' but the head's (`lm_head`),
    the last layer alone holding dense_bias; the body answers to autolm's names too."""
    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = {k.replace("embed_out.", "lm_head."): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original
    saved = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert saved == set(load_file(os.path.join(directory, "model.safetensors")))
    assert ("embed_out.weight" in saved) == (name == "quarter")
    last = hf.config.num_hidden_layers - 1
    biases = {k for k in model.state_dict() if k.endswith("dense_bias")}
    assert biases == {f"gpt_neox_japanese.layers.{last}.attention.dense_bias"}
    assert (
        model.model is model.gpt_neox_japanese
        and model.model.norm is model.gpt_neox_japanese.final_layer_norm
    )
    assert model.get_input_embeddings() is model.gpt_neox_japanese.embed_in and not type(model).tp_patterns
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "japanese")


def test_disk_offload(tmp_path_factory, tmp_path):
    QUARTER.check_disk_offload(tmp_path_factory, tmp_path)


def test_abeja_config_and_old_checkpoint(tmp_path_factory, tmp_path):
    """abeja's files as shipped: config.json in transformers 4's keys (rotary_pct, rotary_emb_base, no
    rope_parameters) and weights with old exports' mask buffers and rotary inv_freq: transformers' logits; saved
    back in the same keys, which transformers reads to the same model. Without rotary_pct, the whole head rotates."""
    top = {"rotary_pct": 0.25, "rotary_emb_base": 500.0}
    config = QUARTER.check_top_level_rope(tmp_path_factory, tmp_path, top)
    assert config.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 500.0,
        "partial_rotary_factor": 0.25,
    }
    directory, hf = QUARTER.checkpoint(tmp_path_factory)
    old = tmp_path / "old"
    old.mkdir()
    d = json.load(open(os.path.join(directory, "config.json")))
    d.pop("rope_parameters")
    (old / "config.json").write_text(json.dumps({**d, **top}))
    sd = load_file(os.path.join(directory, "model.safetensors"))
    for i in range(hf.config.num_hidden_layers):
        sd[f"gpt_neox_japanese.layers.{i}.attention.masked_bias"] = torch.tensor(-1e4)
        sd[f"gpt_neox_japanese.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    same_logits(autolm.AutoModelForCausalLM.from_pretrained(old), hf)
    d.pop("rotary_pct", None)
    assert GPTNeoXJapaneseConfig.from_dict(d).rope_parameters["partial_rotary_factor"] == 1.0


def test_config_defaults_and_errors():
    """GPTNeoXJapaneseConfig() holds transformers' defaults (intermediate_size derived, no parallel residual, no
    biases; hidden_dropout, is_decoder, initializer_range kept as config.json gives them) and takes transformers'
    arguments; bad values raise ConfigError naming the key."""
    import transformers

    check_config_defaults(GPTNeoXJapaneseConfig)
    default = GPTNeoXJapaneseConfig()
    theirs = json.loads(transformers.GPTNeoXJapaneseConfig().to_json_string())
    for key in ("transformers_version", "hidden_dropout", "is_decoder", "initializer_range"):
        theirs.pop(key)
    assert default.to_dict() == theirs
    assert (default.intermediate_size, default.use_parallel_residual, default.attention_bias) == (
        10240,
        False,
        False,
    )
    cfg = GPTNeoXJapaneseConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.5, layer_norm_eps=1e-3,
                                intermediate_multiple_size=3)  # fmt: skip
    rotary, eps, width = (
        cfg.rope_parameters["partial_rotary_factor"],
        cfg.layer_norm_eps,
        cfg.intermediate_size,
    )
    assert (rotary, eps, width) == (0.5, 1e-3, 192) and "intermediate_size" not in cfg.to_dict()
    read = GPTNeoXJapaneseConfig.from_dict(
        {"hidden_dropout": 0.1, "intermediate_size": 7, "use_parallel_residual": True}
    )
    assert read.to_dict()["hidden_dropout"] == 0.1 and (
        read.intermediate_size,
        read.use_parallel_residual,
    ) == (
        10240,
        False,
    )
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB)
    for change, key in ((dict(intermediate_multiple_size=0), "intermediate_multiple_size"),
                        (dict(intermediate_multiple_size="4"), "intermediate_multiple_size"),
                        (dict(layer_norm_eps=0), "layer_norm_eps"), (dict(rotary_pct=0.1), "rotary_pct"),
                        (dict(num_attention_heads=5), "num_attention_heads"),
                        (dict(hidden_act="swiglu"), "hidden_act")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            GPTNeoXJapaneseConfig.from_dict({**base, **change})
