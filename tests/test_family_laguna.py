"""Laguna (poolside) against transformers and peft. XS: full / sliding / sliding / full layers (a 5-slot window
shorter than the prompts), query heads varying by layer (4, 6, 4, 2 over 2 KV heads), the full layers rotating half
of each head (base 500000), the sliding ones all of it, per-head q/k norms and a per-head softplus output gate; a
dense first layer then mixtures of 8 experts (sigmoid scores soft-capped, steered by a random
e_score_correction_bias, renormalised, times 2.5) plus a shared MLP of its own size; the checkpoint as transformers
writes it (one tensor per expert, the bias under mlp.experts, the shared MLP as shared_expert). M: every layer full,
the per-element gate, two dense layers, YaRN on the full layers, no soft-capping. The standard battery, config.json
round trips, transformers' defaults and config errors by name."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.models.laguna import LagunaConfig

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_attention_heads_per_layer=[4, 6, 4, 2],
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts=8,
    num_experts_per_tok=2,
    layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    sliding_window=5,
    gating=True,
    moe_routed_scaling_factor=2.5,
    moe_router_logit_softcapping=3.0,
)
# peft has no default for laguna
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj"]
XS = Family("LagunaConfig", SIZES, lora_targets=TARGETS)
M = Family(
    "LagunaConfig",
    dict(
        SIZES,
        layer_types=None,
        num_attention_heads_per_layer=None,
        gating="per-element",
        mlp_layer_types=["dense", "dense", "sparse", "sparse"],
        moe_routed_scaling_factor=1.0,
        moe_router_logit_softcapping=0.0,
        rope_parameters={
            "full_attention": {
                "rope_type": "yarn",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "partial_rotary_factor": 0.5,
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    lora_targets=TARGETS,
)
BOTH = pytest.mark.parametrize("family", [XS, M], ids=["xs", "m"])


@BOTH
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    XS.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    XS.check_bf16(tmp_path_factory)


@BOTH
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    XS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    XS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    M.check_quantized(tmp_path_factory, bits)


def test_layers_heads_routing_and_gate(tmp_path_factory):
    """Per-layer heads, windows, RoPE tables and gate widths; the random e_score_correction_bias loaded (from the
    checkpoint's mlp.experts name) and it changes the logits, as do the output gate and the soft-capping."""
    directory, hf = XS.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    layers = model.model.layers
    assert [type(layer.mlp).__name__ for layer in layers] == ["GatedMLP", *["SparseMoeBlock"] * 3]
    assert [layer.self_attn.num_heads for layer in layers] == [4, 6, 4, 2]
    assert [layer.self_attn.g_proj.weight.shape[0] for layer in layers] == [4, 6, 4, 2]
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 5, 5, None]
    assert [layer.self_attn.rope for layer in layers] == [
        "full_attention",
        *["sliding_attention"] * 2,
        "full_attention",
    ]
    for i in (1, 2, 3):
        ours, theirs = (
            layers[i].mlp.gate.e_score_correction_bias,
            hf.model.layers[i].mlp.gate.e_score_correction_bias,
        )
        assert ours.abs().min() > 0 and torch.equal(ours, theirs)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        no_bias = model(ids, attention_mask=mask).logits
        for layer in layers[1:]:
            layer.mlp.gate.softcap = 0.0
        no_cap = model(ids, attention_mask=mask).logits
        layers[0].self_attn.g_proj.weight.zero_()
        no_gate = model(ids, attention_mask=mask).logits
    for a, b in ((before, no_bias), (no_bias, no_cap), (no_cap, no_gate)):
        assert not torch.allclose(a, b, atol=1e-3)
    m = autolm.AutoModelForCausalLM.from_pretrained(M.checkpoint(tmp_path_factory)[0])
    assert [layer.self_attn.g_proj.weight.shape[0] for layer in m.model.layers] == [4 * 16] * 4
    assert [type(layer.mlp).__name__ for layer in m.model.layers] == ["GatedMLP"] * 2 + ["SparseMoeBlock"] * 2


@BOTH
def test_names_and_config(family, tmp_path_factory, tmp_path):
    family.check_names_and_config(tmp_path_factory, tmp_path)


def test_saved_files(tmp_path_factory, tmp_path):
    """The files autolm saves hold the checkpoint's names (per-expert tensors, the router's bias under
    mlp.experts, shared_expert) and config.json's keys."""
    _, saved = XS.check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.mlp.experts.e_score_correction_bias", "model.layers.1.mlp.experts.7.up_proj.weight",
            "model.layers.1.mlp.shared_expert.down_proj.weight"} <= saved  # fmt: skip
    assert not any("shared_experts" in k or "gate.e_score" in k for k in saved)


def test_default_config_is_transformers():
    """LagunaConfig holds transformers' defaults; the derived lists as transformers derives them."""
    import transformers

    check_config_defaults(LagunaConfig)
    for kw in (dict(num_hidden_layers=3), dict(num_hidden_layers=2, num_attention_heads=8)):
        ours, theirs = LagunaConfig.from_dict(kw), transformers.LagunaConfig(**kw)
        for key in ("layer_types", "mlp_layer_types", "num_attention_heads_per_layer", "rope_parameters"):
            assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(num_attention_heads_per_layer=[4, 3]), "num_attention_heads_per_layer"),
        (dict(num_attention_heads_per_layer=[4]), "num_attention_heads_per_layer"),
        (dict(gating="per-token"), "gating"),
        (dict(moe_apply_router_weight_on_input=True), "moe_apply_router_weight_on_input"),
        (dict(shared_expert_intermediate_size=0), "shared_expert_intermediate_size"),
        (dict(moe_router_logit_softcapping=-1.0), "moe_router_logit_softcapping"),
        (dict(moe_routed_scaling_factor="2"), "moe_routed_scaling_factor"),
        (dict(rope_parameters={"global": {"rope_theta": 1.0}}), "rope_parameters"),
        (
            dict(rope_parameters={"full_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.1875}}),
            "partial_rotary_factor",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        LagunaConfig.from_dict({"num_hidden_layers": 2, "num_key_value_heads": 2, "num_attention_heads": 4,
                                "head_dim": 16, **bad})  # fmt: skip


# ---- GGUF: llama.cpp's "laguna" ----------------------------------------------------------------------------------

# what llama.cpp's graph runs: the layer types its default pattern gives (full every 4th layer from the first), no
# router soft-cap; XS keeps its heads per layer, per-head gate, dense first layer and scaled routing, and the EOS
# list gives an end-of-turn token; M (no window, every layer full) its per-element gate, two dense layers and YaRN
GGUF_XS = Family("LagunaConfig", dict(SIZES, layer_types=["full_attention"] + ["sliding_attention"] * 3,
                                      moe_router_logit_softcapping=0.0))  # fmt: skip
# M's own weights tie two experts' scores at one position of llama.cpp's prompt, which its float16 KV cache breaks
# the other way: a shared MLP of another size draws other weights
GGUF_M = Family("LagunaConfig", dict(M.kwargs, shared_expert_intermediate_size=40))
GGUF_BOTH = pytest.mark.parametrize("family", [GGUF_XS, GGUF_M], ids=["xs", "m"])
# gguf-py's tensor map for "laguna" (MODEL_ARCH.LAGUNA; the gguf package installed here predates it)
_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.g_proj": "attn_gate",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.experts.e_score_correction": "exp_probs_b", "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps", "mlp.experts.down_proj": "ffn_down_exps",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}  # fmt: skip


def _laguna_keys(w, hp: dict) -> None:
    """LagunaModel.set_gguf_parameters: TextModel's keys (the full layers' RoPE and YaRN, the sliding ones' base),
    the heads per layer as an array, the window where there is one, the experts' keys, the leading dense layers,
    the rotary dimensions by layer type."""
    import gguf

    n, hd, rope = hp["num_hidden_layers"], hp["head_dim"], hp["rope_parameters"]
    full, local = rope["full_attention"], rope.get("sliding_attention")
    w.add_block_count(n)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp.get("num_attention_heads_per_layer") or [hp["num_attention_heads"]] * n)
    w.add_head_count_kv(hp["num_key_value_heads"])
    if full.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    w.add_rope_freq_base(full["rope_theta"])
    if local is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_expert_count(hp["num_experts"])
    w.add_expert_used_count(hp["num_experts_per_tok"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_vocab_size(hp["vocab_size"])
    if hp.get("sliding_window"):
        w.add_sliding_window(hp["sliding_window"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(float(hp["moe_routed_scaling_factor"]))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    types = hp["mlp_layer_types"]
    w.add_leading_dense_block_count(next((i for i, t in enumerate(types) if t != "dense"), len(types)))
    w.add_rope_dimension_count(int(hd * float(full.get("partial_rotary_factor", 1.0))))
    if local is not None:
        w.add_rope_dimension_count_swa(int(hd * float(local.get("partial_rotary_factor", 1.0))))


def write_laguna_gguf(hf, path: str, **changes) -> None:
    """The GGUF llama.cpp's LagunaModel converter makes of `hf` (--outtype f32), from the checkpoint files: its
    keys, the EOS list's id other than BOS as eot, the experts stacked, the rest by gguf-py's map (the router's
    bias as exp_probs_b.bias); a plain vocabulary."""
    import gguf
    from gguf_mimic import add_toy_vocab, stacked_experts
    from safetensors.torch import load_file

    hp = json.load(open(f"{hf.name_or_path}/config.json"))
    hp.update(changes)  # config.json's fields as a release has them (transformers' config cannot say null)
    w = gguf.GGUFWriter(path, "laguna")
    _laguna_keys(w, hp)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    extra = (
        [e for e in hp["eos_token_id"] if e != hp.get("bos_token_id")]
        if isinstance(hp.get("eos_token_id"), list)
        else []
    )
    if extra:
        w.add_eot_token_id(extra[0])
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    bias = {
        k.replace("_bias", ".bias"): tensors.pop(k) for k in list(tensors) if k.endswith("correction_bias")
    }
    for name, t in [*stacked_experts(tensors, ".mlp.experts.", hp["num_experts"]), *bias.items()]:
        base, kind = name.rsplit(".", 1)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
        out = f"blk.{m.group(1)}.{_GGUF_NAMES[m.group(2)]}" if m else _GGUF_NAMES[base]
        w.add_tensor(f"{out}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@GGUF_BOTH
def test_gguf(family, tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as LagunaForCausalLM with transformers' logits (heads per layer, the gate's kind
    from g_proj's width, layer types by llama.cpp's pattern, RoPE by layer type, dense layers, routing scale read
    back); autolm's GGUF out reads back as the same model; llama.cpp runs both files with close logits."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    directory, hf = family.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    eos = [1, 7] if family is GGUF_XS else None  # BOS (1) and an end of turn, as Laguna-XS.2's
    # Laguna-M.1's config.json has no window (every layer full); XS's EOS list
    write_laguna_gguf(hf, path, **(dict(eos_token_id=eos) if eos else dict(sliding_window=None)))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "LagunaForCausalLM"
    c, h = model.config, hf.config
    for name in ("num_attention_heads_per_layer", "layer_types", "mlp_layer_types", "head_dim",
                 "moe_routed_scaling_factor", "shared_expert_intermediate_size"):  # fmt: skip
        assert getattr(c, name) == getattr(h, name), name
    assert c.gate_per_head == (family is GGUF_XS) and c.sliding_window == (5 if eos else None)
    assert c.rope_kinds() == LagunaConfig.from_dict(hf.config.to_dict()).rope_kinds() or family is M
    with torch.no_grad():
        ours, theirs = model(ROW).logits[0], hf(ROW).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    out = save_gguf(autolm.AutoModelForCausalLM.from_pretrained(directory, eos_token_id=eos or 2), merged_tokenizer,
                    str(tmp_path / "out.gguf"), "f32")  # fmt: skip
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.gate_per_head == c.gate_per_head and back.config.layer_types == h.layer_types
    with torch.no_grad():
        torch.testing.assert_close(back(ROW).logits[0], theirs, atol=1e-4, rtol=1e-4)
    from autolm.sources.gguf import GGUFFile

    eot = GGUFFile(out).metadata.get("tokenizer.ggml.eot_token_id")
    assert eot == (7 if family is GGUF_XS else None)
    _close_to_llama_cpp(ours, llama_cpp_logits(path))
    _close_to_llama_cpp(ours, llama_cpp_logits(out))


def test_gguf_out_of_another_layer_pattern(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """XS's layer types (full, sliding, sliding, full: off llama.cpp's default) go out as the layer flags, which
    llama.cpp reads (the converter writes none), and read back as the same model."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(XS.checkpoint(tmp_path_factory)[0],
                                                        moe_router_logit_softcapping=0.0)  # fmt: skip
    path = save_gguf(model, merged_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert GGUFFile(path).get("attention.sliding_window_pattern") == [False, True, True, False]
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.layer_types == model.config.layer_types
    with torch.no_grad():
        want = model(ROW).logits[0]
        torch.testing.assert_close(back(ROW).logits[0], want, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(want, llama_cpp_logits(path))


@pytest.mark.parametrize(
    "change, refused",
    [
        (dict(), "moe_router_logit_softcapping"),  # XS soft-caps its router's logits; llama.cpp does not
        (dict(moe_router_logit_softcapping=0.0, attention_bias=True), "attention_bias"),
        (dict(moe_router_logit_softcapping=0.0, mlp_layer_types=["sparse", "dense", "sparse", "sparse"]),
         "mlp_layer_types"),
        (dict(moe_router_logit_softcapping=0.0, sliding_window=None), "layer_types"),
    ],
)  # fmt: skip
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    change,
    refused,
    tmp_path_factory,
    tmp_path,
    merged_tokenizer,  # noqa: F811
):
    """A router soft-cap, attention biases (llama.cpp reads no o_proj bias), dense layers after a mixture (it
    makes only the leading ones dense), sliding layers with no window (it rotates them as the full ones): refused,
    naming the field, and no file."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.laguna import LagunaForCausalLM

    config = autolm.AutoModelForCausalLM.from_pretrained(XS.checkpoint(tmp_path_factory)[0]).config.to_dict()
    model = LagunaForCausalLM(LagunaConfig.from_dict({**config, **change}))  # its weights do not matter here
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, merged_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_gguf_in_refuses_routing_llama_cpp_would_not_renormalise():
    """A file without expert_weights_norm (llama.cpp would not renormalise the top k) or with softmax routing is
    refused by name."""
    from autolm.models.laguna_gguf import derive

    base = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
            "rope_parameters": {"rope_theta": 500000.0}}  # fmt: skip
    for keys, match in (({}, "expert_weights_norm"), ({"expert_weights_norm": True, "expert_gating_func": 1},
                                                       "expert_gating_func")):  # fmt: skip
        with pytest.raises(autolm.ConfigError, match=match):
            derive(dict(base), lambda k, default=None, keys=keys: keys.get(k, default))
