"""Cohere 2 (Command R7B, Command A) against transformers and peft: Cohere's parallel block (one weight-only
LayerNorm feeding attention and the SwiGLU MLP), sliding-window layers with RoPE over interleaved pairs and global
layers with no position encoding (NoPE), logits times logit_scale, tied embeddings, GQA; a window (4) shorter than
the prompts so that it matters. A second checkpoint switches on what no release has: a layer pattern of 2, q/k/v/o
biases, an untied head, head_dim != hidden / heads. The standard battery, config.json as transformers writes it,
GGUF as llama.cpp's Cohere2Model converter writes it (in, out, Q8_0), Command R7B's chat template and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64)
# peft has no default targets for cohere2
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Command R7B's shape: three local layers and a global one, GQA, tied, a logit scale away from 1
R7B = Family("Cohere2Config", dict(_SHAPE, num_hidden_layers=4, num_key_value_heads=2, sliding_window=4,
                                   logit_scale=0.5, rope_theta=1000.0), lora_targets=_TARGETS)  # fmt: skip
# the config's other switches: local / global alternating, biases, an untied head, a wider head, another epsilon
QUIRKS = Family("Cohere2Config", dict(_SHAPE, num_hidden_layers=3, head_dim=24, sliding_window=3,
                                      sliding_window_pattern=2, attention_bias=True, tie_word_embeddings=False,
                                      logit_scale=1.7, layer_norm_eps=1e-3),
                lora_targets=["q_proj", "v_proj", "down_proj"])  # fmt: skip
FAMILIES = {"r7b": R7B, "quirks": QUIRKS}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    R7B.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    R7B.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    R7B.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    R7B.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    R7B.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    R7B.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    R7B.check_disk_offload(tmp_path_factory, tmp_path)


def test_global_layers_have_no_rope_and_the_window_matters(tmp_path_factory):
    """The layers as transformers builds them: RoPE and the window on the local layers only; and both matter
    here (without RoPE or without the window the logits move)."""
    directory, _ = R7B.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attn = [layer.self_attn for layer in model.model.layers]
    assert [(a.rope, a.sliding_window, a.rope_interleaved) for a in attn] == [("default", 4, True)] * 3 + [
        (None, None, True)
    ]
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        attn[-1].rope = "default"  # RoPE on the global layer too
        assert (model(ids, attention_mask=mask).logits - want).abs().max() > 1e-3
        attn[-1].rope = None
        for a in attn[:3]:  # no window on the local layers
            a.sliding_window = None
        assert (model(ids, attention_mask=mask).logits - want).abs().max() > 1e-3


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (no lm_head of its own when tied); the saved
    config.json has transformers' keys and values (head_dim and layer_types included), no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """Cohere2Config() holds transformers' defaults (RoPE base 10000, a 4096 window, every 4th layer global, ...);
    initializer_range, which autolm keeps only where config.json has it, aside."""
    import transformers

    from autolm.models import Cohere2Config

    theirs = json.loads(transformers.Cohere2Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Cohere2Config().to_dict() == theirs


@pytest.mark.parametrize("every", [2, 3, 4])
def test_sliding_window_pattern_is_read_as_transformers_reads_it(tmp_path, every):
    """An older config.json with sliding_window_pattern and no layer_types: the layer types transformers derives,
    and the pattern not written back (transformers drops it too)."""
    import transformers

    d = dict(model_type="cohere2", hidden_size=64, num_attention_heads=4, num_hidden_layers=7, vocab_size=VOCAB,
             sliding_window_pattern=every)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = autolm.AutoConfig.from_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ours.layer_types == theirs.layer_types
    assert [ours.layer_rope(i) for i in range(7)] == [
        "default" if t == "sliding_attention" else None for t in theirs.layer_types
    ]
    assert "sliding_window_pattern" not in ours.to_dict()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(logit_scale=None), "logit_scale"),
        (dict(logit_scale="0.0625"), "logit_scale"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window_pattern=0), "sliding_window_pattern"),
        (dict(layer_types=["sliding_attention"]), "layer_types"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="cohere2", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes cohere2 ------------------------------------------------


def _cohere2_metadata(w, c) -> None:
    """Cohere2Model.set_gguf_parameters (conversion/command_r.py): TextModel's keys (sizes, head counts, the RoPE
    base, the LayerNorm epsilon, the head size as key/value length: transformers' config has head_dim), then
    logit_scale, the window, the vocabulary size, rotary_pct (1.0 in Command R7B's config.json) of the head as the
    rotary dimensions, RoPE scaling type "none"."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_logit_scale(c.logit_scale)
    w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(int(1.0 * c.head_dim))
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def add_weights(w, tensors, name_of, qtype: str | None = None) -> None:
    """The checkpoint's tensors under llama.cpp's names (`name_of`: the HF stem -> its GGUF stem), biases that are
    all zero dropped (the converter's Cohere 2 classes skip them); with qtype ("Q8_0") the weights of two and more
    dimensions quantized, as llama-quantize / --outtype q8_0 does, but the routers (F32 in llama.cpp)."""
    import gguf

    for name, t in tensors:
        base, kind = name.rsplit(".", 1)
        if kind == "bias" and not t.any():
            continue
        out = f"{name_of(base)}.{kind}"
        data = np.ascontiguousarray(t.float().numpy())
        if qtype is not None and data.ndim >= 2 and "ffn_gate_inp" not in out:
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(out, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            w.add_tensor(out, data)


def write_cohere2_gguf(hf, path: str, qtype: str | None = None) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Cohere 2 `hf` (--outtype f32, or q8_0 with qtype),
    from the checkpoint's files: tensors renamed one to one by gguf-py's map (no q/k permutation, no output
    tensor: tied), a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "cohere2")
    _cohere2_metadata(w, c)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.COHERE2, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    add_weights(w, tensors.items(), names.get_name, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """tests/test_gguf_out.py's byte-level tokenizer (no merges): what save_gguf of a tiny checkpoint writes fast."""
    return _byte_tokenizer(tmp_path_factory.mktemp("cohere2_tok") / "tok")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Cohere2ForCausalLM with transformers' logits (the window, the local / global
    layers, logit_scale, the LayerNorm epsilon read back); its Q8_0 version, kept in its blocks, close to them."""
    _, hf = R7B.checkpoint(tmp_path_factory)
    write_cohere2_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, hf.config
    assert type(model).__name__ == "Cohere2ForCausalLM" and c.tie_word_embeddings
    assert (c.layer_types, c.sliding_window, c.head_dim) == (want.layer_types, 4, 16)
    assert (c.logit_scale, c.layer_norm_eps) == pytest.approx((want.logit_scale, want.layer_norm_eps))
    ids, mask = padded_batch()
    theirs = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    write_cohere2_gguf(hf, str(tmp_path / "q8.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", quantization="gguf")
    assert any(type(m).__name__.startswith("GGML") for m in kept.modules())
    got = _logits(kept, ids, mask)
    assert (got - theirs).abs().mean() < 0.05 * theirs.abs().mean()


def test_gguf_out_writes_another_pattern_as_flags(tmp_path_factory, tmp_path, byte_tokenizer):
    """A layer pattern other than llama.cpp's default (every 4th layer global) goes out as the local layers'
    flags, which llama.cpp's cohere2 reads, and comes back as those layer types."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = R7B.checkpoint(tmp_path_factory)
    types = ["sliding_attention", "full_attention"] * 2
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, layer_types=types)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert GGUFFile(path).metadata["cohere2.attention.sliding_window_pattern"] == [True, False, True, False]
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.layer_types == types
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(back, ids, mask), _logits(model, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,field",
    [
        ({}, "tie_word_embeddings"),  # the QUIRKS checkpoint: untied first
        (dict(tie_word_embeddings=True), "head_dim"),
        (dict(tie_word_embeddings=True, head_dim=16), "attention_bias"),
    ],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,
    change,
    field,
):
    """llama.cpp's cohere2 reads the embeddings as the head, makes q (hidden, hidden) and reads no biases: an untied
    head, another head size, biases are refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = QUIRKS.checkpoint(tmp_path_factory)
    config = autolm.AutoConfig.from_pretrained(directory, **change)
    model = autolm.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError, match=field):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert not os.path.exists(tmp_path / "m.gguf")


# ---- chat template, the command line ---------------------------------------------------------------------------


def test_chat_template(tmp_path):
    """Command R7B's template (its tool-use template, as llama.cpp's models/templates keep it): a system preamble,
    turns, tools, and documents with tools (documents alone: the template iterates over tools, None, and fails in
    transformers too) render as in transformers."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    documents = [{"title": "France", "text": "Paris is the capital of France."}]
    check_chat_template(
        tmp_path, "cohere2.jinja", variants=({}, {"tools": tools}, {"tools": tools, "documents": documents})
    )


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate --chat` gives transformers' tokens with Command R7B's template (a long system preamble:
    the context must hold it); `autolm inspect` names the class and type."""
    long = Family(R7B.config_cls, dict(R7B.kwargs, max_position_embeddings=4096))
    check_cli(long, "cohere2.jinja", tmp_path_factory, tmp_path, "Cohere2ForCausalLM (cohere2)")
