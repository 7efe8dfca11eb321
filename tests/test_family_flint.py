"""Flint against transformers and peft: Qwen 3 MoE's attention (per-head q/k norms) with gpt-oss' RMSNorm and attention
sinks, RoPE on the sliding-window layers only (window 5, shorter than the prompts; the full-attention layers have no
positional encoding), by default full attention on layers 0, 1 and the last; dense MLPs in mlp_only_layers (0 and 1
by default), elsewhere 8 experts of which each token takes the top 2 sigmoid scores, renormalised, plus an ungated
shared expert. A variant: attention biases, its own layer_types, experts every second layer (decoder_sparse_step)
and no mlp_only_layers, no renormalisation, a tied head, another RoPE base. The checkpoint as transformers writes it
(per-expert tensors, the sinks as self_attn.softmax_offset); the standard battery, the router's weight and the sinks
kept in fp32 under bf16, transformers' config defaults, the config's checks. llama.cpp has no Flint architecture:
no GGUF layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models.flint import FlintConfig

_SHAPE = dict(hidden_size=64, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
              max_position_embeddings=64, sliding_window=5)  # fmt: skip
_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for flint
FLINT = Family("FlintConfig", dict(_SHAPE, num_hidden_layers=5), lora_targets=_LORA)
VARIANT = Family(
    "FlintConfig",
    dict(_SHAPE, num_hidden_layers=4, attention_bias=True, norm_topk_prob=False, tie_word_embeddings=True,
         layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
         mlp_only_layers=[], decoder_sparse_step=2, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
    lora_targets=["q_proj", "o_proj", "gate_proj"],
)  # fmt: skip
FAMILIES = {"flint": FLINT, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    """check_bf16; the router's weight and the sinks load in fp32, as transformers keeps them."""
    FLINT.check_bf16(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(
        FLINT.checkpoint(tmp_path_factory)[0], dtype=torch.bfloat16
    )
    kept = {n: p.dtype for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "sinks"))}
    assert len(kept) == 3 + 5 and set(kept.values()) == {torch.float32}
    assert model.model.layers[2].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FLINT.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FLINT.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    FLINT.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (per expert, the sinks as softmax_offset, the
    ungated shared expert) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.3.mlp.shared_expert.up_proj.weight",
            "model.layers.3.self_attn.softmax_offset"} <= saved  # fmt: skip
    assert not any(".sinks" in k or "shared_expert_gate" in k for k in saved)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; config.json round-trips; per layer: the window, RoPE only where there is one,
    the sinks everywhere, a dense MLP or the mixture as transformers lays them out."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    layers = model.model.layers
    kinds = [type(layer.mlp).__name__ for layer in layers]
    windows = [layer.self_attn.sliding_window for layer in layers]
    assert windows == [hf_layer.self_attn.sliding_window for hf_layer in hf.model.layers]
    assert [layer.self_attn.rope for layer in layers] == [None if w is None else "default" for w in windows]
    assert all(layer.self_attn.sinks.shape == (4,) for layer in layers)
    if name == "flint":
        assert windows == [None, None, 5, 5, None]
        assert kinds == ["GatedMLP", "GatedMLP", *["FlintSparseMoeBlock"] * 3]
    else:
        assert windows == [5, None, 5, 5]
        assert kinds == ["GatedMLP", "FlintSparseMoeBlock"] * 2


def test_default_config_is_transformers():
    """FlintConfig() holds transformers' defaults (49 layers' layer_types and mlp_only_layers derived alike)."""
    import transformers

    check_config_defaults(FlintConfig)
    theirs = json.loads(transformers.FlintConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert FlintConfig().to_dict() == theirs
    assert (
        FlintConfig(num_hidden_layers=7).layer_types
        == transformers.FlintConfig(num_hidden_layers=7).layer_types
    )


def test_softmax_offset_is_the_sinks(tmp_path_factory):
    """The checkpoint's softmax_offset tensors are the model's sinks: changing one changes the logits as in
    transformers."""
    directory, hf = FLINT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    want = hf.state_dict()["model.layers.2.self_attn.sinks"]
    assert torch.equal(model.model.layers[2].self_attn.sinks, want)
    ids, mask = padded_batch()
    pos = positions(mask)
    with torch.no_grad():
        before = model(ids, attention_mask=mask, position_ids=pos).logits
        model.model.layers[2].self_attn.sinks.add_(3.0)
        after = model(ids, attention_mask=mask, position_ids=pos).logits
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step"),
        (dict(mlp_only_layers="0"), "mlp_only_layers"),
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
        (dict(num_hidden_layers=2, layer_types=["full_attention", "local"]), "layer_types"),
        (dict(sliding_window=-1), "sliding_window"),
        (dict(sliding_window=None), "sliding_window"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(attention_bias=1), "attention_bias"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        FlintConfig.from_dict({"model_type": "flint", **bad})
