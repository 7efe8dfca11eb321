"""Granite 4.0 hybrid against transformers (its Mamba-2 torch fallback): Mamba-2, attention and Mamba-2 layers with
2 groups of B/C and chunks of 8 tokens (so prompts and pieces cross chunk boundaries), attention with RoPE, GQA and
biases, every Granite multiplier away from 1, 4 experts of which each token uses 2 beside the shared MLP; a dense
checkpoint (no experts, no RoPE, as granite-4.0-micro / h-micro ship); the battery for recurrent families, the
chunked scan against the plain recurrence, a long generation (the one-token recurrence) equal to transformers',
the CLI with Granite 3.3's chat template (Granite 4.0's is not among tests/data/chat_templates) and config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

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
    dict(
        SIZES,
        num_local_experts=0,
        num_experts_per_tok=0,  # as Granite 4.0 H-Micro: no experts, none used, one MLP width
        intermediate_size=48,
        tie_word_embeddings=True,
        embedding_multiplier=2.0,
        logits_scaling=1.5,
    ),  # as Granite 4.0 H-Micro: no experts, none used
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
    HYBRID.check_long_generation(tmp_path_factory)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside chunks
    of 8, single tokens between them) give the logits of one forward, and transformers'."""
    cache = HYBRID.check_pieces(tmp_path_factory)
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


# ---- GGUF: llama.cpp's GraniteHybridModel converter, emulated ----------------------------------------------------

# as Granite 4.0 ships: no RoPE (llama.cpp runs a hybrid without it), chunks of 8 tokens
GGUF_MOE = Family("GraniteMoeHybridConfig", {k: v for k, v in HYBRID.kwargs.items() if k != "position_embedding_type"},
                  lora_targets=HYBRID.lora_targets)  # fmt: skip
GGUF_FAMILIES = (GGUF_MOE, DENSE)  # for test_gguf_out: the MoE and the dense checkpoint
F32_STEMS = ("ssm_conv1d", "ffn_gate_inp")  # 2-D tensors the converter keeps in F32


def _mixer_tensor(name: str, t: torch.Tensor, c) -> tuple[str, torch.Tensor]:
    """Mamba2Model.modify_tensors: dt_bias as dt_proj.bias, the conv squeezed, A as -exp(A_log) and D as (H, 1),
    the norm as (groups, width / groups)."""
    if name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif name.endswith("conv1d.weight"):
        t = t.squeeze()
    elif name.endswith((".A_log", ".D")):
        t = t.reshape(*t.shape, 1)
    elif name.endswith("mamba.norm.weight"):
        t = t.reshape(c.mamba_n_groups, -1)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    return name, t


def write_granitemoehybrid_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' Granite 4.0 hybrid `hf` (--outtype f32, or q8_0: 2-D
    weights in Q8_0 but the F32 ones, F16 where a row is no whole block), from the checkpoint files: Granite MoE's
    keys with the shared MLP's width, the ssm.* sizes, head_count_kv per layer (0 on Mamba-2 layers), RoPE off
    (rope.scaling.finetuned false) and the context length 2**20; q/k rows permuted, input_linear split into gate and
    up (the shared MLP's as *_shexp, or plain ffn_* without experts), the mixers' tensors as Mamba2Model writes them.
    Attention layers: "attention" or transformers 5's "full_attention" (the converter lists the first)."""
    import json

    import gguf
    from gguf_llamacpp import _granite, permute
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    types = json.load(open(f"{hf.name_or_path}/config.json"))["layer_types"]
    attn = [i for i, t in enumerate(types) if t in ("attention", "full_attention")]
    experts = bool(c.num_local_experts)
    w = gguf.GGUFWriter(path, "granitehybrid")
    _granite(w, c)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_feed_forward_length(c.shared_intermediate_size)
    w.add_ssm_conv_kernel(c.mamba_d_conv)
    w.add_ssm_state_size(c.mamba_d_state)
    w.add_ssm_group_count(c.mamba_n_groups)
    w.add_ssm_inner_size(c.mamba_expand * c.hidden_size)
    w.add_ssm_time_step_rank(c.mamba_n_heads)
    w.add_head_count_kv([c.num_key_value_heads if i in attn else 0 for i in range(c.num_hidden_layers)])
    w.add_rope_scaling_finetuned(len(attn) == c.num_hidden_layers)
    if len(attn) < c.num_hidden_layers:
        w.add_context_length(2**20)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, c.num_hidden_layers)
    fmt = gguf.TENSOR_NAMES
    out = []
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        bid = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith("input_linear.weight"):
            half = c.intermediate_size if "block_sparse_moe" in name else c.shared_intermediate_size
            pair = ((gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP) if "block_sparse_moe" in name else
                    (gguf.MODEL_TENSOR.FFN_GATE_SHEXP, gguf.MODEL_TENSOR.FFN_UP_SHEXP) if experts else
                    (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP))  # fmt: skip
            out += [(f"{fmt[k].format(bid=bid)}.weight", p) for k, p in zip(pair, t.split(half, dim=-2))]
            continue
        if name.endswith("shared_mlp.output_linear.weight") and not experts:
            out.append((f"{fmt[gguf.MODEL_TENSOR.FFN_DOWN].format(bid=bid)}.weight", t))
            continue
        if ".mamba." in name:
            name, t = _mixer_tensor(name, t, c)
        if ".q_proj." in name or ".k_proj." in name:
            t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        bare = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if bare is not None:
            out.append((bare, t))
            continue
        base, suffix = name.rsplit(".", 1)
        out.append((f"{names.get_name(base)}.{suffix}", t))
    for name, t in out:
        a = np.ascontiguousarray(t.float().numpy())
        stem = name.split(".")[-2] if name.count(".") > 1 else name
        if q8 and a.ndim >= 2 and name.endswith(".weight") and not name.endswith("_norm.weight"):
            if stem not in F32_STEMS and a.shape[-1] % 32 == 0:
                w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
                continue
        elif q8 and a.ndim >= 2 and stem not in F32_STEMS and a.shape[-1] % 32:  # ssm_a, ssm_d: F16
            w.add_tensor(name, a.astype(np.float16))
            continue
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, hf=None):
    ids, mask = padded_batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("family", GGUF_FAMILIES, ids=["moe", "dense"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """The converter's file loads as GraniteMoeHybridForCausalLM with transformers' logits (A read back as
    log(-(-exp(A_log)))); its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in their blocks, within
    their rounding."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_granitemoehybrid_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "GraniteMoeHybridForCausalLM"
    c = model.config
    assert [c.is_mamba(i) for i in range(3)] == [True, False, True] and c.position_embedding_type is None
    assert c.max_position_embeddings == 2**20  # what the converter writes for a model without RoPE
    torch.testing.assert_close(_logits(model), _logits(hf), atol=1e-4, rtol=1e-4)
    write_granitemoehybrid_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.model.layers[0].mamba.in_proj, "ggml_type")
    got, want = _logits(kept), _logits(hf)
    # Q8_0's rounding of these random weights (and of the activations in the blocks' products): 3 to 9 %
    assert (got - want).norm() / want.norm() < 0.15


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """RoPE in a hybrid (the converter writes rope.scaling.finetuned false: llama.cpp runs it without) and a clamp
    of the time steps (llama.cpp has none), experts used where there are none, a dense MLP of another width than
    intermediate_size are refused, naming the field."""
    from autolm.gguf_writer import save_gguf

    roped = autolm.AutoModelForCausalLM.from_pretrained(HYBRID.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="position_embedding_type"):
        save_gguf(roped, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    directory, _ = GGUF_MOE.checkpoint(tmp_path_factory)
    clamped = autolm.AutoModelForCausalLM.from_pretrained(directory, time_step_limit=[0.0, 10.0])
    with pytest.raises(autolm.ConfigError, match="time_step_limit"):
        save_gguf(clamped, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    # as older transformers wrote it (JSON's Infinity, no tag): no clamp, written
    unclamped = autolm.AutoModelForCausalLM.from_pretrained(directory, time_step_limit=[0.0, float("inf")])
    save_gguf(unclamped, byte_tokenizer, str(tmp_path / "yes.gguf"), "f32")
    # experts used where there are none (llama.cpp asserts on loading the file); a dense MLP (the shared one) of
    # another width than intermediate_size (llama.cpp sizes it by feed_forward_length)
    directory, _ = DENSE.checkpoint(tmp_path_factory)
    for change, field in (
        ({"num_experts_per_tok": 2}, "num_experts_per_tok"),
        ({"intermediate_size": 32}, "shared"),
    ):
        dense = autolm.AutoModelForCausalLM.from_pretrained(directory, **change)
        with pytest.raises(autolm.ConfigError, match=field):
            save_gguf(dense, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


def test_gguf_out_q8_0_keeps_the_mixer_weights_in_blocks(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf's Q8_0 file: ssm_in / ssm_out in Q8_0 blocks, loading back with quantization="gguf" within Q8_0's
    rounding."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = GGUF_MOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    save_gguf(model, byte_tokenizer, str(tmp_path / "q.gguf"), "q8_0")
    kinds = {t.name: int(t.tensor_type) for t in GGUFFile(str(tmp_path / "q.gguf")).tensors}
    assert kinds["blk.0.ssm_in.weight"] == kinds["blk.2.ssm_out.weight"] == 8
    assert kinds["blk.0.ssm_conv1d.weight"] == 0  # F32, as the converter keeps it
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    got, want = _logits(kept), _logits(model)
    assert (got - want).norm() / want.norm() < 0.15
