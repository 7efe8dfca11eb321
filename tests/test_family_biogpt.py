"""BioGPT (microsoft/biogpt, BioGPT-Large) against transformers and peft: embeddings times sqrt(hidden_size)
(scale_embedding), learned positions read two rows on, OPT's pre-norm layer with biases and a GELU fc1 / fc2,
LayerNorms at PyTorch's epsilon whatever layer_norm_eps says (as transformers), the final `layer_norm`, the head
(`output_projection` in transformers) tied or not; the standard battery, config.json round trip, positions past
the table refused, and the refused tensor-parallel plan (llama.cpp has no BioGPT: no GGUF)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family, check_config_defaults
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]  # peft has no default targets for biogpt
# microsoft/biogpt's options: scaled embeddings, GELU, a tied head, layer_norm_eps 1e-12 (unused)
BIOGPT = Family("BioGptConfig", SMALL, lora_targets=TARGETS)
# unscaled embeddings, an untied head (`output_projection` in the file), ReLU, another (unused) epsilon
UNTIED = Family(
    "BioGptConfig",
    dict(SMALL, scale_embedding=False, tie_word_embeddings=False, hidden_act="relu", layer_norm_eps=1e-3),
    lora_targets=["k_proj", "fc1"],
)
FAMILIES = {"biogpt": BIOGPT, "untied": UNTIED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BIOGPT.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    BIOGPT.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BIOGPT.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the file holds the checkpoint's tensor names (output_projection
    where untied), no others."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))
    assert ("output_projection.weight" in names) == (name == "untied")


def test_disk_offload(tmp_path_factory, tmp_path):
    UNTIED.check_disk_offload(tmp_path_factory, tmp_path)


def test_positions_past_the_table_are_refused(tmp_path_factory):
    """transformers' table has max_position_embeddings + 2 rows; a longer input is a GenerationError naming
    max_position_embeddings."""
    directory, _ = BIOGPT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (biogpt.embed_positions, biogpt.layer_norm, out_proj), the head
    `lm_head` where transformers says `output_projection`; the saved config.json has transformers' keys and
    values (layer_norm_eps kept), no others."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = {k.replace("output_projection.", "lm_head."): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original


def test_default_config_is_transformers():
    """BioGptConfig() holds transformers' defaults (layer_norm_eps 1e-12, dropouts 0.1, pad 1, bos 0, ...);
    initializer_range, which autolm keeps only where config.json has it, aside."""
    import transformers

    from autolm.models import BioGptConfig

    theirs = json.loads(transformers.BioGptConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert BioGptConfig().to_dict() == theirs
    check_config_defaults(BioGptConfig)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(hidden_dropout_prob=2.0), "hidden_dropout_prob"),
        (dict(attention_probs_dropout_prob=-0.5), "attention_probs_dropout_prob"),
        (dict(layerdrop="x"), "layerdrop"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(scale_embedding="yes"), "scale_embedding"),
        (dict(hidden_act="swiglu"), "hidden_act"),
        (dict(hidden_size=66), "hidden_size"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="biogpt", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for BioGPT: tp_plan='auto' is a ConfigError naming the type."""
    directory, _ = BIOGPT.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'biogpt' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_layer_norm_eps_is_not_read(tmp_path_factory):
    """As in transformers, the LayerNorms' epsilon is PyTorch's 1e-5 whatever layer_norm_eps says (1e-3 here):
    the logits of test_logits[untied] already agree; the modules say so too."""
    directory, hf = UNTIED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.layer_norm_eps == 1e-3
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {m.eps for m in hf.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    ids, mask = padded_batch()
    assert model(ids, attention_mask=mask).logits.isfinite().all()
