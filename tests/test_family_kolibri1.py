"""Kolibri-1 against transformers and peft: EXAONE 4's attention (per-head q/k norms, GQA, head_dim != hidden /
heads; sliding layers with RoPE over a 5-slot window shorter than the prompts, the global layer without RoPE) in
GLM-4's four-norm layer, and in every layer 8 stacked experts, 2 per token, chosen by the logits plus a random
e_score_correction_bias and weighted by their sigmoid (renormalised), plus the ungated shared experts; and a second
checkpoint of transformers' default layer types and window (the weights not renormalised, tied embeddings). The
standard battery, config.json as transformers writes it (num_experts as num_local_experts), the default layer
types, the routing's own order (top k of logits + bias, not of sigmoid + bias), the config values refused. llama.cpp
has no Kolibri architecture: no GGUF."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_glm4_moe import RoutedFamily

import autolm

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_experts=8,
    num_experts_per_tok=2,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
# Kolibri-1's shape: sliding layers around a global one (NoPE), the top k renormalised
KOLIBRI = RoutedFamily(
    "Kolibri1Config",
    dict(SIZES, sliding_window=5, norm_topk_prob=True,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    lora_targets=TARGETS,
)  # fmt: skip
# transformers' default layer types (3 layers: all sliding, the 5th would be global) over its default window (513,
# longer than the prompts); plain sigmoid weights; tied embeddings. (transformers' model cannot run without a window:
# its sliding mask needs one whatever the layer types)
PLAIN = RoutedFamily("Kolibri1Config", dict(SIZES, tie_word_embeddings=True), lora_targets=TARGETS)
BOTH = pytest.mark.parametrize("family", [KOLIBRI, PLAIN], ids=["windowed", "plain"])


@BOTH
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    KOLIBRI.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    KOLIBRI.check_bf16(tmp_path_factory)


@BOTH
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    KOLIBRI.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    KOLIBRI.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    KOLIBRI.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    KOLIBRI.check_disk_offload(tmp_path_factory, tmp_path)


@BOTH
def test_save(family, tmp_path_factory, tmp_path):
    """transformers loads autolm's save with equal logits; the files hold the checkpoint's tensor names (one per
    expert, the correction bias as moe.router.expert_bias, the output norms as post_attn_norm / post_ffn_norm, as
    transformers saves them) and config.json its keys and values (num_local_experts), no others."""
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.mlp.experts.7.gate_proj.weight", "model.layers.2.moe.router.expert_bias",
            "model.layers.0.post_attn_norm.weight", "model.layers.0.post_ffn_norm.weight",
            "model.layers.0.mlp.shared_experts.down_proj.weight"} <= saved  # fmt: skip
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (
        written["num_local_experts"] == 8
        and "num_experts" not in written
        and "intermediate_size" not in written
    )


def test_layers_and_routing(tmp_path_factory):
    """The global layer of the windowed model has no RoPE and no window, the sliding ones both; every layer a
    mixture with shared experts; the random correction biases loaded and they change the logits; a bf16 load keeps
    them in fp32."""
    directory, hf = KOLIBRI.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attn = [layer.self_attn for layer in model.model.layers]
    assert [(a.rope, a.sliding_window) for a in attn] == [("default", 5), (None, None), ("default", 5)]
    for i, layer in enumerate(model.model.layers):
        assert type(layer.mlp).__name__ == "SparseMoeBlock" and hasattr(layer.mlp, "shared_experts")
        ours, theirs = (
            layer.mlp.gate.e_score_correction_bias,
            hf.model.layers[i].mlp.gate.e_score_correction_bias,
        )
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.zero_()
        after = model(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-3)
    half = (
        autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).model.layers[0].mlp.gate
    )
    assert (half.weight.dtype, half.e_score_correction_bias.dtype) == (torch.bfloat16, torch.float32)


def test_router_ranks_logits_plus_bias():
    """The experts are the top k of logits + bias (DeepSeek V3 ranks sigmoid(logits) + bias: another choice here),
    weighted by sigmoid(logit), renormalised only with norm_topk_prob."""
    from autolm.models.kolibri1 import Kolibri1TopKRouter

    router = Kolibri1TopKRouter(2, 3, 1, normalize=False)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    ids, weights = router(torch.tensor([[1.0, 3.0]]))  # logits 4, 3: 4 + 0 > 3 + 0.5 (sigmoids: 0.98 < 1.45)
    assert ids.tolist() == [[0]] and torch.allclose(
        weights, torch.tensor([[torch.sigmoid(torch.tensor(4.0))]])
    )
    router.top_k, router.normalize = 2, True
    ids, weights = router(torch.tensor([[1.0, 3.0]]))
    assert ids.tolist() == [[0, 1]] and torch.allclose(weights.sum(-1), torch.ones(1))


def test_defaults_are_transformers():
    """Every key autolm's config writes holds transformers' default; the default layer types (every 5th layer
    global) are transformers' at any depth."""
    import transformers

    check_config_defaults(autolm.Kolibri1Config)
    for n in (1, 7, 10):
        ours = autolm.Kolibri1Config(num_hidden_layers=n).layer_types
        assert ours == transformers.Kolibri1Config(num_hidden_layers=n).layer_types, n


def test_num_experts_spelling(tmp_path_factory, tmp_path):
    """config.json's num_experts (Qwen 3 MoE's field name) reads as num_local_experts does."""
    directory, _ = KOLIBRI.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_experts == model.config.num_local_experts == 8


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(sliding_window=None), "sliding_window"),  # sliding layers need a window
        (dict(sliding_window=0), "sliding_window"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(shared_expert_intermediate_size=None), "shared_expert_intermediate_size"),
        (dict(layer_types=["full_attention"]), "layer_types"),
    ],
)
def test_config_values_are_refused(change, key):
    with pytest.raises(autolm.ConfigError, match=key):
        autolm.Kolibri1Config(**{**SIZES, **change})
