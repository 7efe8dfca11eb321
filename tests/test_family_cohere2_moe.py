"""Cohere 2 MoE against transformers and peft: Cohere 2's parallel block, local layers with interleaved RoPE and
a window (shorter than the prompts), global NoPE layers, logit_scale; experts (4, each token's top 2) per layer.
NORTH: a dense first layer (global and rotated: prefix pattern 1) of its own width, sigmoid routing renormalised,
a shared expert averaged with the experts, RMSNorm, head_dim != hidden / heads, GQA. SOFTMAX: transformers'
defaults (softmax over the top k, no shared expert, LayerNorm), local and global layers alternating. QUIRKS: what
llama.cpp cannot run: two shared experts added ("sum"), sigmoid unrenormalised, two dense layers with a prefix
pattern of 2 (a global dense layer without RoPE), biases, an untied head. The checkpoint as transformers writes it
(one tensor per expert). The standard battery, config.json, GGUF as llama.cpp's Cohere2MoeModel converter writes it
(in, out, Q8_0), North-Mini-Code's chat template and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import VOCAB, padded_batch
from family_checks import Family
from gguf_mimic import add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_cohere2 import _logits, add_weights, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

_SHAPE = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, max_position_embeddings=64,
              num_experts=4, num_experts_per_tok=2)  # fmt: skip
# peft has no default for cohere2_moe; the MLPs' names would also name the experts' stacked parameters, which
# transformers' conversion for peft fuses (gate and up together)
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
NORTH = Family("Cohere2MoeConfig", dict(_SHAPE, num_hidden_layers=4, sliding_window_pattern=3, num_key_value_heads=2, head_dim=32,
                                        sliding_window=4, logit_scale=0.5, rope_theta=1000.0, rms_norm_eps=1e-5,
                                        expert_selection_fn="sigmoid", num_shared_experts=1, first_k_dense_replace=1,
                                        prefix_dense_intermediate_size=96), lora_targets=_TARGETS)  # fmt: skip
SOFTMAX = Family("Cohere2MoeConfig", dict(_SHAPE, num_hidden_layers=3, head_dim=16, sliding_window=3,
                                          sliding_window_pattern=2, logit_scale=1.5), lora_targets=_TARGETS)  # fmt: skip
QUIRKS = Family("Cohere2MoeConfig", dict(_SHAPE, num_hidden_layers=4, head_dim=16, sliding_window=3,
                                         sliding_window_pattern=2, num_shared_experts=2,
                                         shared_expert_combination_strategy="sum", expert_selection_fn="sigmoid",
                                         norm_topk_prob=False, first_k_dense_replace=2,
                                         prefix_dense_sliding_window_pattern=2, attention_bias=True,
                                         tie_word_embeddings=False), lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"north": NORTH, "softmax": SOFTMAX, "quirks": QUIRKS}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    NORTH.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    NORTH.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    NORTH.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    NORTH.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    NORTH.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NORTH.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", ["north", "quirks"])
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names in the state dict; the checkpoint's per-expert tensors and transformers' config keys in
    the files autolm saves."""

    family = FAMILIES[name]
    _, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.3.mlp.experts.3.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    NORTH.check_disk_offload(tmp_path_factory, tmp_path)


def test_layers_are_transformers(tmp_path_factory):
    """QUIRKS' layers as transformers builds them: two dense layers of intermediate_size (no prefix width), local /
    global by the prefix pattern (the global dense layer without RoPE), the shared experts 2 x wide and added."""
    directory, hf = QUIRKS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = model.model.layers
    assert [(a.self_attn.rope, a.self_attn.sliding_window) for a in layers] == [
        ("default", 3),
        (None, None),
        ("default", 3),
        (None, None),
    ]
    assert [bool(hf.model.layers[i].self_attn.force_rope) for i in range(4)] == [False] * 4
    assert [type(layer.mlp).__name__ for layer in layers] == ["GatedMLP"] * 2 + [
        "Cohere2MoeSparseMoeBlock"
    ] * 2
    assert layers[0].mlp.up_proj.out_features == 32 and not layers[2].mlp.average
    assert layers[2].mlp.shared_experts.up_proj.out_features == 64
    north = autolm.AutoModelForCausalLM.from_pretrained(NORTH.checkpoint(tmp_path_factory)[0])
    assert (
        north.model.layers[0].self_attn.rope == "default"
        and north.model.layers[0].self_attn.sliding_window is None
    )
    assert type(north.model.layers[0].input_layernorm).__name__ == "RMSNorm"


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_config_is_transformers(tmp_path_factory, tmp_path, name):
    """The saved config.json has transformers' keys and values (rope_theta and rope_scaling beside
    rope_parameters, layer_types and mlp_layer_types; first_k_dense_replace not written back), no others."""
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    autolm.AutoConfig.from_pretrained(directory).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original


def test_default_config_is_transformers():
    import transformers

    from autolm.models import Cohere2MoeConfig

    theirs = json.loads(transformers.Cohere2MoeConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Cohere2MoeConfig().to_dict() == theirs


@pytest.mark.parametrize("k,prefix,every", [(0, 1, 4), (2, 1, 3), (3, 2, 2)])
def test_layer_types_are_derived_as_transformers_derives_them(tmp_path, k, prefix, every):
    import transformers

    d = dict(model_type="cohere2_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=7, vocab_size=VOCAB,
             first_k_dense_replace=k, prefix_dense_sliding_window_pattern=prefix, sliding_window_pattern=every)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours, theirs = (
        autolm.AutoConfig.from_pretrained(tmp_path),
        transformers.AutoConfig.from_pretrained(tmp_path),
    )
    assert (ours.layer_types, ours.mlp_layer_types) == (theirs.layer_types, theirs.mlp_layer_types)
    assert "first_k_dense_replace" not in ours.to_dict()


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(expert_selection_fn="relu"), "expert_selection_fn"),
        (dict(shared_expert_combination_strategy="max"), "shared_expert_combination_strategy"),
        (dict(num_shared_experts=-1), "num_shared_experts"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(rms_norm_eps=0), "rms_norm_eps"),
        (dict(mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(first_k_dense_replace=3), "first_k_dense_replace"),
        (dict(prefix_dense_intermediate_size=0), "prefix_dense_intermediate_size"),
        (dict(prefix_dense_sliding_window_pattern=0, first_k_dense_replace=1), "prefix_dense_sliding_window"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(logit_scale=None), "logit_scale"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="cohere2_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes cohere2moe ---------------------------------------------

# gguf-py's tensor map for the names Cohere2MoeModel hands it (the installed gguf package predates cohere2moe)
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          **{f"mlp.experts.{p}_proj": f"ffn_{p}_exps" for p in ("gate", "up", "down")},
          **{f"mlp.shared_experts.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")}}  # fmt: skip
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(base: str) -> str:
    if base in _TOP:
        return _TOP[base]
    _, _, i, rest = base.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}"


def _metadata(w, c) -> None:
    """Cohere2MoeModel.set_gguf_parameters (conversion/command_r.py) over TextModel's (conversion/base.py), from
    transformers' config dict: feed_forward_length only where prefix_dense_intermediate_size is not null, the RMS
    epsilon only where set, the LayerNorm epsilon, expert counts, the gating function from expert_selection_fn,
    the head size; then logit_scale, the window and the local layers' flags, the vocabulary size, the experts'
    length, the leading dense layers, norm_topk_prob, the shared experts, the head as the rotary dimensions."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    if c.prefix_dense_intermediate_size is not None:
        w.add_feed_forward_length(c.prefix_dense_intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if c.rms_norm_eps is not None:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType[c.expert_selection_fn.upper()])
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_logit_scale(c.logit_scale)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    w.add_vocab_size(c.vocab_size)
    w.add_expert_feed_forward_length(c.intermediate_size)
    w.add_leading_dense_block_count(next((i for i, t in enumerate(c.mlp_layer_types) if t != "dense"), 0))
    w.add_expert_weights_norm(c.norm_topk_prob)
    if c.num_shared_experts > 0:
        w.add_expert_shared_count(c.num_shared_experts)
        w.add_expert_shared_feed_forward_length(c.intermediate_size * c.num_shared_experts)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def write_cohere2_moe_gguf(hf, path: str, qtype: str | None = None) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Cohere 2 MoE `hf` (--outtype f32, or q8_0 with qtype),
    from the checkpoint's files: each layer's per-expert tensors stacked, no q/k permutation, a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "cohere2moe")
    _metadata(w, c)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    add_weights(w, stacked_experts(tensors, ".mlp.experts.", c.num_experts), _gguf_name, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["north", "softmax"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as Cohere2MoeForCausalLM with transformers' logits (routing, shared expert,
    dense prefix, norms, layer types read back); its Q8_0 version, kept in its blocks, close to them."""
    family = FAMILIES[name]
    _, hf = family.checkpoint(tmp_path_factory)
    write_cohere2_moe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, hf.config
    assert type(model).__name__ == "Cohere2MoeForCausalLM"
    fields = ("layer_types", "mlp_layer_types", "expert_selection_fn", "num_shared_experts", "head_dim")
    assert {f: getattr(c, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert c.rms_norm_eps == (None if want.rms_norm_eps is None else pytest.approx(want.rms_norm_eps))
    ids, mask = padded_batch()
    theirs = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    write_cohere2_moe_gguf(hf, str(tmp_path / "q8.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", quantization="gguf")
    assert any(type(m).__name__.startswith("GGML") for m in kept.modules())
    close = (_logits(kept, ids, mask) - theirs).abs() <= 0.05 * (theirs.abs() + theirs.abs().max())
    assert close.float().mean() >= 0.95  # a routing flip moves a few


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's cohere2moe averages the shared experts, rotates every leading dense layer and reads no biases:
    QUIRKS is refused naming what differs, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(QUIRKS.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError) as e:
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    for field in ("attention_bias", "shared experts' combination", "layer RoPE"):
        assert field in str(e.value), field
    assert not os.path.exists(tmp_path / "m.gguf")


# ---- the command line -------------------------------------------------------------------------------------------


def test_chat_template(tmp_path):
    """North-Mini-Code's template (as llama.cpp's models/templates keep it, Cohere2MoE.jinja): turns, reasoning off,
    tools, and documents with tools (documents alone: the template iterates over tools, None, and fails in
    transformers too) render as in transformers."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    documents = [{"title": "France", "text": "Paris is the capital of France."}]
    variants = ({}, {"reasoning": False}, {"tools": tools}, {"tools": tools, "documents": documents})
    check_chat_template(tmp_path, "cohere2_moe.jinja", variants=variants)


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate --chat` gives transformers' tokens with North-Mini-Code's template; `autolm inspect` names
    the class and type."""
    long = Family(NORTH.config_cls, dict(NORTH.kwargs, max_position_embeddings=1024))
    check_cli(long, "cohere2_moe.jinja", tmp_path_factory, tmp_path, "Cohere2MoeForCausalLM (cohere2_moe)")
