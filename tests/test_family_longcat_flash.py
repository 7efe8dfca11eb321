"""Meituan LongCat-Flash against transformers and peft: two attention + MLP sublayers per decoder layer (attention
layers 2 i and 2 i + 1 in the cache) and the shortcut-connected MoE, DeepSeek-V3's MLA with LongCat's LoRA scaling
of the query and the KV latent, interleaved RoPE with LongCat's 1e7 base; softmax routing over routed and
zero-computation (identity) experts, which the tiny checkpoints do choose, with the correction bias and
routed_scaling_factor. A variant with attention biases, v wider than q/k (q and k zero-padded), YaRN's
mscale_all_dim, a router bias (held, never added) and as many zero experts as routed ones. The standard battery
(no compiled one-token graphs: each decoder layer writes two cache layers), config.json in transformers' keys
(num_layers, ffn_hidden_size, expert_ffn_hidden_size, moe_topk), the config values refused naming the key.
llama.cpp has no LongCat-Flash architecture: no GGUF checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults

import autolm
from autolm.models.longcat_flash import LongcatFlashConfig, ZeroComputeExperts

SIZES = dict(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    ffn_hidden_size=48,
    expert_ffn_hidden_size=16,
    n_routed_experts=4,
    zero_expert_num=2,
    moe_topk=2,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    head_dim=8,
    v_head_dim=12,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
)
# peft has no default target modules for longcat_flash (and its MLP names would reach the stacked experts)
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
LONGCAT = Family("LongcatFlashConfig", SIZES, lora_targets=TARGETS)
# biases on q_a / kv_a / o, v wider than q/k (32 > 24), YaRN with mscale_all_dim, a router bias, 4 zero experts
# beside 4 routed, 3 chosen
VARIANT = Family(
    "LongcatFlashConfig",
    dict(SIZES, attention_bias=True, v_head_dim=32, zero_expert_num=4, moe_topk=3, router_bias=True,
         max_position_embeddings=256,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=TARGETS,
)  # fmt: skip
FAMILIES = {"longcat": LONGCAT, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_experts_are_chosen(tmp_path_factory, name):
    """The router picks zero-computation experts as well as routed ones for the tokens the logits tests run, in
    every layer, and the identity experts' weighted inputs are part of the output."""
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    chosen = []
    for layer in model.model.layers:
        layer.mlp.router.register_forward_hook(lambda m, args, out: chosen.append(out[0]))
    ids, mask = padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(chosen) == len(model.model.layers)
    for ids_chosen, layer in zip(chosen, model.model.layers):
        routed = layer.mlp.experts.num_routed
        assert isinstance(layer.mlp.experts, ZeroComputeExperts)
        assert bool((ids_chosen >= routed).any()) and bool((ids_chosen < routed).any())
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(3, 64)
    torch.testing.assert_close(experts.expert(x, experts.num_experts - 1), x)
    per_row = experts.expert(x, torch.tensor([0, experts.num_experts - 1, 1]))  # a compiled graph's way
    torch.testing.assert_close(per_row[1], x[1])
    torch.testing.assert_close(per_row[0], experts.expert(x[:1], 0)[0], atol=1e-5, rtol=1e-5)


def test_hidden_states_and_attentions(tmp_path_factory):
    """output_hidden_states: one per decoder layer and the final one; output_attentions: one per attention
    sublayer (two per decoder layer), as transformers records them; equal at the real tokens."""
    directory, hf = LONGCAT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    kwargs = dict(attention_mask=mask, position_ids=positions(mask), output_hidden_states=True,
                  output_attentions=True)  # fmt: skip
    with torch.no_grad():
        ours, theirs = model(ids, **kwargs), hf(ids, **kwargs)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    assert len(ours.attentions) == len(theirs.attentions) == 4
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=1e-4)
    for a, b in zip(ours.attentions, theirs.attentions):
        for row in range(ids.shape[0]):
            keep = real[row]
            torch.testing.assert_close(
                a[row][:, keep][:, :, keep], b[row][:, keep][:, :, keep], atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    LONGCAT.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_cache_layers_and_no_compiled_graphs(tmp_path_factory):
    """Two cache layers per decoder layer, each (heads, max(qk_head_dim, v_head_dim)); the compiled one-token
    graphs (one cache layer per decoder layer) are not offered, and generation's auto mode (the eager step) gives
    the general forward's tokens."""
    from test_decode_steps import greedy_steps

    from autolm import step

    for name, width in (("longcat", 24), ("variant", 32)):
        directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert model.attention_shapes() == [(4, width)] * 4
        assert [a.layer_idx for layer in model.model.layers for a in layer.self_attn] == [0, 1, 2, 3]
        ours, theirs = model.model.layers[1].self_attn[1].scaling, hf.model.layers[1].self_attn[1].scaling
        assert ours == pytest.approx(theirs, rel=1e-12)
    assert not step.compilable(model) and step.compiled_plan(model, compile_missing=True) is None
    ids = torch.randint(3, 160, (1, 7), generator=torch.Generator().manual_seed(0))
    assert greedy_steps(model, ids, 12, "auto")[0] == greedy_steps(model, ids, 12, "forward")[0]


def test_static_step(tmp_path_factory):
    """The step compile_decode compiles (the general forward over the static cache's whole capacity, both cache
    layers of every decoder layer), run uncompiled: the general forward's greedy tokens and logits for a
    left-padded batch."""
    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)  # fmt: skip
    model.decode_mode = "forward"
    plain = model.generate(ids, **kwargs)
    model.decode_step = model.step  # what compile_decode installs, uncompiled
    static = model.generate(ids, **kwargs)
    assert model.make_cache(3, 20).static and len(model.make_cache(3, 20).keys) == 4
    assert torch.equal(static.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(plain.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LONGCAT.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict (gate_up_proj stacked over routed and zero experts,
    down_proj over the routed ones); the checkpoint's per-expert tensors and config.json in the saved files."""
    model, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    last = model.model.layers[1].mlp.experts.num_experts - 1
    assert f"model.layers.1.mlp.experts.{last}.gate_proj.weight" in saved
    assert f"model.layers.1.mlp.experts.{last}.down_proj.weight" not in saved
    assert "model.layers.1.mlp.router.classifier.weight" in saved
    assert ("model.layers.1.mlp.router.classifier.bias" in saved) == (name == "variant")


def test_disk_offload(tmp_path_factory, tmp_path):
    LONGCAT.check_disk_offload(tmp_path_factory, tmp_path)


def test_correction_bias_and_mtp(tmp_path_factory, tmp_path):
    """A non-zero e_score_correction_bias changes the choice as in transformers; the multi-token prediction
    module some checkpoints carry (model.mtp.*) is skipped on load."""
    import transformers
    from safetensors.torch import load_file, save_file

    directory, _ = LONGCAT.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "biased")
    path = tmp_path / "biased" / "model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(3)
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.router.e_score_correction_bias"] = torch.randn(6, generator=g) * 0.3
    tensors["model.mtp.layers.0.enorm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "biased", attn_implementation="eager")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "biased")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        plain = autolm.AutoModelForCausalLM.from_pretrained(directory)(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)


# ---- config ------------------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """LongcatFlashConfig() holds transformers' defaults in its keys (rope_theta 1e7, qk_head_dim written);
    initializer_range, kept only where given, aside. num_layers reads back as num_hidden_layers (decoder layers)."""
    import transformers

    check_config_defaults(LongcatFlashConfig)
    theirs = json.loads(transformers.LongcatFlashConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert LongcatFlashConfig().to_dict() == theirs
    c = LongcatFlashConfig.from_dict({"num_layers": 3, "ffn_hidden_size": 96, "moe_topk": 4})
    assert (c.num_hidden_layers, c.num_layers, c.intermediate_size, c.num_experts_per_tok) == (3, 3, 96, 4)
    assert c.rope_theta == 1e7 and c.qk_head_dim == 192


def test_config_errors_name_the_key():
    small = dict(hidden_size=64, num_attention_heads=4, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
                 qk_rope_head_dim=8, head_dim=8, q_lora_rank=32, kv_lora_rank=16)  # fmt: skip
    LongcatFlashConfig.from_dict(small)
    for key, bad in (
        ("num_layers", 0),
        ("ffn_hidden_size", -1),
        ("expert_ffn_hidden_size", "16"),
        ("q_lora_rank", None),
        ("kv_lora_rank", 0),
        ("qk_rope_head_dim", 7),
        ("head_dim", 16),
        ("qk_head_dim", 30),
        ("v_head_dim", 0),
        ("n_routed_experts", 0),
        ("zero_expert_num", -1),
        ("moe_topk", 7),
        ("moe_topk", 0),
        ("routed_scaling_factor", 0),
        ("num_key_value_heads", 2),
        ("router_bias", "yes"),
        ("attention_bias", None),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            LongcatFlashConfig.from_dict({**small, key: bad})
