"""Granite 4.0 hybrid against transformers (its Mamba-2 torch fallback): Mamba-2, attention and Mamba-2 layers with
2 groups of B/C and chunks of 8 tokens (so prompts and pieces cross chunk boundaries), attention with RoPE, GQA and
biases, every Granite multiplier away from 1, 4 experts of which each token uses 2 beside the shared MLP; a dense
checkpoint (no experts, no RoPE, as granite-4.0-micro / h-micro ship); the battery for recurrent families, the
chunked scan against the plain recurrence, a long generation (the one-token recurrence) equal to transformers',
the CLI with Granite 3.3's chat template (Granite 4.0's is not among tests/data/chat_templates) and config errors."""

from __future__ import annotations

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    shared_intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    layer_types=["mamba", "attention", "mamba"],
    mamba_n_heads=8,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_chunk_size=8,
)
HYBRID = Family(
    "GraniteMoeHybridConfig",
    dict(
        SIZES,
        num_local_experts=4,
        num_experts_per_tok=2,
        position_embedding_type="rope",
        embedding_multiplier=3.0,
        residual_multiplier=0.6,
        attention_multiplier=0.09,
        logits_scaling=2.5,
        attention_bias=True,
    ),
    lora_targets=["q_proj", "v_proj", "in_proj", "out_proj"],  # peft has no default for granitemoehybrid
)
DENSE = Family(
    "GraniteMoeHybridConfig",
    dict(SIZES, num_local_experts=0, tie_word_embeddings=True, embedding_multiplier=2.0, logits_scaling=1.5),
)


@pytest.mark.parametrize("family", [HYBRID, DENSE], ids=["moe", "dense"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [HYBRID, DENSE], ids=["moe", "dense"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HYBRID.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    HYBRID.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill, 9 chunks in all):
    transformers' greedy tokens."""
    directory, hf = HYBRID.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    prompt = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    ours = model.generate(prompt, max_new_tokens=45, do_sample=False)
    theirs = hf.generate(prompt, max_new_tokens=45, do_sample=False)
    assert torch.equal(ours, theirs)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside chunks
    of 8, single tokens between them) give the logits of one forward, and transformers'."""
    directory, hf = HYBRID.checkpoint(tmp_path_factory)
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
        conv.shape == (2, 64 * 2 + 2 * 2 * 16, 3)
        and ssm.shape == (2, 8, 16, 16)
        and ssm.dtype == torch.float32
    )


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_scan_is_the_recurrence(chunk):
    """ssd_scan from a given state over 23 tokens equals ssd_step token by token (states and outputs)."""
    from autolm.nn.mamba2 import ssd_scan, ssd_step

    g = torch.Generator().manual_seed(0)
    b, t, h, p, n = 2, 23, 3, 4, 5
    x, B, C = (torch.randn(b, t, h, k, generator=g) for k in (p, n, n))
    dt = torch.rand(b, t, h, generator=g)
    A = -torch.rand(h, generator=g) - 0.5
    state = torch.randn(b, h, p, n, generator=g)
    y, final = ssd_scan(x, dt, A, B, C, chunk, state)
    ys = []
    for i in range(t):
        out, state = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state)
        ys.append(out)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)


def test_lora(tmp_path_factory, tmp_path):
    HYBRID.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HYBRID.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("family", [HYBRID, DENSE], ids=["moe", "dense"])
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict; the checkpoint's (input_linear, output_linear, router.layer) and
    only transformers' config keys in the files autolm saves."""
    import json

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
        assert "model.layers.0.mamba.A_log" in set(ours.keys())
        assert ("model.layers.1.block_sparse_moe.input_linear.weight" in set(ours.keys())) == (
            family is HYBRID
        )
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["time_step_limit"] == configs[0]["time_step_limit"]


def test_disk_offload(tmp_path_factory, tmp_path):
    HYBRID.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(HYBRID.config_cls, dict(HYBRID.kwargs, max_position_embeddings=2048))  # a long system turn
    check_cli(long, "granite-3.3-2b-instruct.jinja", tmp_path_factory, tmp_path,
              "GraniteMoeHybridForCausalLM (granitemoehybrid)")  # fmt: skip


def test_config_reads_the_hub_spelling():
    """Released configs name layers "mamba" / "attention" and may write infinity as JSON's Infinity: read, kept."""
    from autolm.models.granitemoehybrid import GraniteMoeHybridConfig

    d = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mamba_n_heads=8,
             layer_types=["mamba", "attention"], time_step_limit=[0.0, float("inf")])  # fmt: skip
    c = GraniteMoeHybridConfig.from_dict(d)
    assert c.is_mamba(0) and not c.is_mamba(1) and c.mamba_d_head == 16
    assert c.step_limit() == (0.0, float("inf")) and c.to_dict()["layer_types"] == ["mamba", "attention"]
    assert GraniteMoeHybridConfig(num_hidden_layers=2).layer_types == ["linear_attention"] * 2


@pytest.mark.parametrize(
    "key, value",
    [
        ("mamba_d_head", 12),
        ("mamba_n_groups", 3),
        ("mamba_chunk_size", 0),
        ("layer_types", ["mamba", "sliding_attention"]),
        ("num_local_experts", -1),
        ("num_experts_per_tok", 5),
        ("shared_intermediate_size", 0),
        ("position_embedding_type", "alibi"),
        ("time_step_limit", [0.1]),
        ("mamba_conv_bias", "yes"),
        ("logits_scaling", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.granitemoehybrid import GraniteMoeHybridConfig

    base = dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, mamba_n_heads=8, num_local_experts=4
    )
    with pytest.raises(autolm.ConfigError, match=key):
        GraniteMoeHybridConfig.from_dict({**base, key: value})
