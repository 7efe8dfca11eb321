"""Ministral 3 (text model_type ministral3) against transformers and peft: Mistral's layer with YaRN RoPE and Llama
4's attention temperature (queries times 1 + beta * log(1 + floor(position / original_max_position_embeddings))),
on a short original context so the test positions cross it; a head size apart from hidden / heads; a sliding
window on every layer with a tied head; a YaRN attention factor (mscale != mscale_all_dim). The standard battery,
config.json in transformers' keys, GGUF as llama.cpp's converter writes "mistral3" (in and out), the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_llamacpp import CONVERTERS, _llama, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError
from autolm.models import Ministral3Config

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 4,
        "max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.5}  # fmt: skip
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
# YaRN, the temperature from position 4 on, GQA, head_dim 24 (not 64 / 4), an untied head: the GGUF checkpoint
MINISTRAL3 = Family("Ministral3Config", dict(SIZES, head_dim=24, rope_parameters=YARN), lora_targets=TARGETS)
# a sliding window of 4 on every layer, default RoPE with the temperature, a tied head
WINDOWED = Family(
    "Ministral3Config",
    dict(SIZES, sliding_window=4, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0, "llama_4_scaling_beta": 0.3,
                          "original_max_position_embeddings": 3}),
    lora_targets=TARGETS,
)  # fmt: skip
# YaRN with mscale != mscale_all_dim: the tables scaled by their ratio
MSCALED = Family(
    "Ministral3Config", dict(SIZES, rope_parameters={**YARN, "mscale": 2.0}), lora_targets=TARGETS
)
FAMILIES = {"ministral3": MINISTRAL3, "windowed": WINDOWED, "mscaled": MSCALED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["ministral3", "windowed"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MINISTRAL3.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["ministral3", "windowed"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MINISTRAL3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    MINISTRAL3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MINISTRAL3.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    MINISTRAL3.check_disk_offload(tmp_path_factory, tmp_path)


def test_temperature_matters(tmp_path_factory):
    """The query scale changes the logits from position 4 on (and not before); beta 0 turns it off."""
    directory, _ = MINISTRAL3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    off = autolm.AutoModelForCausalLM.from_pretrained(
        directory, rope_parameters={**YARN, "llama_4_scaling_beta": 0.0}
    )
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, off(ids).logits
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only;
    transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert type(model).__name__ == "Ministral3ForCausalLM"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "windowed") and ("lm_head" in model.tp_plan()) == (not tied)
    windows = {layer.self_attn.sliding_window for layer in model.model.layers}
    assert windows == ({4} if name == "windowed" else {None})


def test_default_config_and_errors():
    """Ministral3Config() holds transformers' defaults (YaRN with the temperature; initializer_range, kept only
    where config.json has it, aside); a config.json without RoPE settings reads transformers' default; bad values
    raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.Ministral3Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Ministral3Config().to_dict() == theirs
    small = Ministral3Config.from_dict({"max_position_embeddings": 4096})
    assert (
        small.rope_parameters == transformers.Ministral3Config(max_position_embeddings=4096).rope_parameters
    )
    assert Ministral3Config(layer_types=["full_attention"] * 34, sliding_window=8).layer_window(0) == 8
    rope = dict(YARN)
    for change, key in ((dict(rope_parameters={**rope, "llama_4_scaling_beta": None}), "llama_4_scaling_beta"),
                        (dict(rope_parameters={**rope, "llama_4_scaling_beta": "x"}), "llama_4_scaling_beta"),
                        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1}),
                         "original_max_position_embeddings"),
                        (dict(sliding_window=0), "sliding_window"), (dict(hidden_act="relu3"), "hidden_act")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            Ministral3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, **change)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes ministral3 ----------------------------------------------


def _ministral3_metadata(w, c) -> None:
    """Mistral3Model.Ministral3Model.set_gguf_parameters (conversion/mistral.py): LlamaModel's (TextModel's sizes,
    head counts, the head size as key/value length (config.json has head_dim), RoPE base, RMS epsilon, YaRN's
    type, factor, original context length and betas; the vocabulary size, rope.dimension_count), then
    mscale_all_dim as the YaRN log multiplier and llama_4_scaling_beta as the attention temperature scale. Its
    modify_tensors is LlamaModel's: q/k rows permuted."""
    import gguf

    rope = c.rope_parameters
    _llama(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
    w.add_attn_temperature_scale(rope["llama_4_scaling_beta"])


CONVERTERS.setdefault("ministral3", ("mistral3", _ministral3_metadata, True))


def write_ministral3_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Ministral3 `hf` (F32)."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """YaRN, the temperature, permuted q/k with GQA and a head size apart read back: transformers' logits."""
    model, _ = check_gguf(MINISTRAL3, tmp_path_factory, tmp_path)
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["llama_4_scaling_beta"] == pytest.approx(0.5)
    assert rope["original_max_position_embeddings"] == 4 and model.config.head_dim == 24


def test_gguf_without_temperature_is_unscaled(tmp_path_factory, tmp_path):
    """A mistral3 file without attention.temperature_scale runs unscaled queries, as llama.cpp does."""
    from autolm.sources.gguf import GGUFFile

    _, hf = MINISTRAL3.checkpoint(tmp_path_factory)
    c = hf.config
    saved = CONVERTERS["ministral3"]

    def plain(w, config):  # Llama's keys only: no YaRN, no temperature
        _llama(w, config)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)

    CONVERTERS["ministral3"] = ("mistral3", plain, True)
    try:
        write_gguf(hf, str(tmp_path / "model.gguf"))
    finally:
        CONVERTERS["ministral3"] = saved
    assert "mistral3.attention.temperature_scale" not in GGUFFile(str(tmp_path / "model.gguf")).metadata
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert model.config.rope_parameters["llama_4_scaling_beta"] == 0.0
    plain_rope = {"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"],
                  "llama_4_scaling_beta": 0.0, "original_max_position_embeddings": 64}  # fmt: skip
    directory, _ = MINISTRAL3.checkpoint(tmp_path_factory)
    want = autolm.AutoModelForCausalLM.from_pretrained(directory, rope_parameters=plain_rope)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = want(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "match"), [("windowed", "sliding_window|rope"), ("mscaled", "attention factor")]
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer, name, match):
    """llama.cpp's mistral3 has no sliding window and converts YaRN only, with no attention factor: such a model
    is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FAMILIES[name].checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match=match):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- the command line --------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """Mistral's [INST] format (Mixtral's template; the Ministral 3 one is not in tests/data)."""
    long = Family("Ministral3Config", {**MINISTRAL3.kwargs, "max_position_embeddings": 256,
                                       "rope_parameters": {**YARN, "max_position_embeddings": 256}})  # fmt: skip
    check_cli(long, "mixtral-8x7b-instruct-v0.1.jinja", tmp_path_factory, tmp_path,
              "Ministral3ForCausalLM (ministral3)")  # fmt: skip
