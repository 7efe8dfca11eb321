"""Falcon-H1 against transformers (its Mamba-2 torch fallback): attention and Mamba-2 in parallel in each of 3
layers, every multiplier away from 1 (embeddings, logits, keys, attention in/out, SSM in/out, the MLP's two, the
five of the µP vector), a mixer narrower than mamba_expand * hidden_size (mamba_d_ssm), 2 groups of B/C and chunks
of 8 tokens, biases on attention, MLP and out_proj; the gated RMSNorm of the mixer in both orders (mamba_rms_norm,
mamba_norm_before_gate) with a tied head; the battery for recurrent families, a long generation (the one-token
recurrence) equal to transformers', pieces through the cache across chunks, the CLI with Qwen 3's ChatML template
(Falcon-H1's own is not among tests/data/chat_templates) and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    mamba_d_ssm=96,
    mamba_n_heads=8,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_chunk_size=8,
)
MULTIPLIERS = dict(
    lm_head_multiplier=0.5,
    embedding_multiplier=2.0,
    mlp_multipliers=[1.5, 0.5],
    key_multiplier=0.8,
    attention_out_multiplier=0.7,
    attention_in_multiplier=1.2,
    ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 1.3],
    ssm_in_multiplier=1.1,
    ssm_out_multiplier=0.6,
)
H1 = Family(
    "FalconH1Config",
    dict(SIZES, **MULTIPLIERS, attention_bias=True, mlp_bias=True, projectors_bias=True),
    # peft has no default for falcon_h1: attention, the mixer's in_proj (peft refuses out_proj) and the MLP
    lora_targets=["q_proj", "v_proj", "in_proj", "gate_proj", "down_proj"],
)
# in_proj's bias at left padding enters the conv's window (in transformers too): not with the recurrent checks
NORMED = Family(
    "FalconH1Config",
    dict(
        SIZES,
        **MULTIPLIERS,
        mamba_rms_norm=True,
        mamba_norm_before_gate=True,
        mamba_proj_bias=True,
        tie_word_embeddings=True,
    ),
)
NORM_AFTER = Family(
    "FalconH1Config",
    dict(SIZES, **MULTIPLIERS, mamba_rms_norm=True, mamba_norm_before_gate=False, mamba_d_ssm=None),
)
ALL = pytest.mark.parametrize("family", [H1, NORMED, NORM_AFTER], ids=["plain", "norm-before", "norm-after"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [H1, NORMED], ids=["plain", "normed"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    H1.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    H1.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill, 9 chunks in all):
    transformers' greedy tokens."""
    H1.check_long_generation(tmp_path_factory)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache give the logits of one forward, and
    transformers'; every layer keeps keys and values and a Mamba-2 state."""
    cache = H1.check_pieces(tmp_path_factory)
    conv, ssm = cache.states[2]
    assert (
        conv.shape == (2, 96 + 2 * 2 * 16, 3) and ssm.shape == (2, 8, 12, 16) and ssm.dtype == torch.float32
    )
    assert set(cache.states) == {0, 1, 2} and cache.layers[2].keys.shape == (2, 2, 70, 16)


def test_lora(tmp_path_factory, tmp_path):
    H1.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    H1.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict and the files; only transformers' config keys saved."""
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
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["time_step_limit"] == configs[0]["time_step_limit"]
    assert configs[1]["mamba_d_head"] == configs[0]["mamba_d_head"]


def test_disk_offload(tmp_path_factory, tmp_path):
    H1.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    long = Family(H1.config_cls, dict(H1.kwargs, max_position_embeddings=2048))  # a long system turn
    check_cli(long, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "FalconH1ForCausalLM (falcon_h1)")


@pytest.mark.parametrize(
    "key, value",
    [
        ("mamba_d_head", 7),
        ("mamba_n_groups", 3),
        ("mamba_chunk_size", 0),
        ("time_step_limit", [0.1]),
        ("mlp_multipliers", [1.0]),
        ("ssm_multipliers", [1, 1, 1, 1, "x"]),
        ("key_multiplier", None),
        ("mamba_rms_norm", "yes"),
        ("projectors_bias", 1),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.falcon_h1 import FalconH1Config

    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, mamba_n_heads=8,
                mamba_d_ssm=96)  # fmt: skip
    with pytest.raises(autolm.ConfigError, match=key):
        FalconH1Config.from_dict({**base, key: value})


# ---- GGUF: llama.cpp's FalconH1Model converter, emulated ---------------------------------------------------------

# what llama.cpp's graph runs: no biases but the conv's, the gated norm absent or after the gate; every multiplier
# away from 1 (folded into the weights)
GGUF_PLAIN = Family("FalconH1Config", dict(SIZES, **MULTIPLIERS), lora_targets=H1.lora_targets)
GGUF_NORMED = Family(
    "FalconH1Config", dict(SIZES, **MULTIPLIERS, mamba_rms_norm=True, mamba_norm_before_gate=False)
)
GGUF_FAMILIES = (GGUF_PLAIN, GGUF_NORMED)  # for test_gguf_out


def _converted(name: str, t: torch.Tensor, c, raw: dict) -> torch.Tensor:
    """Mamba2Model.modify_tensors (the conv squeezed, A and D as (H, 1), A as -exp(A_log), the norm as (groups,
    width / groups)), then FalconH1Model's multipliers, in its order."""
    width, gs = raw["mamba_d_ssm"], raw["mamba_n_groups"] * raw["mamba_d_state"]
    if name.endswith("conv1d.weight"):
        t = t.squeeze()
    elif name.endswith((".A_log", ".D")):
        t = t.reshape(*t.shape, 1)
    elif name.endswith("mamba.norm.weight"):
        t = t.reshape(c.mamba_n_groups, -1)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    m = raw
    if "down_proj" in name:
        t = t * m["mlp_multipliers"][1]
    elif "gate_proj" in name:
        t = t * m["mlp_multipliers"][0]
    elif "k_proj" in name:
        t = t * m["key_multiplier"] * m["attention_in_multiplier"]
    elif "q_proj" in name or "v_proj" in name:
        t = t * m["attention_in_multiplier"]
    elif "o_proj" in name:
        t = t * m["attention_out_multiplier"]
    elif "out_proj" in name:
        t = t * m["ssm_out_multiplier"]
    elif "in_proj" in name:
        t = t * m["ssm_in_multiplier"]
        z = m["ssm_multipliers"]
        t[:width, :] *= z[0]
        t[width : 2 * width, :] *= z[1]
        t[2 * width : 2 * width + gs, :] *= z[2]
        t[2 * width + gs : 2 * width + 2 * gs, :] *= z[3]
        t[2 * width + 2 * gs :, :] *= z[4]
    elif "lm_head" in name:
        t = t * m["lm_head_multiplier"]
    elif "embed_tokens" in name:
        t = t * m["embedding_multiplier"]
    return t


def write_falcon_h1_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter (FalconH1Model over Mamba2Model) makes of transformers' Falcon-H1 `hf`
    (--outtype f32, or q8_0: 2-D weights in Q8_0 but ssm_conv1d and the norms, F16 where a row is no whole block),
    from the checkpoint file: Mamba2Model's ssm.* keys with FalconH1Model's attention keys over them (the last
    value of each key written), the multipliers folded into the weights, dt_bias as ssm_dt.bias, the feed-forward
    norm as ffn_norm without ".weight" (the name map gives pre_ff_layernorm.weight whole)."""
    import gguf
    import numpy as np
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    raw = json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "falcon-h1")
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(raw["intermediate_size"])
    w.add_head_count(raw["num_attention_heads"])
    w.add_block_count(c.num_hidden_layers)
    w.add_ssm_conv_kernel(raw["mamba_d_conv"])
    w.add_ssm_inner_size(raw["mamba_d_ssm"])
    w.add_ssm_state_size(raw["mamba_d_state"])
    w.add_ssm_time_step_rank(raw["mamba_d_ssm"] // raw["mamba_d_head"])
    w.add_ssm_group_count(raw["mamba_n_groups"])
    w.add_layer_norm_rms_eps(raw["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(raw["vocab_size"])
    w.add_head_count_kv(raw["num_key_value_heads"])
    head_dim = raw.get("head_dim") or c.hidden_size // raw["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = raw.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))))
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.FALCON_H1, c.num_hidden_layers)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        t = _converted(name, t, c, raw)
        out = names.get_name(name)  # ssm_a, ssm_d, ffn_norm: no suffix
        if out is None:
            base, suffix = name.rsplit(".", 1)
            out = f"{names.get_name(base)}.{suffix}"
        a = np.ascontiguousarray(t.float().numpy())
        stem = out.split(".")[-2] if out.count(".") > 1 else out
        quantized = q8 and a.ndim >= 2 and out.endswith(".weight") and not out.endswith("_norm.weight")
        if quantized and stem != "ssm_conv1d" and a.shape[-1] % 32 == 0:
            w.add_tensor(out, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
            continue
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


IDS = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", GGUF_FAMILIES, ids=["plain", "normed"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """The converter's file loads as FalconH1ForCausalLM (every multiplier 1, the weights folded) with
    transformers' logits (A read back as log(-(-exp(A_log))): within a last bit); its Q8_0 version with
    quantization="gguf" keeps the Q8_0 weights in their blocks, within their rounding."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_falcon_h1_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "FalconH1ForCausalLM"
    c = model.config
    assert (c.mamba_ssm_width, c.mamba_d_head, c.head_dim, c.mamba_n_groups) == (96, 12, 16, 2)
    assert c.mamba_rms_norm == family.kwargs.get("mamba_rms_norm", False) and c.key_multiplier == 1.0
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    write_falcon_h1_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.model.layers[0].mamba.in_proj, "ggml_type")
    with torch.no_grad():
        got = kept(IDS).logits
    assert 0 < (got - want).norm() / want.norm() < 0.15  # Q8_0's rounding of these random weights


@pytest.mark.parametrize(
    "family, field",
    [(H1, "attention_bias"), (NORMED, "mamba_norm_before_gate")],
    ids=["biases", "norm_before"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    family,
    field,
):
    """Biases (llama.cpp's graph has none but the conv's) and the gated norm before the gate: refused, naming the
    field."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'falcon_h1' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
