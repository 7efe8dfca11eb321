"""InternLM3 against transformers (which runs it as Llama over InternLM3Config): q/k/v/o and MLP biases through
InternLM's own names, GQA with a head_dim of its own; the standard battery, the remote-code config.json spelling,
GGUF as llama.cpp writes it ("llama", read back as Llama) and the CLI (with a ChatML template, as
internlm3-8b-instruct's)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch
from family_checks import Family
from gguf_llamacpp import check_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

INTERNLM3 = Family(
    "InternLM3Config",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=24, max_position_embeddings=64, qkv_bias=True, bias=True),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for internlm3
)  # fmt: skip
# internlm3-8b-instruct's layer (no biases; head_dim = hidden / heads): what llama.cpp's "llama" runs
PLAIN = Family(
    "InternLM3Config",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, max_position_embeddings=64),
    lora_targets=["q_proj", "v_proj"],
)  # fmt: skip


def test_logits(tmp_path_factory):
    INTERNLM3.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    INTERNLM3.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    INTERNLM3.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    INTERNLM3.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    INTERNLM3.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    INTERNLM3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    INTERNLM3.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    INTERNLM3.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    INTERNLM3.check_disk_offload(tmp_path_factory, tmp_path)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's "llama" file of internlm3-8b-instruct's layer loads as Llama with transformers' logits; GGUF
    out of a model with biases, which the format has no keys for, is refused naming them."""
    from autolm.gguf_writer import save_gguf

    check_gguf(PLAIN, tmp_path_factory, tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(INTERNLM3.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="attention_bias.*mlp_bias"):
        save_gguf(model, None, str(tmp_path / "biases.gguf"), "f32")


def test_biases_are_there_and_the_config_is_transformers(tmp_path_factory):
    """The checkpoint holds q/k/v/o and MLP biases (InternLM's qkv_bias and bias: Llama's attention_bias and
    mlp_bias), and autolm's config writes the keys transformers writes."""
    directory, hf = INTERNLM3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "InternLM3ForCausalLM" and type(hf).__name__ == "LlamaForCausalLM"
    assert model.config.attention_bias and model.config.mlp_bias
    assert (
        model.model.layers[0].self_attn.o_proj.bias is not None
        and model.model.layers[0].mlp.up_proj.bias is not None
    )
    assert sorted(model.state_dict()) == sorted(hf.state_dict())
    ours, theirs = model.config.to_dict(), hf.config.to_dict()
    assert {k: ours[k] for k in ("attention_bias", "mlp_bias", "head_dim")} == {
        k: theirs[k] for k in ("attention_bias", "mlp_bias", "head_dim")
    }


def test_the_released_config_spelling_loads(tmp_path_factory, tmp_path):
    """internlm3-8b-instruct's config.json says qkv_bias / bias (its remote code's names): read as Llama's fields,
    with transformers' logits."""
    directory, hf = INTERNLM3.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["qkv_bias"], cfg["bias"] = cfg.pop("attention_bias"), cfg.pop("mlp_bias")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.attention_bias and model.config.mlp_bias
    ids, mask = padded_batch()
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits[mask.bool()]
        want = hf(ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_defaults_are_transformers():
    import transformers

    ours, theirs = autolm.InternLM3Config().to_dict(), transformers.InternLM3Config().to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "pad_token_id",
                "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias"):  # fmt: skip
        assert ours[key] == theirs[key], key


def test_cli(tmp_path_factory, tmp_path):
    long = Family(
        INTERNLM3.config_cls, dict(INTERNLM3.kwargs, max_position_embeddings=2048), lora_targets=None
    )
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "InternLM3ForCausalLM (internlm3)")
