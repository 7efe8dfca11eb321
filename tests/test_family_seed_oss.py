"""Seed-OSS (ByteDance Seed) against transformers and peft: Llama's layer with biases on q/k/v, a separate o_proj
bias (attention_out_bias), MLP biases, a head size of its own, residual and attention dropout in the config (not
applied in eval), GQA; a tied variant with the head size derived. The standard battery, config.json in
transformers' keys, GGUF as llama.cpp's converter writes "seed_oss" (in and out), a chat template through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import SeedOssConfig

ROPE = {"rope_type": "default", "rope_theta": 10000000.0}  # Seed-OSS-36B's base
# every quirk on: q/k/v biases, the o_proj bias, MLP biases, head_dim 32 over hidden 64 / 4 heads, GQA, dropouts
SEED = Family(
    "SeedOssConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=32, max_position_embeddings=64, attention_bias=True, attention_out_bias=True, mlp_bias=True,
         attention_dropout=0.1, residual_dropout=0.1, rope_parameters=ROPE),
    lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"],  # peft has no default for seed_oss
)  # fmt: skip
# what llama.cpp's seed_oss holds: q/k/v biases only (the released config), head_dim of its own, GQA, untied
GGUF_FAMILY = Family(
    "SeedOssConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=32, max_position_embeddings=64, attention_bias=True, attention_out_bias=False,
         rope_parameters=ROPE),
)  # fmt: skip
# no biases at all, a tied head, head_dim derived from hidden_size / num_attention_heads
TIED = Family(
    "SeedOssConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
         head_dim=None, max_position_embeddings=64, attention_bias=False, tie_word_embeddings=True,
         residual_dropout=0.0, attention_dropout=0.0),
)  # fmt: skip
FAMILIES = {"seed": SEED, "gguf": GGUF_FAMILY, "tied": TIED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["seed", "tied"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SEED.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SEED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SEED.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    SEED.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SEED.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    SEED.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the o_proj bias only where attention_out_bias); config.json
    round-trips with transformers' keys only; transformers' tensor-parallel plan."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path, tp_plan=True)
    assert ("model.layers.0.self_attn.o_proj.bias" in model.state_dict()) == (name == "seed")
    assert ("model.layers.0.self_attn.q_proj.bias" in model.state_dict()) == (name != "tied")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "tied") and ("lm_head" in model.tp_plan()) == (not tied)


def test_residual_dropout_while_training():
    """residual_dropout drops each sublayer's output while training only: eval is deterministic, training is not."""
    torch.manual_seed(0)
    config = SeedOssConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, residual_dropout=0.5)  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b)
        model.train()
        assert not torch.allclose(model(ids).logits, a)


def test_default_config_and_errors():
    """SeedOssConfig() holds transformers' defaults (initializer_range and residual_dropout, kept only where
    config.json has them, aside; residual_dropout reads as transformers' 0.1 where it has not); bad values raise
    ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.SeedOssConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert theirs.pop("residual_dropout") == SeedOssConfig().residual_dropout == 0.1
    assert SeedOssConfig().to_dict() == theirs
    assert SeedOssConfig(residual_dropout=0.0).to_dict() == {**theirs, "residual_dropout": 0.0}
    for change, key in ((dict(attention_out_bias="yes"), "attention_out_bias"),
                        (dict(attention_bias=1), "attention_bias"), (dict(mlp_bias=None), "mlp_bias"),
                        (dict(residual_dropout=1.5), "residual_dropout"),
                        (dict(residual_dropout="0.1"), "residual_dropout"),
                        (dict(attention_dropout=-0.1), "attention_dropout"),
                        (dict(head_dim=0), "head_dim"), (dict(rms_norm_eps=0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            SeedOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, **change)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes seed_oss ------------------------------------------------


def _seed_oss_metadata(w, c) -> None:
    """SeedOssModel (a TextModel with no set_gguf_parameters of its own): sizes, head counts, RoPE base, RMS
    epsilon, and the head size as key/value length (config.json has head_dim). No q/k permutation: llama.cpp runs
    seed_oss with NeoX RoPE."""
    add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


CONVERTERS.setdefault("seed_oss", ("seed_oss", _seed_oss_metadata, False))


def write_seed_oss_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Seed-OSS `hf` (F32)."""
    write_gguf(hf, path)


@pytest.mark.parametrize("name", ["gguf", "tied"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """q/k/v biases (or none), post_attention_norm, the head size read back: transformers' logits."""
    model, hf = check_gguf(FAMILIES[name], tmp_path_factory, tmp_path)
    c = model.config
    assert type(model).__name__ == "SeedOssForCausalLM"
    assert c.attention_bias == (name == "gguf") and not c.attention_out_bias and not c.mlp_bias
    assert c.head_dim == hf.config.head_dim and c.tie_word_embeddings == (name == "tied")
    assert c.rope_parameters["rope_theta"] == pytest.approx(hf.config.rope_parameters["rope_theta"])


def test_gguf_out_refuses_what_llamacpp_ignores(tmp_path_factory, tmp_path, smol_gguf):
    """llama.cpp's seed_oss reads no o_proj bias and no MLP biases: a model with them is refused by name, and no
    file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = SEED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tok = autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])
    with pytest.raises(ConfigError, match="attention_out_bias"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- the command line (Seed-OSS's own template is not in tests/data: ChatML's stands in) ------------------------


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("SeedOssConfig", {**SEED.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "SeedOssForCausalLM (seed_oss)")
