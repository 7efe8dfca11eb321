"""Arcee (arcee-ai's AFM-4.5B) against transformers and peft: Llama's layer with a non-gated MLP up_proj -> relu2
(the squared ReLU) -> down_proj, GQA, RMSNorm, default RoPE; and a variant with YaRN (as the released config),
biases on q/k/v/o and the MLP, a tied head. The standard battery, config.json in transformers' keys, GGUF as
llama.cpp's converter writes "arcee" (in and out), a ChatML chat template through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import ArceeConfig

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
# GQA, an untied head (AFM-4.5B's), default RoPE; widths divisible by 32 for int4
ARCEE = Family(
    "ArceeConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64),
    lora_targets=["q_proj", "v_proj", "up_proj", "down_proj"],  # peft has no default for arcee
)  # fmt: skip
# YaRN (the released config's scaling, on a short original context), GQA, an untied head: the GGUF checkpoint
YARN_FAMILY = Family(
    "ArceeConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, rope_parameters=YARN),
)  # fmt: skip
# biases on q/k/v/o and on the MLP, a tied head, another RoPE base
BIASED = Family(
    "ArceeConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
         attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"arcee": ARCEE, "yarn": YARN_FAMILY, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["arcee", "yarn"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ARCEE.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    YARN_FAMILY.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ARCEE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    ARCEE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ARCEE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    ARCEE.check_disk_offload(tmp_path_factory, tmp_path)


def test_relu2_matters():
    """The MLP is down(relu(up(x))**2): no gate_proj, and the squared ReLU, not the ReLU."""
    torch.manual_seed(0)
    model = autolm.AutoModelForCausalLM.from_config(
        ArceeConfig(
            vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4
        )
    )
    mlp = model.model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(2, 3, 64)
    want = mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2)
    torch.testing.assert_close(mlp(x), want)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only;
    transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "biased") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors():
    """ArceeConfig() holds transformers' defaults (initializer_range, kept only where config.json has it, aside);
    bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.ArceeConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert ArceeConfig().to_dict() == theirs
    for change, key in ((dict(mlp_bias="yes"), "mlp_bias"), (dict(attention_bias=1), "attention_bias"),
                        (dict(hidden_act="relu3"), "hidden_act"), (dict(rms_norm_eps=0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            ArceeConfig(hidden_size=64, num_attention_heads=4, **change)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes arcee --------------------------------------------------


def _arcee_metadata(w, c) -> None:
    """ArceeModel.set_gguf_parameters (conversion/arcee.py): LlamaModel's (TextModel's sizes, head counts, the
    head size as key/value length (config.json has head_dim), RoPE base, RMS epsilon; the vocabulary size,
    rope.dimension_count), then YaRN's type, factor and original context length where the config scales. Its
    modify_tensors is LlamaModel's: q/k rows permuted."""
    import gguf

    rope = c.rope_parameters
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


CONVERTERS.setdefault("arcee", ("arcee", _arcee_metadata, True))


def write_arcee_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Arcee `hf` (F32)."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """YaRN scaling, permuted q/k with GQA, the non-gated MLP (ffn_up / ffn_down) read back: transformers' logits."""
    model, _ = check_gguf(YARN_FAMILY, tmp_path_factory, tmp_path)
    c = model.config
    assert type(model).__name__ == "ArceeForCausalLM" and c.hidden_act == "relu2"
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == pytest.approx(4.0)
    assert c.num_key_value_heads == 2 and not c.tie_word_embeddings


def test_gguf_out_refuses_biases(tmp_path_factory, tmp_path, smol_gguf):
    """llama.cpp's arcee reads no biases: a model with them is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = BIASED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tok = autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])
    with pytest.raises(ConfigError, match="bias"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- the command line, with a ChatML template (AFM-4.5B's chat format) -------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("ArceeConfig", {**YARN_FAMILY.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "ArceeForCausalLM (arcee)")
