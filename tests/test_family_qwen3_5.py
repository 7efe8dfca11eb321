"""Qwen 3.5 (text) against transformers and peft: Gated DeltaNet layers with Qwen 3.5's separate projections,
grouped value heads (4 value heads over 2 key heads, value heads wider than key heads), gated full attention with
partial RoPE (mrope sections in rope_parameters: the same positions for every section on text), q/k/v/o biases, a
dense MLP; the recurrent battery, generation past a chunk boundary, the image-text checkpoint's language model
(tied by the outer config, the vision tower skipped), config errors, and the CLI with Qwen 3's chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, randomize
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
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 100.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    attention_bias=True,
)
DENSE = Family(
    "Qwen3_5TextConfig",
    SIZES,
    lora_targets=["q_proj", "v_proj", "in_proj_qkv", "out_proj"],  # peft has no default for qwen3_5
)


def test_logits(tmp_path_factory):
    DENSE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    DENSE.check_generate(tmp_path_factory)


def test_generate_past_a_chunk(tmp_path_factory):
    """40 new tokens after a 30-token prompt (the prompt chunked, each new token by the one-step recurrence, 70
    tokens in all) are transformers' tokens; the logits of all 70 tokens at once (chunks of 64) equal the
    decoded ones (up to the two algorithms' rounding, which the random tiny model magnifies)."""
    DENSE.check_long_generation(tmp_path_factory, new=40, exact_length=True, whole_atol=1e-3)


def test_recurrent(tmp_path_factory, tmp_path):
    DENSE.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    DENSE.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    DENSE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DENSE.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DENSE.check_disk_offload(tmp_path_factory, tmp_path)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the files; only transformers' config keys."""
    model, _ = DENSE.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.0.linear_attn.in_proj_a.weight" in model.state_dict()


def test_mrope_on_text_is_plain_rope():
    """transformers' multimodal RoPE with the same position in every section gives the plain (partial) RoPE
    tables autolm computes."""
    import transformers
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from autolm.models.qwen3_5 import Qwen3_5TextConfig
    from autolm.nn import Rotary

    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
            "mrope_interleaved": True}  # fmt: skip
    theirs = Qwen3_5TextRotaryEmbedding(transformers.Qwen3_5TextConfig(rope_parameters=rope))
    ours = Qwen3_5TextConfig(rope_parameters=rope)
    rotary = Rotary(
        ours.rope_kinds(), ours.head_dim, ours.max_position_embeddings, ours.partial_rotary_default
    )
    pos = torch.tensor([[0, 1, 2, 7, 300, 5000]])
    cos, sin = theirs(torch.zeros(1, dtype=torch.float32), pos)
    mine = rotary.tables(pos, torch.float32)["default"]
    assert cos.shape[-1] == 64
    torch.testing.assert_close(mine[0][:, 0], cos)
    torch.testing.assert_close(mine[1][:, 0], sin)


def _image_text_checkpoint(directory):
    """A transformers Qwen3_5ForConditionalGeneration (tiny vision tower, embeddings tied by the outer config)."""
    import transformers

    text = dict(SIZES, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForConditionalGeneration(config)
    randomize(model)
    model.tie_weights()
    model.save_pretrained(directory)
    return model.eval()


def test_image_text_checkpoint(tmp_path):
    """model_type qwen3_5: the language model of Qwen3_5ForConditionalGeneration (its head tied by the outer
    config), the vision tower skipped; saved as the text model transformers' Qwen3_5ForCausalLM loads."""
    import transformers

    hf = _image_text_checkpoint(tmp_path / "it")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "it")
    assert type(model).__name__ == "Qwen3_5ForCausalLM" and model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(
            ours, hf(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )
        model.save_pretrained(tmp_path / "text")
        text = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "text", attn_implementation="eager"
        )
        assert type(text).__name__ == "Qwen3_5ForCausalLM"
        torch.testing.assert_close(
            ours, text(input_ids=ids, attention_mask=mask).logits[real], atol=1e-4, rtol=1e-4
        )


def test_config_defaults_are_transformers():
    from family_checks import check_config_defaults

    from autolm.models.qwen3_5 import Qwen3_5TextConfig

    check_config_defaults(Qwen3_5TextConfig)


def test_config_errors_name_the_key():
    from autolm.models.qwen3_5 import Qwen3_5Config, Qwen3_5TextConfig

    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16)
    cases = {
        "layer_types": dict(layer_types=["linear_attention", "sliding_attention"]),
        "linear_num_value_heads": dict(linear_num_key_heads=3, linear_num_value_heads=4),
        "linear_value_head_dim": dict(linear_value_head_dim=-1),
        "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "rope_theta": 1.0,
                                                       "partial_rotary_factor": 1.5}),
        "full_attention_interval": dict(full_attention_interval="4"),
    }  # fmt: skip
    for key, kwargs in cases.items():
        with pytest.raises(ConfigError, match=key):
            Qwen3_5TextConfig.from_dict({**small, **kwargs})
    with pytest.raises(ConfigError, match="text_config"):
        Qwen3_5Config.from_dict({"model_type": "qwen3_5", "text_config": None})


def test_cli(tmp_path_factory, tmp_path):
    """No Qwen 3.5 chat template among the test data: Qwen 3's (qwen3-moe.jinja), the closest."""
    check_cli(DENSE, "qwen3-moe.jinja", tmp_path_factory, tmp_path, "Qwen3_5ForCausalLM (qwen3_5_text)")


# ---- GGUF: llama.cpp's Qwen3_5TextModel converter (--no-mtp), emulated -------------------------------------------

# what llama.cpp's qwen35 runs: key and value heads of one size, no attention biases; two value heads per key head
# (tiled in the file), a layer pattern by interval
GGUF_FAMILY = Family("Qwen3_5TextConfig", dict(SIZES, attention_bias=False, linear_value_head_dim=8,
                                               full_attention_interval=2))  # fmt: skip


def _tiled(t: torch.Tensor, dim: int, c, width: int) -> torch.Tensor:
    """_LinearAttentionVReorderBase._reorder_v_heads: value heads grouped by key head -> tiled."""
    hk = c.linear_num_key_heads
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], hk, c.linear_num_value_heads // hk, width, *shape[dim + 1 :])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


def _converted(c, name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The converter's modify_tensors: the value heads tiled, then Qwen3NextModel's transforms."""
    qk, dv = 2 * c.linear_num_key_heads * c.linear_key_head_dim, c.linear_value_head_dim
    if ".in_proj_qkv." in name or ".conv1d" in name:
        t = t.squeeze() if ".conv1d" in name else t
        t = torch.cat([t[:qk], _tiled(t[qk:], 0, c, dv)])
    elif ".in_proj_z." in name:
        t = _tiled(t, 0, c, dv)
    elif ".in_proj_b." in name or ".in_proj_a." in name or ".A_log" in name or ".dt_bias" in name:
        t = _tiled(t, 0, c, 1)
    elif ".out_proj." in name:
        t = _tiled(t, 1, c, dv)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.rpartition(".dt_bias")[0] + ".dt_proj.bias"
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    return name, t


def _metadata(w, c) -> None:
    """TextModel's keys (Qwen2MoeModel's expert keys for the MoE), the RoPE sections, the linear layers' keys."""
    moe = hasattr(c, "num_experts")
    if moe:  # no intermediate_size: TextModel writes no feed_forward_length
        for key in ("block_count", "context_length", "embedding_length", "head_count", "head_count_kv"):
            getattr(w, f"add_{key}")(getattr(c, {"block_count": "num_hidden_layers", "context_length":
                                     "max_position_embeddings", "embedding_length": "hidden_size", "head_count":
                                     "num_attention_heads", "head_count_kv": "num_key_value_heads"}[key]))  # fmt: skip
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    else:
        add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_sections(list(c.rope_parameters["mrope_section"]) + [0])
    if moe:
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    w.add_ssm_conv_kernel(c.linear_conv_kernel_dim)
    w.add_ssm_state_size(c.linear_key_head_dim)
    w.add_ssm_group_count(c.linear_num_key_heads)
    w.add_ssm_time_step_rank(c.linear_num_value_heads)
    w.add_ssm_inner_size(c.linear_value_head_dim * c.linear_num_value_heads)
    w.add_full_attention_interval(getattr(c, "full_attention_interval", 4))
    w.add_rope_dimension_count(int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))


def _checkpoint(c, path: str):
    """The checkpoint's tensors, experts stacked per part as Qwen2MoeModel stacks (or splits) them."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    for name, t in stacked_experts(tensors, ".mlp.experts.", getattr(c, "num_experts", 0)):
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            yield from ((f"{name.removesuffix('gate_up_proj')}{p}_proj.weight", x) for p, x in (("gate", gate),
                                                                                                ("up", up)))  # fmt: skip
        else:
            yield (f"{name}.weight" if name.endswith("experts.down_proj") else name), t


def write_qwen3_5_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' Qwen 3.5 (or 3.5 MoE) text model `hf` (without MTP
    layers): the metadata above, the tensors as modify_tensors makes them (see autolm.models.qwen3_next_gguf);
    `kind` "Q8_0": the matrices in Q8_0 blocks but the conv's and the routers'."""
    import gguf

    c = hf.config
    arch = gguf.MODEL_ARCH.QWEN35MOE if hasattr(c, "num_experts") else gguf.MODEL_ARCH.QWEN35
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    _metadata(w, c)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for stored, t in _checkpoint(c, f"{hf.name_or_path}/model.safetensors"):
        name, t = _converted(c, stored, t.float())
        base, suffix = name.rsplit(".", 1) if name.endswith((".weight", ".bias")) else (name, "")
        out = names.get_name(base) + (f".{suffix}" if suffix else "")
        data = np.ascontiguousarray(t.numpy())
        blocks = (
            data.ndim > 1 and data.shape[-1] % 32 == 0 and not any(s in out for s in ("conv1d", "gate_inp"))
        )
        if kind == "Q8_0" and blocks:
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
    """The converter's F32 file loads as Qwen3_5ForCausalLM with transformers' logits; its Q8_0 file (kept in its
    blocks) gives logits close to them."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_qwen3_5_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert model.config.layer_types == hf.config.layer_types
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    theirs = _logits(hf, ids)
    torch.testing.assert_close(_logits(model, ids), theirs, atol=1e-4, rtol=1e-4)
    write_qwen3_5_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert (_logits(quant, ids) - theirs).abs().mean() <= 0.1 * theirs.abs().mean()


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Value heads wider than the key heads, attention biases: a ConfigError naming them, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(DENSE.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="linear_value_head_dim"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    model.config.linear_value_head_dim = model.config.linear_key_head_dim  # the check reads the config only
    with pytest.raises(autolm.ConfigError, match="attention_bias"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
