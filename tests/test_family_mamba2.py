"""Mamba-2 against transformers (its torch fallback): every layer a Mamba-2 mixer with in_proj/out_proj biases, a conv
bias, two groups of heads, chunks of 8 tokens, the residual in float32 and a tied head; a second checkpoint without
biases, one group, another conv kernel, the residual in the model's dtype and an untied head; a third clamping the
time steps. The battery for recurrent families (no attention: the cache holds only states; no one-token step graphs,
which carry no states), pieces through the cache against the whole, a long generation equal to transformers', the CLI
(Mamba-2 checkpoints ship no chat template), config errors, and GGUF in and out as llama.cpp's converter writes it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB, padded_batch
from family_checks import Family
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(hidden_size=64, num_hidden_layers=3, num_heads=8, head_dim=16, n_groups=2, state_size=16, conv_kernel=4,
             expand=2, chunk_size=8)  # fmt: skip
# peft has no default for mamba2 and refuses out_proj and conv1d on Mamba models
TARGETS = ["in_proj"]
MAMBA2 = Family("Mamba2Config", dict(SIZES, use_bias=True, tie_word_embeddings=True, time_step_rank=6),
                lora_targets=TARGETS)  # fmt: skip
PLAIN = Family(
    "Mamba2Config",
    dict(SIZES, use_conv_bias=False, residual_in_fp32=False, n_groups=1, conv_kernel=3),
    lora_targets=TARGETS,
)
CLAMPED = Family("Mamba2Config", dict(SIZES, time_step_limit=(0.0, 0.5)), lora_targets=TARGETS)


@pytest.mark.parametrize("family", [MAMBA2, PLAIN, CLAMPED], ids=["biases", "plain", "clamped"])
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


def test_the_clamp_matters(tmp_path_factory):
    """time_step_limit changes the logits (the clamped checkpoint's logits, checked above, are not the unclamped)."""
    directory, _ = CLAMPED.checkpoint(tmp_path_factory)
    clamped = autolm.AutoModelForCausalLM.from_pretrained(directory)
    free = autolm.AutoModelForCausalLM.from_pretrained(directory, time_step_limit=[0.0, float("inf")])
    ids, _ = padded_batch()
    with torch.no_grad():
        assert (clamped(ids).logits - free(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", [MAMBA2, PLAIN], ids=["biases", "plain"])
def test_generate(tmp_path_factory, family):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MAMBA2.check_bf16(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without use_bias: with it, padding's inputs are zeroed before in_proj, whose bias then reaches the
    convolution (as in transformers), so a left-padded row's state is not its unpadded one."""
    PLAIN.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt (chunks of 8) and 45 new tokens (the one-token recurrence after the scan)."""
    MAMBA2.check_long_generation(tmp_path_factory)


def test_pieces_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (chunks of 8 crossed, single tokens between
    pieces) give the logits of one forward, and transformers'; the cache keeps only states."""
    cache = MAMBA2.check_pieces(tmp_path_factory)
    conv, ssm = cache.states[0]
    assert (
        conv.shape == (2, 128 + 2 * 2 * 16, 3) and ssm.shape == (2, 8, 16, 16) and ssm.dtype == torch.float32
    )
    assert all(k.shape[-1] == 0 for k in cache.keys)


def test_lora(tmp_path_factory, tmp_path):
    MAMBA2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MAMBA2.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("family", [MAMBA2, PLAIN], ids=["biases", "plain"])
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
        assert "backbone.layers.0.mixer.dt_bias" in set(ours.keys())
    configs = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(configs[1]) - {"transformers_version"} == set(configs[0]) - {"transformers_version"}
    assert configs[1]["head_dim"] == 16 and configs[1]["time_step_limit"] == configs[0]["time_step_limit"]


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
    MAMBA2.check_disk_offload(tmp_path_factory, tmp_path)


def test_cli(tmp_path_factory, tmp_path):
    check_cli_without_template(PLAIN, tmp_path_factory, tmp_path, "Mamba2ForCausalLM (mamba2)")


def test_config_reads_the_hub_file():
    """A released config.json (Mamba-Codestral-7B-v0.1's keys, JSON's bare Infinity as Python reads it): the sizes
    as written, no attention keys nor intermediate_size written back."""
    from autolm.models.mamba2 import Mamba2Config

    d = dict(hidden_size=4096, num_hidden_layers=64, num_heads=128, head_dim=64, n_groups=8, state_size=128,
             expand=2, chunk_size=256, layer_norm_epsilon=1e-5, time_step_limit=[0.0, float("inf")],
             time_step_rank=256, rms_norm=True, norm_before_gate=False, vocab_size=32768)  # fmt: skip
    c = Mamba2Config.from_dict(d)
    assert (c.head_dim, c.num_heads, c.n_groups, c.intermediate_size) == (64, 128, 8, 8192)
    assert c.step_limit() == (0.0, float("inf")) and c.rms_norm_eps == 1e-5
    out = c.to_dict()
    assert out["rms_norm"] is True and out["head_dim"] == 64 and out["time_step_rank"] == 256
    assert not {"num_attention_heads", "num_key_value_heads", "intermediate_size", "rope_parameters"} & set(
        out
    )
    assert Mamba2Config().time_step_rank == 256 and Mamba2Config().head_dim == 64


@pytest.mark.parametrize(
    "change, key",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"n_groups": 3}, "n_groups"),
        ({"chunk_size": 1.5}, "chunk_size"),
        ({"head_dim": 8}, "head_dim"),
        ({"state_size": 0}, "state_size"),
        ({"expand": 1.5}, "expand"),
        ({"time_step_limit": [0.0]}, "time_step_limit"),
        ({"time_step_limit": [1.0, 0.5]}, "time_step_limit"),
        ({"use_conv_bias": "yes"}, "use_conv_bias"),
        ({"hidden_act": "relu6"}, "hidden_act"),
        ({"layer_norm_epsilon": 0}, "rms_norm_eps"),
    ],
)
def test_config_errors_name_the_key(change, key):
    from autolm.models.mamba2 import Mamba2Config

    with pytest.raises(autolm.ConfigError, match=key):
        Mamba2Config.from_dict({**dict(SIZES, chunk_size=8), **change})


# ---- GGUF: llama.cpp's Mamba2Model converter, emulated -----------------------------------------------------------

# what llama.cpp's graph runs: no in_proj/out_proj bias, a conv bias, no clamp; tied and untied heads
GGUF_TIED = Family("Mamba2Config", dict(SIZES, tie_word_embeddings=True), lora_targets=TARGETS)
GGUF_UNTIED = Family("Mamba2Config", dict(SIZES, n_groups=4, residual_in_fp32=False), lora_targets=TARGETS)
GGUF_FAMILIES = (GGUF_TIED, GGUF_UNTIED)  # for test_gguf_out


def write_mamba2_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter (Mamba2Model) makes of transformers' Mamba-2 `hf` (--outtype f32, or q8_0:
    ".weight" tensors of 2 dimensions in Q8_0 but ssm_conv1d and the norms, F16 where a row is no whole block; ssm_a
    / ssm_d, named without a suffix, in F32), from the checkpoint file: context length 2**20, zero feed-forward length
    and head count, the ssm.* sizes (the heads as time_step_rank); dt_bias as ssm_dt.bias, the conv squeezed, A as
    -exp(A_log) and D as (H, 1), the gated norm as (groups, width / groups); a tied head is not in the file. The
    vocabulary (160) is already a multiple of 16: the converter's padding adds no token."""
    import gguf
    from gguf_mimic import add_q8_0, add_toy_vocab
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    inner = c.expand * c.hidden_size
    w = gguf.GGUFWriter(path, "mamba2")
    w.add_context_length(2**20)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(c.num_hidden_layers)
    w.add_ssm_conv_kernel(c.conv_kernel)
    w.add_ssm_inner_size(inner)
    w.add_ssm_state_size(c.state_size)
    w.add_ssm_time_step_rank(inner // c.head_dim)
    w.add_ssm_group_count(c.n_groups)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MAMBA2, c.num_hidden_layers)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        if name.endswith("conv1d.weight"):
            t = t.squeeze()
        elif name.endswith((".A_log", ".D")):
            t = t.reshape(*t.shape, 1)
        elif name.endswith("mixer.norm.weight"):
            t = t.reshape(c.n_groups, -1)
        if name.endswith(".A_log"):
            t = -torch.exp(t)
        out = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if out is None:
            base, suffix = name.rsplit(".", 1)
            out = f"{names.get_name(base)}.{suffix}"
        a = np.ascontiguousarray(t.float().numpy())
        if (
            q8
            and a.ndim >= 2
            and out.endswith(".weight")
            and not out.endswith(("_norm.weight", "conv1d.weight"))
        ):
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
    """The converter's file loads as Mamba2ForCausalLM with transformers' logits (A read back as
    log(-(-exp(A_log))): within a last bit); its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in
    their blocks, within their rounding."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_mamba2_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Mamba2ForCausalLM"
    c, h = model.config, hf.config
    assert (c.num_heads, c.head_dim, c.n_groups, c.state_size, c.conv_kernel, c.expand) == (
        8, 16, h.n_groups, 16, 4, 2)  # fmt: skip
    assert c.tie_word_embeddings == h.tie_word_embeddings and not c.use_bias and c.use_conv_bias
    torch.testing.assert_close(model.backbone.layers[1].mixer.A_log, hf.backbone.layers[1].mixer.A_log)
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)
    write_mamba2_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.backbone.layers[0].mixer.in_proj, "ggml_type")
    with torch.no_grad():
        got = kept(IDS).logits
    assert 0 < (got - want).norm() / want.norm() < 0.1  # Q8_0's rounding of these random weights


@pytest.mark.parametrize(
    "family, field",
    [(MAMBA2, "use_bias"), (PLAIN, "use_conv_bias"), (CLAMPED, "time_step_limit")],
    ids=["bias", "no_conv_bias", "clamp"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    family,
    field,
):
    """in_proj/out_proj biases, a conv without bias and a clamp of the time steps (llama.cpp's graph has none of
    them): refused, naming the field."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'mamba2'.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


def test_gguf_out_q8_0_is_the_converters_file(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf's Q8_0 file: each tensor in the type the converter's q8_0 gives it (ssm_in / ssm_out and the
    embeddings in Q8_0 blocks, the conv, the norms, ssm_a / ssm_d in F32), loading back with quantization="gguf"
    within Q8_0's rounding."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = GGUF_UNTIED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    save_gguf(model, byte_tokenizer, str(tmp_path / "q.gguf"), "q8_0")
    write_mamba2_gguf(hf, str(tmp_path / "ref.gguf"), "Q8_0")
    kinds = {t.name: int(t.tensor_type) for t in GGUFFile(str(tmp_path / "q.gguf")).tensors}
    assert kinds == {t.name: int(t.tensor_type) for t in GGUFFile(str(tmp_path / "ref.gguf")).tensors}
    assert kinds["blk.0.ssm_in.weight"] == kinds["output.weight"] == 8 and kinds["blk.0.ssm_norm.weight"] == 0
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    with torch.no_grad():
        got, want = kept(IDS).logits, model(IDS).logits
    assert 0 < (got - want).norm() / want.norm() < 0.1
