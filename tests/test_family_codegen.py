"""CodeGen / CodeGen2 against transformers and peft: GPT-J's layer (tests/test_family_gptj.py) with q/k/v packed in
qkv_proj as transformers splits it (mp_num = 4 blocks of [q | v | k], two heads per block here, so the order of the
heads inside a block counts too); a tied head with the whole head rotating, one head per block, n_inner. The standard
battery, config.json in CodeGen's names (n_ctx; no pad_token_id unless set), the tensor-parallel limit of the
blocks. llama.cpp has no CodeGen architecture: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.codegen import CodeGenConfig

# CodeGen-350M's proportions: a quarter of each head rotates (2 of 8 dimensions); two heads in each of the 4 blocks
CODEGEN = Family("CodeGenConfig", dict(n_embd=64, n_layer=2, n_head=8, n_positions=64, rotary_dim=2))
# one head per block, the whole head rotating, a tied head, n_inner, the tanh GELU, another epsilon
TIED = Family(
    "CodeGenConfig",
    dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=16, n_inner=80, tie_word_embeddings=True,
         activation_function="gelu_fast", layer_norm_epsilon=1e-3),
)  # fmt: skip
FAMILIES = {"codegen": CODEGEN, "tied": TIED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    CODEGEN.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    CODEGEN.check_compiled_step(tmp_path_factory, home)


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default target for codegen, the packed qkv_proj: adapters made by peft and by autolm agree."""
    CODEGEN.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["qkv_proj"]


def test_lora_config_defaults_follow_peft(tmp_path_factory):
    """LoraConfig() targets what peft's does for codegen (the packed qkv_proj); layers_to_transform counts the `h.N`
    layers as peft does."""
    import peft

    directory, hf = CODEGEN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for kwargs in (dict(r=2), dict(r=2, target_modules=["fc_in", "out_proj"], layers_to_transform=[1])):
        ours = autolm.get_peft_model(model, autolm.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(hf, peft.LoraConfig(**kwargs))
        names = {n for n, _ in ours.named_parameters() if ".lora_" in n}
        assert names and names == {n for n, _ in theirs.named_parameters() if ".lora_" in n}
        ours.unload(), theirs.unload()


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    CODEGEN.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the state dict, the saved tensors and config.json (n_ctx, and
    pad_token_id as set) are transformers'."""
    model, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "transformer.h.0.attn.qkv_proj.weight" in saved and "lm_head.bias" in saved
    assert (model.lm_head.weight is model.transformer.wte.weight) == (name == "tied")


def test_disk_offload(tmp_path_factory, tmp_path):
    CODEGEN.check_disk_offload(tmp_path_factory, tmp_path)


def test_block_layout_matters(tmp_path_factory):
    """The split is transformers' [q | v | k] per block: reading qkv_proj's rows as [q | k | v] per block, or as
    all q, all k, all v, changes the logits."""
    directory, _ = CODEGEN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        weights = [layer.attn.qkv_proj.weight for layer in model.transformer.h]
        originals = [w.clone() for w in weights]
        for order in ((0, 2, 1), None):
            for w, orig in zip(weights, originals, strict=True):
                blocks = orig.view(4, 3, 16, 64)
                w.copy_(
                    blocks[:, list(order)].reshape(orig.shape)
                    if order
                    else blocks.transpose(0, 1).reshape(orig.shape)
                )
            assert not torch.allclose(model(ids, attention_mask=mask).logits, want, atol=1e-3), order


# ---- config.json ----------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """CodeGenConfig() writes transformers' CodeGenConfig() (initializer_range, which autolm keeps only where
    config.json has it, aside): n_ctx, no pad_token_id."""
    import transformers

    theirs = json.loads(transformers.CodeGenConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert CodeGenConfig().to_dict() == theirs and "pad_token_id" not in theirs
    c = CodeGenConfig(n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_ctx=512, pad_token_id=0)
    assert (c.hidden_size, c.head_dim, c.n_ctx, c.to_dict()["pad_token_id"]) == (64, 8, 512, 0)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(n_head=2, n_embd=32), "n_head"),  # 4 blocks of heads
        (dict(n_head=6, n_embd=48), "n_head"),
        (dict(rotary_dim=32), "rotary_dim"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="codegen", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_splits_whole_blocks(tmp_path_factory):
    """The plan splits qkv_proj by rows, which holds 4 blocks of heads: 2 or 4 ranks take whole blocks, 8 would cut
    them and are refused by name (before any weight is read)."""
    model = autolm.AutoModelForCausalLM.from_pretrained(CODEGEN.checkpoint(tmp_path_factory)[0])
    assert model.tp_plan()["transformer.h.0.attn.qkv_proj"] == "colwise"
    with pytest.raises(ConfigError, match="qkv_proj holds its heads in 4 blocks"):
        model.shard_heads(8)
    model.shard_heads(2)
    assert model.transformer.h[0].attn.num_heads == 4
