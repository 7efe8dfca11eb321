"""CWM (Meta's Code World Model, facebook/cwm) against transformers and peft: Llama 3's layer (no attention biases,
GQA, Llama 3's RoPE scaling by default) with a sliding window by layer; where config.json gives no layer_types every
4th layer is full and the others slide. A variant with the layers listed (sliding, full, sliding), another window,
MLP biases, MHA, a tied head and plain RoPE. The standard battery, config.json in transformers' keys (layer_types
and Llama 3's RoPE derived as transformers derives them), no GGUF layout (llama.cpp converts no CwmForCausalLM)."""

from __future__ import annotations

import json
import os

import pytest
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.cwm import CwmConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
# CWM's shape: five layers of which 0 and 4 are full (the default pattern), a window of 4, GQA, Llama 3's RoPE
# (transformers' default: theta 1e6, factor 16 over 8192 positions), an untied head; head_dim given (CWM's default
# is 128)
CWM = Family(
    "CwmConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, sliding_window=4, max_position_embeddings=64),
    lora_targets=TARGETS,
)  # fmt: skip
# layer_types given, a window of 3, MLP biases, MHA, head_dim 24 (not 64 / 4), a tied head, plain RoPE on base 500
LISTED = Family(
    "CwmConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
         head_dim=24, sliding_window=3, max_position_embeddings=64, mlp_bias=True, tie_word_embeddings=True,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"cwm": CWM, "listed": LISTED}
WINDOWS = {"cwm": [None, 4, 4, 4, None], "listed": [3, None, 3]}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_long_generation_crosses_the_windows(tmp_path_factory):
    """30 prompt tokens and 30 new ones (far past the window of 4) give transformers' tokens."""
    CWM.check_long_generation(tmp_path_factory, new=30, exact_length=True)


def test_bf16(tmp_path_factory):
    CWM.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    CWM.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    CWM.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    CWM.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft

    from autolm.errors import AdapterError

    directory, hf = LISTED.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(hf, peft.LoraConfig())
    with pytest.raises(AdapterError, match="cwm"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    CWM.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the checkpoint's tensor names and config.json's keys and values."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert not any(k.endswith("self_attn.q_proj.bias") for k in saved)
    assert ("model.layers.0.mlp.up_proj.bias" in saved) == (name == "listed")


def test_disk_offload(tmp_path_factory, tmp_path):
    CWM.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only;
    transformers' tensor-parallel plan; each layer's window as layer_types says (derived: every 4th full)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert type(model).__name__ == "CwmForCausalLM"
    assert model.config.layer_types == hf.config.layer_types
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == WINDOWS[name]
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "listed")


def test_default_config_is_transformers():
    """CwmConfig() holds transformers' defaults (CWM's sizes, head_dim 128, Llama 3's RoPE, the three end tokens,
    a window of 8192 on every layer but each 4th); initializer_range and pretraining_tp, kept only where config.json
    has them, aside."""
    import transformers

    check_config_defaults(CwmConfig)
    theirs = json.loads(transformers.CwmConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert CwmConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "given",
    [{}, {"rope_theta": 250000.0}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     {"eos_token_id": None, "num_hidden_layers": 3}],
)  # fmt: skip
def test_config_json_is_read_as_transformers_reads_it(tmp_path, given):
    """A config.json without RoPE parameters or scaling: Llama 3's (theta 1e6, a top-level rope_theta ignored, as
    transformers ignores it); scaling without a base: on CWM's 1e6; no eos_token_id: Llama 3's three end tokens;
    no layer_types: every 4th layer full. As transformers reads the file."""
    import transformers

    base = dict(model_type="cwm", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                num_hidden_layers=6, vocab_size=128)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **given}))
    ours = autolm.AutoConfig.from_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ours.rope_parameters == theirs.rope_parameters
    assert (ours.eos_token_id, ours.sliding_window, ours.layer_types) == (
        theirs.eos_token_id,
        theirs.sliding_window,
        theirs.layer_types,
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(layer_types=["local", "global"]), "layer_types"),
        (dict(sliding_window=0), "sliding_window"),  # transformers refuses a window of 0 too
        (dict(hidden_act="relu3"), "hidden_act"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(mlp_bias="no"), "mlp_bias"),
    ],
)
def test_config_errors_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        CwmConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "num_hidden_layers": 2, **change})  # fmt: skip


def test_gguf_out_is_refused(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """No llama.cpp architecture holds CWM (no converter class; the llama graph has no window): GGUF out is refused
    by model type, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(CWM.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="cwm"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")
