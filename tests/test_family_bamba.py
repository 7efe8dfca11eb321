"""Bamba against transformers (its Mamba-2 torch fallback): Mamba-2, attention and Mamba-2 layers
(attn_layer_indices [1]) with 2 groups of B/C and chunks of 8 tokens (so prompts and pieces cross chunk
boundaries), attention with GQA, q/k/v/o biases and RoPE over half of each head (the released configs'
attn_rotary_emb beside it), MLP biases; a variant with two attention layers, tied embeddings, GELU and no biases;
the battery for recurrent families, the z-loss, the released configs' transformers 4 spelling, config errors, and GGUF
as llama.cpp's GraniteHybridModel converter writes a Bamba checkpoint ("granitehybrid": in, out, the llama.cpp
oracle through test_gguf_out's registry)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import VOCAB, padded_batch, positions
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
    mamba_n_heads=8,
    mamba_n_groups=2,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_chunk_size=8,
)
BAMBA = Family(
    "BambaConfig",
    dict(
        SIZES,
        attn_layer_indices=[1],
        attention_bias=True,
        mlp_bias=True,
        attn_rotary_emb=8,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    ),
    lora_targets=["q_proj", "v_proj", "in_proj", "out_proj", "gate_proj"],  # peft has no default for bamba
)
TIED = Family(
    "BambaConfig",
    dict(SIZES, num_hidden_layers=4, attn_layer_indices=[0, 3], tie_word_embeddings=True, hidden_act="gelu"),
)
ALL = pytest.mark.parametrize("family", [BAMBA, TIED], ids=["bamba", "tied"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    BAMBA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BAMBA.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    """The eager one-token step (the Mamba-2 recurrence and the attention step) gives the general forward's tokens
    and logits."""
    BAMBA.check_one_token_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    BAMBA.check_recurrent(tmp_path_factory, tmp_path)


def test_long_generation_equals_transformers(tmp_path_factory):
    """A 30-token prompt and 45 new tokens (the one-token recurrence after the chunked prefill): transformers'
    greedy tokens."""
    BAMBA.check_long_generation(tmp_path_factory)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside chunks
    of 8) give the logits of one forward, and transformers'; the Mamba-2 layers keep their states."""
    cache = BAMBA.check_pieces(tmp_path_factory)
    conv, ssm = cache.states[0]
    assert (
        conv.shape == (2, 64 * 2 + 2 * 2 * 16, 3)
        and ssm.shape == (2, 8, 16, 16)
        and ssm.dtype == torch.float32
    )
    assert set(cache.states) == {0, 2}  # the Mamba-2 layers only


def test_lora(tmp_path_factory, tmp_path):
    BAMBA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BAMBA.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names and shapes, the checkpoint's tensor names and config.json's keys and values (the tagged
    infinity of time_step_limit, attn_rotary_emb kept, no layer_types) in what autolm saves."""
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.2.mamba.A_log" in saved and "model.final_layernorm.weight" in saved
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "layer_types" not in config and "head_dim" not in config


def test_disk_offload(tmp_path_factory, tmp_path):
    BAMBA.check_disk_offload(tmp_path_factory, tmp_path)


def test_z_loss_as_transformers(tmp_path_factory):
    """With labels and z_loss_coefficient > 0 the loss is transformers' (cross-entropy plus the coefficient times
    the mean squared log-sum-exp of the logits); as a tuple too."""
    import transformers

    directory, _ = BAMBA.checkpoint(tmp_path_factory)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, z_loss_coefficient=0.1)
    ours = autolm.AutoModelForCausalLM.from_pretrained(directory, z_loss_coefficient=0.1)
    plain = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        want = hf(ids, labels=ids).loss
        got = ours(ids, labels=ids).loss
        assert torch.equal(ours(ids, labels=ids, return_dict=False)[0], got)
        assert plain(ids, labels=ids).loss < want - 0.01  # the z-loss counts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_config_defaults():
    """Every default autolm writes is transformers' (time_step_limit in transformers' tagged JSON, read as no clamp);
    attn_layer_indices null: every layer Mamba-2."""
    import transformers

    from autolm.models.bamba import BambaConfig

    ours, theirs = BambaConfig(), transformers.BambaConfig()
    assert ours.step_limit() == theirs.time_step_limit == (0.0, float("inf"))
    for key, value in ours.to_dict().items():
        if key not in ("model_type", "time_step_limit"):
            assert getattr(theirs, key) == value, key
    assert (ours.mamba_d_head, ours.head_dim) == (64, 128) and all(map(ours.is_mamba, range(32)))


def test_released_config_spelling(tmp_path_factory, tmp_path):
    """Bamba-9B's config.json as transformers 4 wrote it (rope_theta, rope_scaling and partial_rotary_factor at the
    top, JSON's Infinity in time_step_limit) loads with transformers 5's logits and is written back as read."""
    import transformers

    directory, _ = BAMBA.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], rope_scaling=None, partial_rotary_factor=0.5,
                  time_step_limit=[0.0, float("inf")])  # fmt: skip
    path.write_text(json.dumps(config))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "v4", attn_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "time_step_limit"} == {
        k: v for k, v in config.items() if k != "time_step_limit"
    }
    assert written["time_step_limit"] == [0.0, float("inf")]


@pytest.mark.parametrize(
    "key, value",
    [
        ("attn_layer_indices", "1"),
        ("attn_layer_indices", [1.5]),
        ("mamba_d_head", 12),
        ("mamba_n_groups", 3),
        ("mamba_chunk_size", 0),
        ("time_step_limit", [0.1]),
        ("z_loss_coefficient", -1),
        ("mamba_conv_bias", "yes"),
        ("mlp_bias", 1),
        ("partial_rotary_factor", 0.2),
    ],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.bamba import BambaConfig

    base = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, mamba_n_heads=8
    )
    with pytest.raises(autolm.ConfigError, match=key):
        BambaConfig.from_dict({**base, key: value})


# ---- GGUF: llama.cpp's GraniteHybridModel converter on a Bamba checkpoint, emulated -------------------------------

# what llama.cpp's graph computes as transformers does: RoPE over the whole head (the released configs rotate half
# of it: see test_gguf_out_of_a_partial_rope_is_the_converters_with_a_warning), attn_rotary_emb saying so
WHOLE_ROPE = dict(
    attn_rotary_emb=16,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0},
)
GGUF_FAMILY = Family("BambaConfig", dict(BAMBA.kwargs, **WHOLE_ROPE), lora_targets=BAMBA.lora_targets)
# for test_gguf_out and test_gguf_llamacpp (llama.cpp's graph runs SiLU)
GGUF_FAMILIES = (GGUF_FAMILY, Family("BambaConfig", dict(TIED.kwargs, hidden_act="silu", **WHOLE_ROPE)))


def write_bamba_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (GraniteHybridModel over Mamba2Model and GraniteMoeModel) makes of transformers'
    Bamba `hf` (--outtype f32), from the checkpoint files: TextModel's and Llama's keys (no head size: Granite's
    converter drops it), the ssm.* sizes, head_count_kv per layer (0 on Mamba-2 layers), rope.scaling.finetuned
    true, rope.dimension_count from attn_rotary_emb where config.json has it; q/k rows (and biases) of the attention
    layers permuted over the whole head, the mixers' tensors as Mamba2Model writes them."""
    import gguf
    from gguf_llamacpp import _llama, permute
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file
    from test_family_granitemoehybrid import _mixer_tensor

    c = hf.config
    raw = json.load(open(f"{hf.name_or_path}/config.json"))
    attn = raw.get("attn_layer_indices") or []
    w = gguf.GGUFWriter(path, "granitehybrid")
    _llama(w, c)
    w.add_ssm_conv_kernel(c.mamba_d_conv)
    w.add_ssm_state_size(c.mamba_d_state)
    w.add_ssm_group_count(c.mamba_n_groups)
    w.add_ssm_inner_size(c.mamba_expand * c.hidden_size)
    w.add_ssm_time_step_rank(c.mamba_n_heads)
    w.add_head_count_kv([c.num_key_value_heads if i in attn else 0 for i in range(c.num_hidden_layers)])
    if "attn_rotary_emb" in raw:
        w.add_rope_dimension_count(raw["attn_rotary_emb"])
    w.add_rope_scaling_finetuned(True)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, c.num_hidden_layers)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if ".mamba." in name:
            name, t = _mixer_tensor(name, t, c)
        if ".q_proj." in name or ".k_proj." in name:
            t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        out = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if out is None:
            base, suffix = name.rsplit(".", 1)
            out = f"{names.get_name(base)}.{suffix}"
        w.add_tensor(out, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model):
    ids, mask = padded_batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file of the released shape (RoPE over half of each head) loads as BambaForCausalLM with
    transformers' logits (the q/k permutation undone over the whole head, the rotary dimensions read as
    partial_rotary_factor 0.5, A read back as log(-(-exp(A_log))))."""
    _, hf = BAMBA.checkpoint(tmp_path_factory)
    write_bamba_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "BambaForCausalLM"
    c = model.config
    assert c.attn_layer_indices == [1] and (c.head_dim, c.num_key_value_heads, c.mamba_d_head) == (16, 2, 16)
    assert c.rope_parameters["partial_rotary_factor"] == 0.5 and c.rope_theta == 5000.0
    assert c.attention_bias and c.mlp_bias and c.max_position_embeddings == 128
    torch.testing.assert_close(_logits(model), _logits(hf), atol=1e-4, rtol=1e-4)


def test_gguf_out_of_a_partial_rope_is_the_converters_with_a_warning(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    caplog,
):
    """A released-shape model goes out as the converter writes it (its metadata and tensors, the q/k permutation
    over the whole head), with a warning that llama.cpp's RoPE then pairs other dimensions; it reads back as the
    same model."""
    from test_gguf_out import _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = BAMBA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="autolm.gguf"):
        path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert "pairs other dimensions" in caplog.text
    write_bamba_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    torch.testing.assert_close(_logits(back), _logits(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"time_step_limit": [0.0, 10.0]}, "time_step_limit"),
        ({"mamba_expand": 4, "mamba_d_head": 32}, "mamba_expand"),
        ({"mamba_proj_bias": True}, "mamba_proj_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
    ids=["clamp", "expand", "proj-bias", "gelu"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(change, field, tmp_path, byte_tokenizer):  # noqa: F811
    """A clamp of the time steps, an expansion factor other than 2 (llama.cpp asserts 2), in/out projection biases,
    another activation than SiLU: refused, naming the field."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.bamba import BambaConfig, BambaForCausalLM

    config = BambaConfig.from_dict(dict(GGUF_FAMILY.kwargs, vocab_size=VOCAB, **change))
    with pytest.raises(autolm.ConfigError, match=field):
        save_gguf(BambaForCausalLM(config), byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


def test_granitehybrid_files_go_to_their_family():
    """Of llama.cpp's "granitehybrid" files, those with Granite's multipliers (every Granite 4.0 hybrid the
    converter writes, dense or MoE) load as Granite 4.0 hybrid, those without (a converted Bamba) as Bamba."""
    from autolm.models import gguf_family

    arch = {"general.architecture": "granitehybrid"}
    granite = {**arch, "granitehybrid.attention.scale": 0.09, "granitehybrid.rope.scaling.finetuned": False}
    assert gguf_family(granite).__name__ == "GraniteMoeHybridForCausalLM"
    assert gguf_family({**granite, "granitehybrid.expert_count": 4}).__name__ == "GraniteMoeHybridForCausalLM"
    assert gguf_family({**arch, "granitehybrid.rope.scaling.finetuned": True}).__name__ == "BambaForCausalLM"
