"""Kimi Linear against transformers and peft: KDA layers (per-channel decay, short convs over separate q/k/v
projections, the sigmoid-gated output norm) beside MLA layers without RoPE (a plain q_proj in one checkpoint, the
low-rank query with attention biases in the other), dense and mixture feed-forward blocks by mlp_layer_types
(grouped sigmoid routing, renormalised or not, shared experts); the recurrent battery (pieces through the cache,
the serving engine), the chunked per-channel rule against the one-token recurrence, generation past a chunk,
the checkpoint's own names (block_sparse_moe, w1/w2/w3, q/k/v_conv1d, the forget gate on self_attn) and
config.json's attribute_map names, the Hub's linear_attn_config, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults

import autolm
from autolm.errors import ConfigError

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    linear_head_dim=8,
    linear_num_heads=4,
    max_position_embeddings=128,
)
LORA = ["q_proj", "v_proj", "kv_a_proj_with_mqa", "o_proj", "g_a_proj"]  # peft has no default for kimi_linear
KIMI = Family("KimiLinearConfig", SIZES, lora_targets=LORA)
# the low-rank query with biases, a mixture first and last (not renormalised, two shared experts), a 3-tap conv
KIMI_Q = Family(
    "KimiLinearConfig",
    dict(
        SIZES,
        q_lora_rank=24,
        attention_bias=True,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["sparse", "dense", "sparse"],
        norm_topk_prob=False,
        n_shared_experts=2,
        routed_scaling_factor=1.5,
        linear_conv_kernel_dim=3,
    ),
    lora_targets=LORA,
)


@pytest.mark.parametrize("family", [KIMI, KIMI_Q], ids=["plain_q", "low_rank_q"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    KIMI.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the chunked scan, then the one-token recurrence) are transformers';
    the decoded logits equal the whole sequence's in one forward."""
    KIMI_Q.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_pieces(tmp_path_factory):
    """70 tokens in pieces through the cache give one forward's logits and transformers'; the KDA layers keep the
    conv's last K - 1 inputs and a (heads, d, d) fp32 state, the MLA layer its keys and values."""
    cache = KIMI.check_pieces(tmp_path_factory)
    conv, state = cache.state(0)
    assert tuple(conv.shape) == (2, 3 * 32, 3) and state.dtype == torch.float32
    assert tuple(state.shape) == (2, 4, 8, 8)
    assert cache.state(1) is None and cache.keys[1].shape[-1] == 24 and cache.keys[0].shape[-1] == 0


def test_chunked_rule_per_channel_decay():
    """The chunked rule with a decay per key channel (chunks of 64, from a random state, 70 tokens) gives the
    token-by-token recurrence's outputs and final state; a decay per head equals the same decay in every channel."""
    from autolm.nn.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    B, T, H, dk, dv = 2, 70, 3, 8, 6
    q, k = torch.randn(B, T, H, dk, generator=g), torch.randn(B, T, H, dk, generator=g)
    v = torch.randn(B, T, H, dv, generator=g)
    decay = -torch.rand(B, T, H, dk, generator=g) * 0.5
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g)
    a, sa = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    b, sb = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    per_head = decay[..., 0]
    c, sc = chunk_gated_delta_rule(q, k, v, per_head, beta, state)
    d, sd = chunk_gated_delta_rule(q, k, v, per_head[..., None].expand(-1, -1, -1, dk), beta, state)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sc, sd, atol=1e-5, rtol=1e-5)


def test_recurrent(tmp_path_factory, tmp_path):
    KIMI.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    KIMI.check_one_token_step(tmp_path_factory)


def test_bf16(tmp_path_factory):
    KIMI.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    KIMI_Q.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    KIMI.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """The checkpoint's names in the files autolm saves (transformers' names in the state dict), config.json's
    keys and values as transformers wrote them."""
    _, saved = KIMI_Q.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.self_attn.q_conv1d.weight", "model.layers.1.self_attn.A_log",
            "model.layers.2.block_sparse_moe.experts.3.w3.weight"} <= saved  # fmt: skip
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (
        written["num_experts"] == 4
        and written["moe_renormalize"] is False
        and "rope_parameters" not in written
    )


def test_names_and_config(tmp_path_factory, tmp_path):
    model, _ = KIMI.check_names_and_config(tmp_path_factory, tmp_path)
    assert model.config.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_disk_offload(tmp_path_factory, tmp_path):
    KIMI.check_disk_offload(tmp_path_factory, tmp_path)


def test_tensor_parallel_refused(tmp_path_factory):
    """No tensor-parallel plan (DeepSeek-V3's would split the KDA layers' projections): refused by name."""
    directory, _ = KIMI.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_config_defaults_are_transformers():
    from autolm.models.kimi_linear import KimiLinearConfig

    check_config_defaults(KimiLinearConfig)


HUB = dict(
    model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, num_experts=4, num_experts_per_token=2,
    num_expert_group=1, first_k_dense_replace=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    linear_attn_config={"head_dim": 8, "num_heads": 2, "short_conv_kernel_size": 3, "kda_layers": [1, 2, 4],
                        "full_attn_layers": [3]},
)  # fmt: skip


def test_hub_config(tmp_path):
    """Moonshot's config.json (linear_attn_config with 1-based layer lists, first_k_dense_replace) reads as
    transformers reads it; the model built from it gives transformers' logits."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(HUB))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = autolm.AutoConfig.from_pretrained(tmp_path)
    for key in (
        "layer_types",
        "mlp_layer_types",
        "linear_head_dim",
        "linear_num_heads",
        "linear_conv_kernel_dim",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(theirs).eval()
    hf.save_pretrained(tmp_path / "m")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        b = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(mlp_layer_types=["dense", "moe", "sparse", "sparse"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(linear_attn_config=None, linear_head_dim=0), "linear_head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(layer_types=["mamba"] * 4), "layer_types"),
        (dict(linear_attn_config={"kda_layers": [1, 9], "full_attn_layers": [2]}), "linear_attn_config"),
    ],
)
def test_config_errors_name_the_field(change, field):
    from autolm.models.kimi_linear import KimiLinearConfig

    with pytest.raises(ConfigError, match=field):
        KimiLinearConfig.from_dict({**HUB, **change})
