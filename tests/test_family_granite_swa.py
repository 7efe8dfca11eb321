"""Granite SWA against transformers: every Granite multiplier away from 1, GQA, q/k/v/o and MLP biases, a full
layer then two sliding ones (a window of 4 tokens, shorter than the prompts), a RoPE base per layer with a NoPE
layer between two bases, the attention sinks; the standard battery, GGUF as llama.cpp's GraniteSWAModel converter
writes it (in, out, Q8_0), Granite's chat template and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_llamacpp import _granite, permute
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

KWARGS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    embedding_multiplier=3.0,
    residual_multiplier=0.6,
    attention_multiplier=0.09,
    logits_scaling=2.5,
    attention_bias=True,
    mlp_bias=True,
    sliding_window=4,
    tie_word_embeddings=False,
)
GRANITE_SWA = Family(
    "GraniteSWAConfig",
    dict(KWARGS, layer_rope_theta=[10000.0, 0, 50000.0]),
    lora_targets=["q_proj", "v_proj"],
)
# what llama.cpp's graph runs: one RoPE base; the NoPE layer as the converter writes it from no_rope_layers
GRANITE_SWA_GGUF = Family(
    "GraniteSWAConfig", dict(KWARGS, layer_rope_theta=[10000.0, 0, 10000.0], no_rope_layers=[1, 0, 1])
)


def test_logits(tmp_path_factory):
    GRANITE_SWA.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GRANITE_SWA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GRANITE_SWA.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GRANITE_SWA.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GRANITE_SWA.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GRANITE_SWA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GRANITE_SWA.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the saved files; only transformers' config keys."""
    GRANITE_SWA.check_save(tmp_path_factory, tmp_path)
    check_saved_names(GRANITE_SWA, tmp_path_factory, tmp_path)


def check_saved_names(family, tmp_path_factory, tmp_path) -> None:
    import json

    from safetensors import safe_open

    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.state_dict().keys() == hf.state_dict().keys()
    assert "model.layers.2.self_attn.sinks" in model.state_dict()
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as theirs,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as ours,
    ):
        assert set(ours.keys()) == set(theirs.keys())
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}
    assert model.config.layer_rope_theta == hf.config.layer_rope_theta


def test_disk_offload(tmp_path_factory, tmp_path):
    GRANITE_SWA.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's GraniteSWAModel / GraniteMoeSWAModel converters (conversion/granite.py), emulated --------

_STEMS = {  # transformers' module -> llama.cpp's name (gguf-py's GRANITE_SWA map, which the installed gguf lacks)
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.sinks": "attn_sinks",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "block_sparse_moe.router": "ffn_gate_inp",
    "block_sparse_moe.experts.gate_up_proj": "ffn_gate_up_exps",
    "block_sparse_moe.experts.down_proj": "ffn_down_exps",
    "shared_mlp.input_linear": "ffn_up_shexp",
    "shared_mlp.output_linear": "ffn_down_shexp",
}


def _gguf_name(name: str) -> str:
    """The converter's name: `sinks` and the stacked experts given a ".weight" (filter_tensors, modify_tensors)."""
    if not name.endswith((".weight", ".bias")):
        name += ".weight"
    base, kind = name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, bid, module = base.split(".", 3)
        return f"blk.{bid}.{_STEMS[module]}.{kind}"
    return f"{_STEMS[base]}.{kind}"


def write_granite_swa_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' Granite SWA or Granite MoE SWA `hf`, from the
    checkpoint's files: GraniteModel's metadata (Llama's, the multipliers as "scale" keys, no head_dim), then
    the window, a sliding flag per layer and, where config.json has no_rope_layers, a RoPE flag per layer; the
    MoE's expert counts (TextModel) and shared MLP width (where set); q/k rows permuted; the sinks as attn_sinks,
    the experts' gate_up_proj and the shared MLP's input_linear kept fused; `kind` "Q8_0" quantizes the layers'
    matrices."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "granite_swa")
    _granite(w, c)
    if getattr(c, "num_local_experts", None):
        w.add_expert_count(c.num_local_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    if getattr(c, "no_rope_layers", None):
        w.add_array("granite_swa.attention.rope_pattern", [bool(x) for x in c.no_rope_layers])
    if getattr(c, "shared_intermediate_size", 0):
        w.add_expert_shared_feed_forward_length(c.shared_intermediate_size)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    add_toy_vocab(w)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if ".q_proj." in name or ".k_proj." in name:
            t = permute(t, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        data, out = np.ascontiguousarray(t.float().numpy()), _gguf_name(name)
        if kind != "F32" and data.ndim >= 2 and out.startswith("blk.") and ".ffn_gate_inp." not in out:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(out, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_gguf_in(family, name: str, tmp_path_factory, tmp_path) -> None:
    """The converter's file loads as `name` with transformers' logits; its Q8_0 version with quantization="gguf"
    gives close logits."""
    _, hf = family.checkpoint(tmp_path_factory)
    write_granite_swa_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == name
    assert model.config.layer_types == hf.config.layer_types
    assert model.config.layer_rope_theta == hf.config.layer_rope_theta
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        got = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        write_granite_swa_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
    assert (got - want).abs().mean() <= 0.03 * want.abs().mean()


def check_gguf_out(family, tmp_path_factory, tmp_path, tokenizer) -> None:
    """save_gguf writes the converter's metadata and tensors byte for byte; the file loads back with the model's
    logits."""
    from test_gguf_out import IDS, _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_granite_swa_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(back) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_gguf(tmp_path_factory, tmp_path):
    check_gguf_in(GRANITE_SWA_GGUF, "GraniteSWAForCausalLM", tmp_path_factory, tmp_path)


def test_gguf_out_refuses_a_rope_base_per_layer(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's graph rotates every layer at rope.freq_base: a ConfigError naming layer_rope_theta, no file."""
    check_gguf_out_refuses(GRANITE_SWA, {}, "layer_rope_theta", tmp_path_factory, tmp_path, byte_tokenizer)


def test_gguf_out_refuses_no_window(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's graph needs a window (sliding_window null: every layer full): a ConfigError naming it."""
    check_gguf_out_refuses(
        GRANITE_SWA_GGUF,
        {"sliding_window": None},
        "sliding_window",
        tmp_path_factory,
        tmp_path,
        byte_tokenizer,
    )


def check_gguf_out_refuses(family, changes, field, tmp_path_factory, tmp_path, tokenizer) -> None:
    """save_gguf of the family's checkpoint with these config changes: a ConfigError naming `field`, no file."""
    from autolm.gguf_writer import save_gguf

    directory = family.checkpoint(tmp_path_factory)[0]
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, **changes)
    with pytest.raises(autolm.ConfigError, match=f"'{model.config.model_type}' model.*{field}"):
        save_gguf(model, tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


# ---- CLI, config ------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """Granite 3.3's template (no granite-swash template is stored here)."""
    long = Family(GRANITE_SWA.config_cls, dict(GRANITE_SWA.kwargs, max_position_embeddings=2048))
    check_cli(
        long,
        "granite-3.3-2b-instruct.jinja",
        tmp_path_factory,
        tmp_path,
        "GraniteSWAForCausalLM (granite_swa)",
    )


def test_config_defaults_as_transformers():
    import transformers

    ours, theirs = (
        autolm.models.GraniteSWAConfig(num_hidden_layers=6),
        transformers.GraniteSWAConfig(num_hidden_layers=6),
    )
    assert ours.layer_types == theirs.layer_types
    assert ours.layer_rope_theta == theirs.layer_rope_theta
    assert (ours.sliding_window, ours.vocab_size, ours.tie_word_embeddings) == (128, 100352, True)


def test_config_errors_name_the_key():
    from autolm.models.granite_swa import GraniteSWAConfig

    with pytest.raises(autolm.ConfigError, match="layer_rope_theta"):
        GraniteSWAConfig(num_hidden_layers=2, layer_rope_theta=[10000.0])
    with pytest.raises(autolm.ConfigError, match="layer_rope_theta"):
        GraniteSWAConfig(num_hidden_layers=2, layer_rope_theta=[10000.0, -1])
    with pytest.raises(autolm.ConfigError, match="sliding_window"):
        GraniteSWAConfig(sliding_window=0)
    with pytest.raises(autolm.ConfigError, match="logits_scaling"):
        GraniteSWAConfig(logits_scaling=0)
