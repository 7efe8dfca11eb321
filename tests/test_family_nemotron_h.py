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

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from test_gguf_out import byte_tokenizer  # noqa: F401

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
    NANO3.check_long_generation(tmp_path_factory)


def test_pieces_across_chunks_equal_the_whole(tmp_path_factory):
    """70 tokens in pieces of 5, 13, 1, 1, 30 and 20 through the cache (pieces starting and ending inside chunks
    of 8, single tokens between them) give the logits of one forward, and transformers'."""
    cache = NANO3.check_pieces(tmp_path_factory)
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


# ---- GGUF: llama.cpp's NemotronHModel converter (arch "nemotron_h"), emulated ----------------------------------

# the dense layout llama.cpp's format holds: no Mamba-2 projection biases, head_dim other than hidden / heads (the
# converter writes both), MLP biases (read off ffn_up.bias)
GGUF_DENSE = Family("NemotronHConfig", dict(DENSE.kwargs, use_bias=False, head_dim=24))
F32_STEMS = ("ssm_conv1d",)  # 2-D tensors the converter keeps in F32


def _converted(name: str, t: torch.Tensor, c, kinds: list[str]) -> tuple[str, torch.Tensor]:
    """NemotronHModel.modify_tensors through GraniteHybridModel's: Mamba2Model's mixer tensors on Mamba-2 blocks
    (dt_bias as dt_proj.bias, the conv squeezed, A as -exp(A_log) and D as (H, 1), the norm as (groups, width /
    groups)), Llama's q/k permutation on attention blocks, the rest as it is."""
    from gguf_llamacpp import permute

    bid = int(name.split(".")[2]) if name.startswith("backbone.layers.") else None
    kind = kinds[bid] if bid is not None else None
    if kind == "linear_attention":
        if name.endswith(".dt_bias"):
            name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
        elif name.endswith("conv1d.weight"):
            t = t.squeeze()
        elif name.endswith((".A_log", ".D")):
            t = t.reshape(*t.shape, 1)
        elif name.endswith("mixer.norm.weight"):
            t = t.reshape(c.n_groups, -1)
        if name.endswith(".A_log"):
            t = -torch.exp(t)
    elif kind == "full_attention" and (".q_proj." in name or ".k_proj." in name):
        t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
    return name, t


def write_nemotron_h_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' dense Nemotron-H `hf` (--outtype f32, or q8_0: 2-D
    weights in Q8_0 but the conv, F16 where a row is no whole block), from the checkpoint files: TextModel's and
    Llama's keys (Granite drops head_dim: rope.dimension_count is hidden / heads; the layer_norm_epsilon of
    config.json as both epsilons), GraniteHybridModel's ssm.* sizes, head_count_kv per layer, RoPE off and the
    context length 2**20 (overwriting TextModel's), NemotronHModel's key/value length and per-layer feed-forward
    lengths; the tensors as _converted. The block kinds as a released checkpoint's hybrid_override_pattern gives
    them (the converter reads that string; transformers 5's layers_block_type names it does not know)."""
    import gguf
    from gguf_mimic import add_toy_vocab
    from safetensors.torch import load_file

    c, q8 = hf.config, kind == "Q8_0"
    kinds, n = list(c.layers_block_type), len(c.layers_block_type)
    w = gguf.GGUFWriter(path, "nemotron_h")
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_ssm_conv_kernel(c.conv_kernel)
    w.add_ssm_state_size(c.ssm_state_size)
    w.add_ssm_group_count(c.n_groups)
    w.add_ssm_inner_size(c.mamba_num_heads * c.mamba_head_dim)
    w.add_ssm_time_step_rank(c.mamba_num_heads)
    w.add_head_count_kv([c.num_key_value_heads if k == "full_attention" else 0 for k in kinds])
    w.add_rope_scaling_finetuned(False)
    w.add_context_length(2**20)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_feed_forward_length([c.intermediate_size if k == "mlp" else 0 for k in kinds])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NEMOTRON_H, n)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        name, t = _converted(name, t, c, kinds)
        bare = names.get_name(name)  # ssm_a, ssm_d: no suffix
        if bare is None:
            base, suffix = name.rsplit(".", 1)
            name = f"{names.get_name(base)}.{suffix}"
        else:
            name = bare
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


def _logits(model):
    ids, mask = padded_batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as NemotronHForCausalLM with transformers' logits (the block kinds off the
    per-layer KV heads and feed-forward lengths, head_dim off key_length, A read back as log(-(-exp(A_log))));
    its Q8_0 version with quantization="gguf" keeps the Q8_0 weights in their blocks, within their rounding."""
    _, hf = GGUF_DENSE.checkpoint(tmp_path_factory)
    write_nemotron_h_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "NemotronHForCausalLM"
    c = model.config
    assert [c.block_type(i) for i in range(5)] == GGUF_DENSE.kwargs["layers_block_type"]
    assert (c.head_dim, c.mamba_head_dim, c.intermediate_size, c.mlp_bias) == (24, 16, 48, True)
    torch.testing.assert_close(_logits(model), _logits(hf), atol=1e-4, rtol=1e-4)
    write_nemotron_h_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert hasattr(kept.model.layers[0].mixer.in_proj, "ggml_type")
    got, want = _logits(kept), _logits(hf)
    assert (got - want).norm() / want.norm() < 0.15  # Q8_0's rounding of these random weights


@pytest.mark.parametrize(
    "family, kw, field",
    [(DENSE, {}, "use_bias"), (GGUF_DENSE, {"time_step_min": 0.01}, "time_step_min")],
    ids=["proj_bias", "clamp"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
    family,
    kw,
    field,
):
    """Mamba-2 projection biases (llama.cpp has none) and a clamp of the time steps other than the released 0.001:
    a ConfigError naming the field, and no file (the MoE layout's refusals: test_family_nemotron_h_moe_gguf)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0], **kw)
    with pytest.raises(autolm.ConfigError, match=f"'nemotron_h'.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
