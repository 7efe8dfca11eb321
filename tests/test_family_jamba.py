"""Jamba against transformers (its Mamba torch fallback): four layers, Mamba (with experts), attention (dense MLP,
GQA, no position embedding), Mamba (with experts), Mamba (dense MLP); the Mamba layers' dt/B/C RMS norms with
weights, an explicit mamba_dt_rank, 4 experts of which each token uses 2 (not renormalised). The checkpoint holds
one tensor per expert, as transformers writes it. The battery for recurrent families, pieces through the cache
against the whole, a long generation equal to transformers', the CLI (Jamba-v0.1 ships no chat template),
config errors, and GGUF in and out as llama.cpp's JambaModel converter writes it."""

from __future__ import annotations

import os

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

JAMBA = Family(
    "JambaConfig",
    dict(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_layer_period=4,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        num_experts=4,
        num_experts_per_tok=2,
        mamba_d_state=8,
        mamba_dt_rank=6,
        max_position_embeddings=256,
    ),
    lora_targets=["q_proj", "v_proj", "in_proj", "x_proj", "out_proj", "gate_proj", "up_proj", "down_proj"],
)


def test_logits(tmp_path_factory):
    JAMBA.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    JAMBA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    JAMBA.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    JAMBA.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the scan): transformers' tokens."""
    JAMBA.check_long_generation(tmp_path_factory)


def test_pieces_equal_the_whole(tmp_path_factory, monkeypatch):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (scan blocks of 16 crossed) give the logits
    of one forward, and transformers'; attention layers keep keys, Mamba layers only states."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 16)
    cache = JAMBA.check_pieces(tmp_path_factory)
    assert sorted(cache.states) == [0, 2, 3] and cache.keys[1].shape[1:] == (2, cache.capacity, 16)


def test_lora(tmp_path_factory, tmp_path):
    JAMBA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    JAMBA.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only transformers' config
    keys in the files autolm saves."""
    _, saved = JAMBA.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.0.mamba.dt_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.feed_forward.experts.3.up_proj.weight"} <= saved  # fmt: skip


def test_disk_offload(tmp_path_factory, tmp_path):
    JAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(JAMBA, tmp_path_factory, tmp_path, "JambaForCausalLM (jamba)")


def test_layer_kinds():
    """Attention and experts where the periods and offsets say (transformers' defaults: attention every 8th layer
    from the 5th, experts every 2nd from the 2nd)."""
    from autolm.models.jamba import JambaConfig

    c = JambaConfig(num_hidden_layers=16)
    assert [i for i in range(16) if c.is_attention(i)] == [4, 12]
    assert [i for i in range(16) if c.has_experts(i)] == list(range(1, 16, 2))
    assert not JambaConfig(num_experts=1, num_experts_per_tok=1).has_experts(1)
    assert JambaConfig(hidden_size=100, num_attention_heads=4, num_key_value_heads=2).mamba_dt_rank == 7


@pytest.mark.parametrize(
    "key, value",
    [
        ("attn_layer_offset", 8),
        ("expert_layer_offset", -1),
        ("attn_layer_period", 0),
        ("mamba_d_state", 0),
        ("mamba_dt_rank", "big"),
        ("mamba_conv_bias", "yes"),
        ("num_experts_per_tok", 5),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.jamba import JambaConfig

    base = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_experts=4
    )
    with pytest.raises(autolm.ConfigError, match=key):
        JambaConfig.from_dict({**base, key: value})


# ---- GGUF: llama.cpp's JambaModel converter, emulated --------------------------------------------------------------

# JAMBA (attention on layer 1, experts on 0 and 2, an untied head) and a second pattern: attention on 1 and 3,
# experts on 2 only, a tied head
PATTERN = Family(
    "JambaConfig",
    dict(
        JAMBA.kwargs,
        num_hidden_layers=5,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=3,
        expert_layer_offset=2,
        tie_word_embeddings=True,
    ),
    lora_targets=JAMBA.lora_targets,
)
GGUF_FAMILIES = (JAMBA, PATTERN)  # for test_gguf_out
IDS = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))


def write_jamba_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter (JambaModel) makes of transformers' Jamba `hf` (--outtype f32, or q8_0: 2-D
    and 3-D ".weight" tensors in Q8_0 but ssm_conv1d and the router, F16 where a row is no whole block), from the
    checkpoint file: its set_gguf_parameters keys (head_count_kv per layer: 0 on Mamba layers), A as -exp(A_log),
    the conv squeezed, each layer's experts stacked (under the name "mlp.experts", as Qwen2-MoE's), the head
    omitted where the checkpoint has none (tied)."""
    import gguf
    import numpy as np
    from gguf_mimic import add_q8_0, add_toy_vocab, stacked_experts
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    n = c.num_hidden_layers
    w = gguf.GGUFWriter(path, "jamba")
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    offset, period = c.attn_layer_offset, c.attn_layer_period
    w.add_head_count_kv(
        [0] * offset + [c.num_key_value_heads if (i - offset) % period == 0 else 0 for i in range(offset, n)]
    )
    w.add_ssm_conv_kernel(c.mamba_d_conv)
    w.add_ssm_inner_size(c.mamba_expand * c.hidden_size)
    w.add_ssm_state_size(c.mamba_d_state)
    w.add_ssm_time_step_rank(c.mamba_dt_rank)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.JAMBA, n)
    sd = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(sd, ".feed_forward.experts.", c.num_experts):
        name = name.replace(".feed_forward.experts.", ".mlp.experts.")
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        if name.endswith("conv1d.weight"):
            t = t.squeeze()
        out = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if out is None:
            base, suffix = name.rsplit(".", 1)
            out = f"{names.get_name(base)}.{suffix}"
        a = np.ascontiguousarray(t.float().numpy())
        if (
            q8
            and a.ndim >= 2
            and out.endswith(".weight")
            and not out.endswith(("ssm_conv1d.weight", "gate_inp.weight"))
        ):
            add_q8_0(w, out, a)
            continue
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", GGUF_FAMILIES, ids=["untied", "tied"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """The converter's file loads as JambaForCausalLM with transformers' logits (the attention and expert layers
    found again from the KV head counts and the routers; A read back as log(-(-exp(A_log))): within a last bit);
    its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in their blocks, within their rounding."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_jamba_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "JambaForCausalLM"
    c, theirs, n = model.config, hf.config, hf.config.num_hidden_layers
    assert [c.is_attention(i) for i in range(n)] == [i % theirs.attn_layer_period == theirs.attn_layer_offset
                                                     for i in range(n)]  # fmt: skip
    assert [c.has_experts(i) for i in range(n)] == [i % theirs.expert_layer_period == theirs.expert_layer_offset
                                                    for i in range(n)]  # fmt: skip
    assert (c.num_key_value_heads, c.mamba_dt_rank, c.mamba_d_state, c.num_experts) == (2, 6, 8, 4)
    assert c.tie_word_embeddings == theirs.tie_word_embeddings
    torch.testing.assert_close(model.model.layers[0].mamba.A_log, hf.model.layers[0].mamba.A_log)
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    write_jamba_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.model.layers[0].mamba.in_proj, "ggml_type")
    with torch.no_grad():
        got = kept(IDS).logits
    # this random model is sensitive (Q8_0's rounding of the Mamba layers' weights alone moves its logits by ~20%;
    # llama.cpp's own run of the Q8_0 file agrees with autolm's within ~3%): every dequantized weight within
    # Q8_0's rounding of the F32 one, the logits within that sensitivity
    f32 = model.state_dict()
    for name, t in (
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf").state_dict().items()
    ):
        assert (t - f32[name]).norm() <= 0.01 * f32[name].norm(), name
    assert 0 < (got - want).norm() / want.norm() < 0.35


@pytest.mark.parametrize(
    "field, value", [("mamba_proj_bias", True), ("mamba_conv_bias", False), ("mamba_expand", 3)]
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    field,
    value,
):
    """in/out projection biases, a conv without bias, another expansion (llama.cpp's graph has none of them):
    refused, naming the field, and no file is written."""
    from autolm.gguf_writer import save_gguf

    family = Family("JambaConfig", {**JAMBA.kwargs, field: value})
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'jamba' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert os.listdir(tmp_path) == []


def test_layer_pattern_from_the_layers():
    """Jamba's period and offset found from the layers llama.cpp's file marks (none, one, several); layers that
    are no such pattern refused."""
    from autolm.models.jamba_gguf import period_and_offset

    assert period_and_offset([4, 12, 20, 28], 32, "attn") == (8, 4)
    assert period_and_offset([1], 4, "attn") == (4, 1)
    assert period_and_offset([], 4, "expert") == (5, 4)
    with pytest.raises(autolm.ConfigError, match="expert_layer_period"):
        period_and_offset([1, 2, 4], 6, "expert")
    with pytest.raises(autolm.ConfigError, match="attn_layer_period"):
        period_and_offset([3, 5], 6, "attn")  # offset 3 is not below period 2
