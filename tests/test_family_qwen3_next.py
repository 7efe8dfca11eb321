"""Qwen3-Next against transformers and peft: linear-attention (Gated DeltaNet) and gated full-attention layers,
grouped value heads (4 value heads over 2 key heads, value heads wider than key heads), partial RoPE, q/k/v/o
biases, experts with a gated shared expert (top k not renormalised) and a dense layer (mlp_only_layers); the
recurrent battery (pieces through the cache, the serving engine), the chunked rule (64 tokens) against the
one-token recurrence, generation past a chunk boundary, the checkpoint's per-expert tensors, config errors,
and the CLI with Qwen 3's chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB
from family_checks import Family
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5},
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    attention_bias=True,
)
NEXT = Family(
    "Qwen3NextConfig",
    dict(
        SIZES,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[2],
    ),
    lora_targets=["q_proj", "v_proj", "in_proj_qkvz", "out_proj"],  # peft has no default for qwen3_next
)


def test_logits(tmp_path_factory):
    NEXT.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    NEXT.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the prompt chunked, each new token by the one-step recurrence, 70
    tokens in all) are transformers' tokens; the logits of all 70 tokens at once (chunks of 64) equal the
    decoded ones (up to the two algorithms' rounding, which the random tiny model magnifies)."""
    NEXT.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_chunked_rule_is_the_recurrence():
    """The chunked gated delta rule (chunks of 64, from a random state) over 70 tokens gives the token-by-token
    recurrence's outputs and final state; so does a piece of 1 token after it."""
    from autolm.nn.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

    g = torch.Generator().manual_seed(0)
    B, T, hk, hv, dk, dv = 2, 70, 2, 4, 8, 6
    q, k = torch.randn(B, T, hk, dk, generator=g), torch.randn(B, T, hk, dk, generator=g)
    v = torch.randn(B, T, hv, dv, generator=g)
    decay = -torch.rand(B, T, hv, generator=g)
    beta = torch.rand(B, T, hv, generator=g)
    state = torch.randn(B, hv, dk, dv, generator=g)
    a, sa = chunk_gated_delta_rule(q, k, v, decay, beta, state)
    b, sb = recurrent_gated_delta_rule(q, k, v, decay, beta, state)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    one = [x[:, :1] for x in (q, k, v, decay, beta)]
    c, sc = chunk_gated_delta_rule(*one, sa)
    d, sd = recurrent_gated_delta_rule(*one, sb)
    torch.testing.assert_close(c, d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sc, sd, atol=1e-4, rtol=1e-4)


def test_recurrent(tmp_path_factory, tmp_path):
    NEXT.check_recurrent(tmp_path_factory, tmp_path)


def test_state_dtypes(tmp_path_factory):
    """As transformers keeps them: a linear layer's conv state in the model's dtype (its last K - 1 inputs), the
    rule's state in fp32; attention layers keep keys and values, linear layers none."""
    directory, _ = NEXT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    conv, state = cache.state(0)
    assert conv.dtype == torch.bfloat16 and tuple(conv.shape) == (2, 2 * 16 + 48, 3)
    assert state.dtype == torch.float32 and tuple(state.shape) == (2, 4, 8, 12)
    assert cache.state(1) is None and cache.keys[1].shape[-1] == 16 and cache.keys[0].shape[-1] == 0


def test_bf16(tmp_path_factory):
    NEXT.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    NEXT.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NEXT.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and only transformers' config keys
    in the files autolm saves."""
    _, saved = NEXT.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    NEXT.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's Qwen3NextModel converter, emulated --------------------------------------------------------

# what llama.cpp's qwen3next runs: key and value heads of one size, every layer a mixture renormalising its top k,
# no attention biases; two value heads per key head (the regrouped in_proj_qkvz), a layer pattern by interval
GGUF_FAMILY = Family(
    "Qwen3NextConfig",
    dict(
        SIZES,
        attention_bias=False,
        linear_value_head_dim=8,
        full_attention_interval=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
)
# the converter keeps these F32 whatever the type asked for
_F32 = ("ffn_gate_inp", "ssm_conv1d")


def _converted(c, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Qwen3NextModel.modify_tensors: (name for gguf-py's map, tensor) of one checkpoint tensor."""
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif "conv1d" in name:
        t = t.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    if "in_proj_qkvz.weight" not in name:
        return [(name, t)]
    dk, r = c.linear_key_head_dim, c.linear_num_value_heads // c.linear_num_key_heads
    sizes = [dk, dk, r * c.linear_value_head_dim, r * c.linear_value_head_dim]
    q, k, v, z = t.permute(1, 0).reshape(-1, c.linear_num_key_heads, sum(sizes)).split(sizes, dim=-1)
    q, k, v, z = (x.reshape(c.hidden_size, -1) for x in (q, k, v, z))
    stem = name.removesuffix(".in_proj_qkvz.weight")
    return [(f"{stem}.in_proj_qkv.weight", torch.cat([q, k, v], -1).T), (f"{stem}.in_proj_z.weight", z.T)]


def write_qwen3_next_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' Qwen3-Next `hf` from its checkpoint file: Qwen 2 MoE's
    metadata and stacked experts, the linear layers' keys, the tensors as modify_tensors makes them (see
    autolm.models.qwen3_next_gguf); `kind` "Q8_0": the 2-D and 3-D weights in Q8_0 blocks (as llama.cpp's
    quantize leaves the router and the conv in F32)."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "qwen3next")
    add_text_model(w, c)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(c.linear_conv_kernel_dim)
    w.add_ssm_state_size(c.linear_key_head_dim)
    w.add_ssm_group_count(c.linear_num_key_heads)
    w.add_ssm_time_step_rank(c.linear_num_value_heads)
    w.add_ssm_inner_size(c.linear_value_head_dim * c.linear_num_value_heads)
    w.add_full_attention_interval(getattr(c, "full_attention_interval", 4))
    w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3NEXT, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for stacked, whole in stacked_experts(tensors, ".mlp.experts.", c.num_experts):
        for name, t in _converted(c, stacked, whole.float()):
            base, suffix = name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, "")
            out = names.get_name(base) + (f".{suffix}" if suffix else "")
            data = np.ascontiguousarray(t.numpy())
            blocks = data.ndim > 1 and data.shape[-1] % 32 == 0  # else the converter falls back to F32 too
            if kind == "Q8_0" and blocks and not any(f"{s}." in out for s in _F32):
                qtype = gguf.GGMLQuantizationType.Q8_0
                w.add_tensor(out, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(out, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's F32 file loads as Qwen3NextForCausalLM with transformers' logits; its Q8_0 file (kept in
    its blocks) gives logits close to them."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_qwen3_next_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Qwen3NextForCausalLM"
    assert model.config.layer_types == hf.config.layer_types
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    theirs = _logits(hf, ids)
    torch.testing.assert_close(_logits(model, ids), theirs, atol=1e-4, rtol=1e-4)
    write_qwen3_next_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    # this random model amplifies Q8_0's rounding (experts picked otherwise): the dequantized file is as far off
    assert (_logits(quant, ids) - theirs).abs().mean() <= 0.15 * theirs.abs().mean()


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Value heads wider than the key heads, a dense layer, the top k unrenormalised, attention biases, a layer
    pattern off an interval: a ConfigError naming them, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(NEXT.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="linear_value_head_dim"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    model.config.linear_value_head_dim = model.config.linear_key_head_dim  # the check reads the config only
    with pytest.raises(autolm.ConfigError, match="norm_topk_prob") as e:
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert "mlp_only_layers" in str(e.value) and "attention_bias" in str(e.value)
    model.config.layer_types = ["full_attention", "linear_attention", "linear_attention"]
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_hub_config(tmp_path):
    """The Hub's config.json (transformers 4's spelling: full_attention_interval, top-level rope_theta and
    partial_rotary_factor) reads as transformers reads it and is written back in its spelling; the mtp.* tensors
    are skipped."""
    import transformers

    from autolm.models.qwen3_next import Qwen3NextConfig, Qwen3NextForCausalLM

    hub = dict(model_type="qwen3_next", num_hidden_layers=8, full_attention_interval=4, rope_theta=1e7,
               partial_rotary_factor=0.25, rope_scaling=None, hidden_size=64, num_attention_heads=4)  # fmt: skip
    ours, theirs = Qwen3NextConfig.from_dict(hub), transformers.Qwen3NextConfig(**hub)
    assert ours.layer_types == theirs.layer_types and ours.layer_types[3] == "full_attention"
    assert ours.rope_parameters == theirs.rope_parameters
    back = ours.to_dict()
    assert (
        back["partial_rotary_factor"] == 0.25 and back["rope_theta"] == 1e7 and back["rope_scaling"] is None
    )
    assert Qwen3NextForCausalLM.checkpoint_rules.ignores("mtp.layers.0.mlp.gate.weight")


def test_config_defaults_are_transformers():
    from family_checks import check_config_defaults

    from autolm.models.qwen3_next import Qwen3NextConfig

    check_config_defaults(Qwen3NextConfig)


def test_config_errors_name_the_key():
    from autolm.models.qwen3_next import Qwen3NextConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16)
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "mamba"]),
        "linear_num_value_heads": dict(linear_num_key_heads=3, linear_num_value_heads=4),
        "linear_conv_kernel_dim": dict(linear_conv_kernel_dim=0),
        "linear_key_head_dim": dict(linear_key_head_dim="8"),
        "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0,
                                                       "partial_rotary_factor": 0.1}),
        "full_attention_interval": dict(full_attention_interval=0),
        "num_experts_per_tok": dict(num_experts=2, num_experts_per_tok=3),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Qwen3NextConfig.from_dict({**small, **kwargs})


def test_cli(tmp_path_factory, tmp_path):
    """Qwen3-Next's instruct models use Qwen 3's chat template (qwen3-moe.jinja among the test data)."""
    check_cli(NEXT, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "Qwen3NextForCausalLM (qwen3_next)")
