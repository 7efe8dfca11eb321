"""GPT-J (GPT-J-6B) against transformers and peft: one LayerNorm feeding attention and the MLP in parallel, q/k/v and
out_proj without biases, RoPE on the first rotary_dim dimensions of each head over interleaved pairs (GPT-J-6B's
quarter, or the whole head), fc_in / fc_out and the LM head with biases; a tied head, n_inner,
another activation and epsilon. The standard battery, config.json in GPT-J's names, old checkpoints' mask buffers,
token_type_ids, resizing with the head's bias. llama.cpp names "gptj" but builds no graph for it and its converter
writes none: no GGUF."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, positions, write_char_tokenizer
from family_checks import Family
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.gptj import GPTJConfig

# GPT-J-6B's shape: a quarter of each head rotates (4 of 16 dimensions), MLP 4 * n_embd, untied head
GPTJ = Family("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=4))
# the whole head rotating, a tied head (its bias kept), n_inner, the exact GELU, another epsilon
WHOLE = Family(
    "GPTJConfig",
    dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=16, n_inner=80, tie_word_embeddings=True,
         activation_function="gelu", layer_norm_epsilon=1e-3),
    lora_targets=["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
)  # fmt: skip
FAMILIES = {"gptj": GPTJ, "whole_head_tied": WHOLE}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GPTJ.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GPTJ.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """peft's default targets for gptj (q_proj, v_proj), and every Linear of the layer."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(FAMILIES[name].lora_targets or ["q_proj", "v_proj"])


def test_lora_config_defaults_follow_peft(tmp_path_factory):
    """LoraConfig() targets what peft's does for gptj (q_proj, v_proj); layers_to_transform counts the `h.N`
    layers as peft does."""
    import peft

    directory, hf = GPTJ.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for kwargs in (dict(r=2), dict(r=2, target_modules=["fc_in", "out_proj"], layers_to_transform=[1])):
        ours = autolm.get_peft_model(model, autolm.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(hf, peft.LoraConfig(**kwargs))
        names = {n for n, _ in ours.named_parameters() if ".lora_" in n}
        assert names and names == {n for n, _ in theirs.named_parameters() if ".lora_" in n}
        ours.unload(), theirs.unload()


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GPTJ.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the state dict, the saved tensors and config.json are transformers'
    (`transformer.*`, lm_head.bias; no lm_head.weight where the head is tied)."""
    model, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "lm_head.bias" in saved and ("lm_head.weight" in saved) == (name == "gptj")
    assert (model.lm_head.weight is model.transformer.wte.weight) == (name == "whole_head_tied")
    assert model.model is model.transformer and model.model.layers is model.transformer.h


def test_disk_offload(tmp_path_factory, tmp_path):
    GPTJ.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """GPTJConfig() writes transformers' GPTJConfig() (initializer_range, which autolm keeps only where config.json
    has it, aside), and takes and answers to GPT-J's names."""
    import transformers

    theirs = json.loads(transformers.GPTJConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert GPTJConfig().to_dict() == theirs
    c = GPTJConfig(
        n_embd=64, n_layer=3, n_head=4, n_positions=32, layer_norm_epsilon=1e-3, n_inner=40, rotary_dim=8
    )
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.max_position_embeddings) == (64, 3, 16, 32)
    assert (c.rms_norm_eps, c.intermediate_size, c.rotary_dim) == (1e-3, 40, 8)
    assert (c.n_embd, c.n_layer, c.n_head, c.activation_function) == (64, 3, 4, "gelu_new")


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(rotary_dim=6, n_head=16), "rotary_dim"),  # past the head's 4 dimensions
        (dict(rotary_dim=3), "rotary_dim"),
        (dict(rotary_dim=0), "rotary_dim"),
        (dict(rotary_dim=None), "rotary_dim"),  # transformers 5 refuses it too
        (dict(n_head=5), "n_head"),
        (dict(n_inner=-1), "n_inner"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
        (dict(activation_function="swiglu"), "activation_function"),
        (dict(resid_pdrop=2.0), "resid_pdrop"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_rope_keys_are_not_read(tmp_path_factory, tmp_path):
    """GPT-J's RoPE base is fixed: a rope_theta in config.json changes nothing, as in transformers."""
    import shutil

    directory, hf = GPTJ.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rope_theta": 500.0}))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.rope_theta == 10000.0
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)


# ---- checkpoints and inputs -------------------------------------------------------------------------------------


def test_old_checkpoint_mask_buffers(tmp_path_factory, tmp_path):
    """EleutherAI/gpt-j-6b's weights carry each layer's attn.bias (a causal mask) and attn.masked_bias: skipped
    while loading (transformers' logits), not written back."""
    directory, hf = GPTJ.checkpoint(tmp_path_factory)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    sd = load_file(os.path.join(directory, "model.safetensors"))
    for i in range(2):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(
            1, 1, 64, 64
        )
        sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(old)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    assert not any(
        "attn.bias" in k or "masked_bias" in k for k in load_file(tmp_path / "saved" / "model.safetensors")
    )


def test_token_type_ids(tmp_path_factory):
    """token_type_ids are looked up in wte and added to the input vectors, as transformers does."""
    directory, hf = GPTJ.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    types = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask), token_type_ids=types).logits[real]
        got = model(ids, attention_mask=mask, token_type_ids=types).logits[real]
        plain = model(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_resizing_keeps_the_heads_bias_as_transformers(tmp_path_factory, tmp_path, name):
    """resize_token_embeddings grows the head's bias too (added entries: the old ones' mean), tied head or not, as
    transformers does; the resized model saves and loads back in transformers with its bias."""
    import transformers

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(VOCAB + 8)
    theirs.resize_token_embeddings(VOCAB + 8)
    torch.testing.assert_close(model.lm_head.bias, theirs.lm_head.bias.detach())
    assert model.lm_head.out_features == VOCAB + 8
    model.save_pretrained(tmp_path / "resized")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resized")
    assert torch.equal(back.lm_head.bias, model.lm_head.bias) and back.config.vocab_size == VOCAB + 8


def test_gguf_out_is_refused(tmp_path_factory, tmp_path):
    """llama.cpp runs no GPT-J (its "gptj" architecture has no graph, its converter writes none): save_gguf is a
    ConfigError naming the model type, and writes nothing."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(GPTJ.checkpoint(tmp_path_factory)[0])
    os.makedirs(tmp_path / "tok")
    write_char_tokenizer(str(tmp_path / "tok"))
    tok = autolm.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="'gptj' has no llama.cpp architecture"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")
