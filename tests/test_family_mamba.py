"""Mamba against transformers (its torch fallback): every layer a Mamba-1 mixer with in_proj/out_proj biases and a
conv bias, an explicit time_step_rank, the residual in float32 and a tied head; a second checkpoint without biases,
with the residual in the model's dtype and an untied head. The battery for recurrent families (no attention at all:
the cache holds only states), the blocked scan against the one-token recurrence, pieces through the cache against
the whole, a long generation equal to transformers', the CLI (Mamba ships no chat template) and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(hidden_size=64, num_hidden_layers=3, state_size=8, conv_kernel=4, expand=2)
# peft has no default for mamba, refuses out_proj and conv1d; transformers bypasses an adapter on dt_proj
TARGETS = ["in_proj", "x_proj"]
MAMBA = Family("MambaConfig", dict(SIZES, use_bias=True, time_step_rank=6), lora_targets=TARGETS)
PLAIN = Family(
    "MambaConfig",
    dict(SIZES, use_conv_bias=False, residual_in_fp32=False, tie_word_embeddings=False, conv_kernel=3),
)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MAMBA.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without use_bias: with it, padding's inputs are zeroed before in_proj, whose bias then reaches the
    convolution (as in transformers), so a left-padded row's state is not its unpadded one."""
    PLAIN.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the scan): transformers' tokens."""
    MAMBA.check_long_generation(tmp_path_factory)


def test_pieces_equal_the_whole(tmp_path_factory, monkeypatch):
    """170 tokens in pieces of 5, 13, 1, 1, 130 and 20 through the cache (scan blocks of 64 crossed, single tokens
    between pieces) give the logits of one forward, and transformers'; the cache keeps only states."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 64)
    directory, hf = MAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 170), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model(ids).logits
        cache, parts, start = None, [], 0
        for n in (5, 13, 1, 1, 130, 20):
            out = model(ids[:, start : start + n], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + n
            parts.append(out.logits)
        theirs = hf(ids).logits
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(whole, theirs, atol=1e-4, rtol=1e-4)
    conv, ssm = cache.states[0]
    assert conv.shape == (2, 128, 3) and ssm.shape == (2, 128, 8) and ssm.dtype == torch.float32
    assert all(k.shape[-1] == 0 for k in cache.keys)


def test_scan_is_the_recurrence(monkeypatch):
    """selective_scan from a given state over 23 tokens (blocks of 4) equals selective_step token by token."""
    from autolm.nn import mamba1

    monkeypatch.setattr(mamba1, "SCAN_BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    b, t, width, n = 2, 23, 6, 5
    x, dt = torch.randn(b, t, width, generator=g), torch.rand(b, t, width, generator=g)
    B, C = torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)
    A = -torch.rand(width, n, generator=g) - 0.5
    state = torch.randn(b, width, n, generator=g)
    y, final = mamba1.selective_scan(x, dt, A, B, C, state)
    ys = []
    for i in range(t):
        out, state = mamba1.selective_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], state)
        ys.append(out)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(final, state, atol=1e-6, rtol=1e-6)


def test_lora(tmp_path_factory, tmp_path):
    MAMBA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MAMBA.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("family", [MAMBA, PLAIN], ids=["biases", "plain"])
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names in the state dict and the saved files; only transformers' config keys saved."""
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
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert (
        configs[1]["intermediate_size"] == 128
        and configs[1]["time_step_rank"] == configs[0]["time_step_rank"]
    )


def test_old_embedding_name(tmp_path_factory, tmp_path):
    """Checkpoints that name the embeddings `backbone.embedding` (as transformers' load hook reads) load."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    sd = load_file(old / "model.safetensors")
    sd["backbone.embedding.weight"] = sd.pop("backbone.embeddings.weight")
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(old)
    assert torch.equal(model.backbone.embeddings.weight, hf.backbone.embeddings.weight)


def test_disk_offload(tmp_path_factory, tmp_path):
    MAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(PLAIN, tmp_path_factory, tmp_path, "MambaForCausalLM (mamba)")


def test_config_reads_the_hub_file():
    """A released config.json (mamba-130m-hf's keys): intermediate_size and time_step_rank as written, no attention
    keys written back."""
    from autolm.models.mamba import MambaConfig

    d = dict(hidden_size=768, num_hidden_layers=24, intermediate_size=1536, time_step_rank=48, state_size=16,
             layer_norm_epsilon=1e-5, fused_add_norm=True, n_layer=24, rms_norm=True)  # fmt: skip
    c = MambaConfig.from_dict(d)
    assert c.intermediate_size == 1536 and c.time_step_rank == 48 and c.rms_norm_eps == 1e-5
    out = c.to_dict()
    assert out["fused_add_norm"] is True and "num_attention_heads" not in out and "rope_parameters" not in out
    assert MambaConfig(hidden_size=100).time_step_rank == 7


@pytest.mark.parametrize(
    "key, value",
    [
        ("state_size", 0),
        ("expand", 1.5),
        ("conv_kernel", "4"),
        ("time_step_rank", -1),
        ("use_bias", "no"),
        ("residual_in_fp32", 1),
        ("hidden_act", "relu6"),
        ("layer_norm_epsilon", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.mamba import MambaConfig

    with pytest.raises(autolm.ConfigError, match=key.replace("layer_norm_epsilon", "rms_norm_eps")):
        MambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, key: value})


# ---- GGUF: llama.cpp's MambaModel converter, emulated ------------------------------------------------------------

# what llama.cpp's graph runs: no in_proj/out_proj bias, a conv bias, an expansion of 2; tied and untied heads
GGUF_TIED = Family("MambaConfig", dict(SIZES, time_step_rank=6), lora_targets=TARGETS)
GGUF_UNTIED = Family(
    "MambaConfig", dict(SIZES, tie_word_embeddings=False, residual_in_fp32=False), lora_targets=TARGETS
)
GGUF_FAMILIES = (GGUF_TIED, GGUF_UNTIED)  # for test_gguf_out


def write_mamba_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter (MambaModel) makes of transformers' Mamba `hf` (--outtype f32, or q8_0: 2-D
    ".weight" tensors in Q8_0 but ssm_conv1d, F16 where a row is no whole block; ssm_a / ssm_d, named without a
    suffix, in F32), from the checkpoint file: context length 2**20, zero feed-forward length and head count, the
    ssm.* sizes, dt_b_c_rms (true for Falcon-Mamba only); A as -exp(A_log), the conv squeezed, the head omitted
    where it equals the embeddings. The vocabulary (160) is already a multiple of 8: the converter's padding adds
    no token."""
    import gguf
    import numpy as np
    from gguf_mimic import add_q8_0, add_toy_vocab
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_context_length(2**20)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(c.num_hidden_layers)
    w.add_ssm_conv_kernel(c.conv_kernel)
    w.add_ssm_inner_size(c.intermediate_size)
    w.add_ssm_state_size(c.state_size)
    w.add_ssm_time_step_rank(c.time_step_rank)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_ssm_dt_b_c_rms(c.model_type == "falcon_mamba")  # the converter's test: Falcon-Mamba's norms
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MAMBA, c.num_hidden_layers)
    sd = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in sd.items():
        if name == "lm_head.weight" and torch.equal(t, sd["backbone.embeddings.weight"]):
            continue
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        if name.endswith("conv1d.weight"):
            t = t.squeeze()
        out = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if out is None:
            base, suffix = name.rsplit(".", 1)
            out = f"{names.get_name(base)}.{suffix}"
        a = np.ascontiguousarray(t.float().numpy())
        if q8 and a.ndim >= 2 and out.endswith(".weight") and ".ssm_conv1d." not in out:
            add_q8_0(w, out, a)
            continue
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


IDS = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("family", GGUF_FAMILIES, ids=["tied", "untied"])
def test_gguf(tmp_path_factory, tmp_path, family):
    """The converter's file loads as MambaForCausalLM with transformers' logits (A read back as log(-(-exp(A_log))):
    within a last bit); its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in their blocks, within
    their rounding."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_mamba_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "MambaForCausalLM"
    c = model.config
    assert (c.intermediate_size, c.time_step_rank, c.state_size, c.conv_kernel) == (
        128,
        hf.config.time_step_rank,
        8,
        4,
    )
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings and not c.use_bias and c.use_conv_bias
    torch.testing.assert_close(model.backbone.layers[1].mixer.A_log, hf.backbone.layers[1].mixer.A_log)
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    write_mamba_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.backbone.layers[0].mixer.in_proj, "ggml_type")
    with torch.no_grad():
        got = kept(IDS).logits
    assert 0 < (got - want).norm() / want.norm() < 0.1  # Q8_0's rounding of these random weights


@pytest.mark.parametrize(
    "family, field", [(MAMBA, "use_bias"), (PLAIN, "use_conv_bias")], ids=["bias", "no_conv_bias"]
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    family,
    field,
):
    """in_proj/out_proj biases and a conv without bias (llama.cpp's graph has neither): refused, naming the field."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'mamba' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
