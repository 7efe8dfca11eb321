"""Phi (phi-1, phi-1.5, phi-2) against transformers and peft: one LayerNorm (with bias) feeding attention and the
MLP in parallel, biases on q/k/v/dense, fc1/fc2 and the LM head, partial rotary embeddings (phi-2's 0.4; the
default 0.5), per-head q/k LayerNorms (qk_layernorm) with GQA; the standard battery, config.json in both RoPE
spellings, GGUF as llama.cpp's converter writes phi2 (in and out), and the CLI (phi-2 has no chat template)."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

# phi-2's shape: partial_rotary_factor 0.4 (12 of each head's 32 dimensions rotate), intermediate 4 * hidden,
# no GQA (what llama.cpp's converter assumes: it writes 4 * hidden and head_count_kv = head_count)
PHI = Family(
    "PhiConfig",
    dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
         max_position_embeddings=64, partial_rotary_factor=0.4),
    lora_targets=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
)  # fmt: skip
# q/k LayerNorms per head, GQA, the default partial_rotary_factor (0.5), another RoPE base, exact GELU
QK = Family(
    "PhiConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, qk_layernorm=True, rope_theta=500.0, hidden_act="gelu"),
    lora_targets=["q_proj", "v_proj", "fc1", "fc2"],  # peft's default for phi
)  # fmt: skip
FAMILIES = {"phi2": PHI, "qk_layernorm": QK}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    QK.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    QK.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    PHI.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    QK.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    PHI.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (lm_head.bias, model.final_layernorm, dense, the
    q/k LayerNorms); the saved config.json has transformers' keys and values, no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """PhiConfig() holds transformers' defaults (partial_rotary_factor 0.5, gelu_new, layer_norm_eps 1e-5, ...);
    initializer_range, which autolm keeps only where config.json has it, aside."""
    import transformers

    from autolm.models import PhiConfig

    theirs = json.loads(transformers.PhiConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert PhiConfig().to_dict() == theirs


def test_phi2_config_spelling(tmp_path_factory, tmp_path):
    """phi-2's config.json as shipped (transformers 4's spelling): partial_rotary_factor and rope_theta at the top
    level, rope_scaling null. The same model as the v5 spelling, saved back in the spelling it was read in, which
    transformers loads with equal logits."""
    top = {"partial_rotary_factor": 0.4, "rope_theta": 10000.0, "rope_scaling": None}
    assert (
        PHI.check_top_level_rope(tmp_path_factory, tmp_path, top).rope_parameters["partial_rotary_factor"]
        == 0.4
    )


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(partial_rotary_factor=0.3, num_attention_heads=2), "partial_rotary_factor"),  # 9.6 -> 9 of 32
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(qk_layernorm="yes"), "qk_layernorm"),
        (dict(resid_pdrop=2.0), "resid_pdrop"),
        (dict(hidden_act="swiglu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="phi", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes phi2 --------------------------------------------------


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as PhiForCausalLM with transformers' logits (the head's bias, the final norm's
    name, the rotary dimensions read back as partial_rotary_factor)."""
    model, hf = check_gguf(PHI, tmp_path_factory, tmp_path)
    c = model.config
    assert c.model_type == "phi" and not c.tie_word_embeddings and c.layer_norm_eps == pytest.approx(1e-5)
    assert c.head_dim == 32 and int(c.head_dim * c.rope_parameters["partial_rotary_factor"]) == 12
    assert (c.intermediate_size, c.num_key_value_heads, c.rope_parameters["rope_theta"]) == (256, 2, 10000.0)
    assert torch.equal(model.lm_head.bias, hf.lm_head.bias)


def _byte_tokenizer(directory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast, as tests/test_gguf_out.py's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(directory))


def test_gguf_out_refuses_qk_layernorms(tmp_path_factory, tmp_path):
    """llama.cpp's phi2 has no q/k LayerNorms: a model with them is refused by name (test_gguf_out checks the
    F32 file of the others against the converter's)."""
    from autolm.gguf_writer import save_gguf

    qk = autolm.AutoModelForCausalLM.from_pretrained(QK.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="q_layernorm"):
        save_gguf(qk, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "qk.gguf"), "f32")


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; `autolm inspect` names the class and type; with
    no chat template (phi-2 ships none) `autolm chat` says so."""
    check_cli_without_template(PHI, tmp_path_factory, tmp_path, "PhiForCausalLM (phi)")


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resizing_keeps_the_heads_bias_as_transformers(tmp_path_factory, tmp_path, mean_resizing):
    """resize_token_embeddings grows the head's bias too (added entries: the old ones' mean, or zeros), as
    transformers does; the resized model saves and loads back in transformers with its bias."""
    import transformers

    directory, _ = PHI.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(VOCAB + 8, mean_resizing=mean_resizing)
    theirs.resize_token_embeddings(VOCAB + 8, mean_resizing=mean_resizing)
    torch.testing.assert_close(model.lm_head.bias, theirs.lm_head.bias.detach())
    model.save_pretrained(tmp_path / "resized")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resized")
    assert torch.equal(back.lm_head.bias, model.lm_head.bias) and back.config.vocab_size == VOCAB + 8
