"""OPT (facebook/opt-125m ... 66B and fine-tunes) against transformers and peft: learned positions read two rows on
(transformers' OPTLearnedPositionalEmbedding) under left padding, pre-norm layers with a final LayerNorm (OPT-125m)
or post-norm ones without it (OPT-350m), word embeddings narrower than the layers with project_in / project_out
(OPT-350m), `_remove_final_layer_norm`, no biases (enable_bias=False), LayerNorms without parameters
(layer_norm_elementwise_affine=False), q/k/v/out_proj, ReLU fc1/fc2, the tied head; the battery, config.json in
OPT's names, the refused tensor-parallel plan and the CLI (OPT ships no chat template: a ChatML one stands in).
llama.cpp has no OPT architecture (gguf-py's MODEL_ARCH has none), so there is no GGUF in or out."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, GenerationError

SMALL = dict(
    hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
# facebook/opt-125m's shape: pre-norm layers, a final LayerNorm, biases, ReLU, the tied head
OPT125 = Family("OPTConfig", SMALL)
# facebook/opt-350m's: post-norm layers (no final LayerNorm), word embeddings half the layers' width with
# project_in / project_out (the head tied to the narrow embeddings); widths divide int4's groups of 32
OPT350 = Family(
    "OPTConfig",
    dict(SMALL, ffn_dim=128, num_hidden_layers=3, word_embed_proj_dim=32, do_layer_norm_before=False),
)
# the remaining switches: no final LayerNorm in a pre-norm model (`_remove_final_layer_norm`), no biases, LayerNorms
# without parameters, GELU, an untied head
BARE = Family(
    "OPTConfig",
    dict(SMALL, num_attention_heads=8, _remove_final_layer_norm=True, enable_bias=False,
         layer_norm_elementwise_affine=False, activation_function="gelu", tie_word_embeddings=False),
)  # fmt: skip
FAMILIES = {"opt125": OPT125, "opt350": OPT350, "bare": BARE}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["opt125", "opt350"])
def test_bf16(tmp_path_factory, name):
    FAMILIES[name].check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", ["opt125", "opt350"])
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name,dora", [("opt125", False), ("opt350", False), ("opt125", True)])
def test_lora(tmp_path_factory, tmp_path, name, dora):
    """peft's default targets for opt (q_proj, v_proj), both ways."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, dora)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("name", ["opt125", "opt350"])
def test_quantized(tmp_path_factory, name, bits):
    FAMILIES[name].check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_loads_in_transformers(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", ["opt125", "opt350"])
def test_disk_offload(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (model.decoder.*); saved files hold the checkpoint's
    tensor names, and config.json round-trips in OPT's names; the decoder answers to autolm's names too."""
    from safetensors import safe_open

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert model.model.layers is model.model.decoder.layers
    assert model.get_input_embeddings() is model.model.decoder.embed_tokens
    assert model.model.norm is model.model.decoder.final_layer_norm
    model.save_pretrained(tmp_path / "saved")
    keys = lambda d: set(safe_open(os.path.join(d, "model.safetensors"), "pt").keys())  # noqa: E731
    assert keys(tmp_path / "saved") == keys(directory)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in original.items() if k != "transformers_version"
    }
    assert model.config.ffn_dim == model.config.intermediate_size == hf.config.ffn_dim


def test_opt350_shapes(tmp_path_factory):
    """OPT-350m: narrow embeddings and head, project_in / project_out, no final LayerNorm."""
    directory, _ = OPT350.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    d = model.model.decoder
    assert d.embed_tokens.weight.shape == (VOCAB, 32) and model.lm_head.weight is d.embed_tokens.weight
    assert d.project_in.weight.shape == (64, 32) and d.project_out.weight.shape == (32, 64)
    assert d.final_layer_norm is None and d.embed_positions.weight.shape == (64 + 2, 64)


def test_positions_are_the_paddings_and_stop_at_max_position_embeddings(tmp_path_factory):
    """Positions count each row's real tokens (transformers' cumsum of the mask), read from row 2 on; a prompt
    past max_position_embeddings is a clear error."""
    directory, hf = OPT125.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[real]  # transformers' own positions from the mask
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
        shifted = model(ids, attention_mask=mask, position_ids=positions(mask) + 1).logits[real]
        assert not torch.allclose(shifted, theirs, atol=1e-3)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model(torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(do_layer_norm_before="yes"), "do_layer_norm_before"),
        (dict(_remove_final_layer_norm=1), "_remove_final_layer_norm"),
        (dict(enable_bias=None), "enable_bias"),
        (dict(layer_norm_elementwise_affine="false"), "layer_norm_elementwise_affine"),
        (dict(word_embed_proj_dim=0), "word_embed_proj_dim"),
        (dict(word_embed_proj_dim=32.5), "word_embed_proj_dim"),
        (dict(ffn_dim=-1), "ffn_dim"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(dropout=2.0), "dropout"),
        (dict(layerdrop="x"), "layerdrop"),
        (dict(num_attention_heads=5), "num_attention_heads"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="opt", hidden_size=64, ffn_dim=96, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers declares no tensor-parallel plan for OPT: tp_plan='auto' is a ConfigError naming the type."""
    directory, _ = OPT125.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'opt' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_cli(tmp_path_factory, tmp_path):
    """OPT's checkpoints ship no chat template: a ChatML one (qwen2-moe-chatml.jinja) stands in; its system prompt
    needs a longer context than the battery's checkpoints."""
    long = Family("OPTConfig", {**OPT125.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "OPTForCausalLM (opt)")


def test_gguf_out_is_refused(tmp_path_factory, tmp_path):
    """llama.cpp has no OPT architecture: save_gguf is a ConfigError naming the model type, and writes nothing."""
    from conftest import write_char_tokenizer

    from autolm.gguf_writer import save_gguf

    directory, _ = OPT125.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    os.makedirs(tmp_path / "tok")
    write_char_tokenizer(str(tmp_path / "tok"))
    tok = autolm.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="'opt' has no llama.cpp architecture"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")
