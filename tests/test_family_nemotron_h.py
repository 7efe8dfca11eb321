"""Nemotron-H against transformers (its Mamba-2 torch fallback): a Nemotron 3 Nano-like stack (Mamba-2, MoE,
attention, Mamba-2 blocks; 2 groups of B/C, chunks of 8 tokens so prompts and pieces cross chunk boundaries;
biases on the MLP projections (and on the Mamba ones in the other two); sigmoid routing in 2 groups choosing 1, routed_scaling_factor 2.5),
a Nemotron 3 Super-like one (the experts behind latent projections) and a dense Nemotron-H / Nano 2 one (Mamba-2,
MLP, attention, MLP, Mamba-2); the battery for recurrent families, a long generation (the one-token recurrence)
equal to transformers', pieces through the cache across chunks, the released checkpoints' config spelling
(hybrid_override_pattern, num_hidden_layers, MTP weights), the CLI with Qwen 3's ChatML template (Nemotron's own
is not among tests/data/chat_templates) and config errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    mamba_num_heads=8,
    mamba_head_dim=16,
    ssm_state_size=16,
    n_groups=2,
    chunk_size=8,
    use_bias=True,
    mlp_bias=True,
)
MOE = dict(
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
)
NANO3 = Family(
    "NemotronHConfig",
    # no Mamba projection biases (none of the released checkpoints has them): in_proj's bias at left padding
    # enters the conv's window (in transformers too), so a padded row's tokens would not be its own alone
    dict(
        SIZES,
        **MOE,
        use_bias=False,
        layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention"],
    ),
    # peft default: q/k/v/o_proj; also the Mamba in_proj (peft refuses out_proj) and the MLPs
    lora_targets=["q_proj", "v_proj", "in_proj", "up_proj", "down_proj"],
)
SUPER = Family(
    "NemotronHConfig",
    dict(SIZES, **MOE, moe_latent_size=40, layers_block_type=["linear_attention", "moe", "full_attention"]),
)
DENSE = Family(
    "NemotronHConfig",
    dict(SIZES, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]),
)
ALL = pytest.mark.parametrize("family", [NANO3, SUPER, DENSE], ids=["moe", "latent", "dense"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [NANO3, DENSE], ids=["moe", "dense"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    NANO3.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    NANO3.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill, 9 chunks in all):
    transformers' greedy tokens."""
    directory, hf = NANO3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=45, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=45, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside chunks
    of 8, single tokens between them) give the logits of one forward, and transformers'."""
    directory, hf = NANO3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        cache, parts, start = None, [], 0
        for n in (5, 13, 1, 1, 30, 20):
            out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + n
            parts.append(out.logits)
        theirs = hf(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, theirs, atol=1e-4, rtol=1e-4)
    conv, ssm = cache.states[0]
    assert (
        conv.shape == (2, 8 * 16 + 2 * 2 * 16, 3)
        and ssm.shape == (2, 8, 16, 16)
        and ssm.dtype == torch.float32
    )
    assert set(cache.states) == {0, 3}  # the Mamba-2 blocks only


def test_lora(tmp_path_factory, tmp_path):
    NANO3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NANO3.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict; the checkpoint's (backbone., one tensor per expert) and only
    transformers' config keys in the files autolm saves."""
    from safetensors import safe_open

    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
        assert "backbone.layers.0.mixer.A_log" in set(ours.keys())
        assert ("backbone.layers.1.mixer.experts.3.up_proj.weight" in set(ours.keys())) == (
            family is not DENSE
        )
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["layers_block_type"] == configs[0]["layers_block_type"]


def test_disk_offload(tmp_path_factory, tmp_path):
    NANO3.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(NANO3.config_cls, dict(NANO3.kwargs, max_position_embeddings=2048))  # a long system turn
    check_cli(long, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "NemotronHForCausalLM (nemotron_h)")


def test_released_config_spelling(tmp_path_factory, tmp_path):
    """A checkpoint as NVIDIA ships it: hybrid_override_pattern and num_hidden_layers for the blocks, the old
    mamba_chunk_size spelling, rope_theta and MTP weights (skipped): transformers' logits; saved as written."""
    from safetensors.torch import load_file, save_file

    directory, hf = NANO3.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "released")
    cfg = json.load(open(tmp_path / "released" / "config.json"))
    del cfg["layers_block_type"], cfg["chunk_size"]
    cfg.update(hybrid_override_pattern="ME*M", num_hidden_layers=4, mamba_chunk_size=8, rope_theta=10000)
    json.dump(cfg, open(tmp_path / "released" / "config.json", "w"))
    tensors = load_file(tmp_path / "released" / "model.safetensors")
    tensors["mtp.layers.0.norm.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / "released" / "model.safetensors", metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "released")
    assert model.config.num_hidden_layers == 4 and model.config.chunk_size == 8
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.load(open(tmp_path / "saved" / "config.json"))
    assert saved["hybrid_override_pattern"] == "ME*M" and saved["num_hidden_layers"] == 4
    assert "layers_block_type" not in saved and saved["chunk_size"] == 8 and saved["rope_theta"] == 10000


def test_config_defaults():
    from autolm.models.nemotron_h import NemotronHConfig

    c = NemotronHConfig()
    assert c.layer_types == ["linear_attention", "moe", "full_attention", "mlp"] and c.num_hidden_layers == 4
    d = c.to_dict()
    assert "num_hidden_layers" not in d and "rope_parameters" not in d and d["mlp_hidden_act"] == "relu2"
    c = NemotronHConfig.from_dict(dict(layers_block_type=["mamba", "attention"], hidden_size=64, head_dim=16,
                                       num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert [c.block_type(i) for i in range(2)] == ["linear_attention", "full_attention"]
    assert (
        c.layers_block_type == ["mamba", "attention"]
        and c.mlp_hidden_act == "relu2"
        and c.layer_norm_epsilon == 1e-5
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("layers_block_type", ["mamba", "sliding_attention"]),
        ("hybrid_override_pattern", "MX*"),
        ("n_groups", 3),
        ("chunk_size", 0),
        ("mamba_hidden_act", "tanhx"),
        ("mlp_hidden_act", "nope"),
        ("num_experts_per_tok", 5),
        ("n_group", 3),
        ("moe_latent_size", 0),
        ("time_step_min", -1),
        ("use_conv_bias", "yes"),
        ("layer_norm_epsilon", 0),
        ("routed_scaling_factor", "2"),
        ("tie_word_embeddings", True),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.nemotron_h import NemotronHConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=8,
                n_routed_experts=4)  # fmt: skip
    if key != "hybrid_override_pattern":
        base["layers_block_type"] = ["mamba", "moe", "attention", "mlp"]
    with pytest.raises(autolm.ConfigError, match=key):
        NemotronHConfig.from_dict({**base, key: value})
