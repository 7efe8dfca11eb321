"""MiMo-V2-Flash against transformers and peft: a full-attention first layer then sliding-window layers (window 5,
shorter than the prompts) with twice the KV heads and attention sinks; head_dim 24 for queries and keys, values of
v_head_dim 16 scaled by attention_value_scale; partial RoPE (0.334) with a base per layer type; a dense first layer
then DeepSeek V3's sigmoid-routed mixture of 8 experts (2 per token, a random e_score_correction_bias), no shared
experts. A variant: layer_types sliding/full/sliding, mlp_layer_types sparse/dense/sparse, values wider than the
keys (head_dim 16, v_head_dim 24), no value scale, partial_rotary_factor 0.5, two expert groups of which one is
taken, no renormalisation, a routed scaling and a tied head. The checkpoint as transformers writes it (per-expert
tensors, self_attn.attention_sink_bias); the standard battery, the Hub's config.json spelling and the config's
checks. GGUF in and out as llama.cpp's "mimo2" (its converter's file mimicked, llama.cpp as the oracle where importable)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import padded_batch
from family_checks import check_config_defaults, same_logits
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import byte_tokenizer, merged_tokenizer  # noqa: F401

import autolm
from autolm.models.mimo_v2_flash import MiMoV2FlashConfig

_SHAPE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
              max_position_embeddings=64, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
              sliding_window=5)  # fmt: skip
_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for mimo_v2_flash
MIMO = RoutedFamily("MiMoV2FlashConfig", dict(_SHAPE, head_dim=24, v_head_dim=16), lora_targets=_LORA)
VARIANT = RoutedFamily(
    "MiMoV2FlashConfig",
    dict(_SHAPE, head_dim=16, v_head_dim=24, attention_value_scale=None, n_group=2, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=2.5, tie_word_embeddings=True,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
         mlp_layer_types=["sparse", "dense", "sparse"],
         rope_parameters={kind: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}
                          for kind, theta in (("full_attention", 1e5), ("sliding_attention", 100.0))}),
    lora_targets=["q_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"mimo_v2_flash": MIMO, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MIMO.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    MIMO.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MIMO.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    MIMO.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (per expert, the sliding layers' sinks as
    attention_sink_bias, the router's correction bias) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
            "model.layers.2.self_attn.attention_sink_bias"} <= saved  # fmt: skip
    assert not any(".sinks" in k for k in saved)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes (the sliding layers' doubled KV heads and sinks, the value width); the
    layers' kinds from mlp_layer_types; the KV cache one width per layer; config.json round-trips."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    sliding = [t == "sliding_attention" for t in model.config.layer_types]
    if name == "mimo_v2_flash":
        assert kinds == ["GatedMLP", "SparseMoeBlock", "SparseMoeBlock"] and sliding == [False, True, True]
        assert model.attention_shapes() == [(1, 24), (2, 24), (2, 24)]
    else:
        assert kinds == ["SparseMoeBlock", "GatedMLP", "SparseMoeBlock"] and sliding == [True, False, True]
        assert model.attention_shapes() == [(2, 24), (1, 24), (2, 24)]
    for layer, swa in zip(model.model.layers, sliding, strict=True):
        assert hasattr(layer.self_attn, "sinks") == swa
        assert layer.self_attn.sliding_window == (5 if swa else None)


def test_hub_config_spelling_and_mtp_tensors(tmp_path_factory, tmp_path):
    """The Hub's config.json spelling (sliding_window_size one less than the window, routed_scaling_factor null)
    and its next-token-prediction tensors (model.mtp.*, skipped): the same logits; saved back as read."""
    from safetensors.torch import load_file, save_file

    directory, hf = MIMO.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    d = json.loads(path.read_text())
    d.pop("sliding_window")
    d.update(sliding_window_size=4, routed_scaling_factor=None)
    path.write_text(json.dumps(d))
    tensors = load_file(f"{directory}/model.safetensors")
    tensors["model.mtp.layers.0.enorm.weight"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (model.config.sliding_window, model.config.routed_scaling_factor) == (5, 1.0)
    same_logits(model, hf)


def test_default_config_is_transformers():
    """MiMoV2FlashConfig holds transformers' defaults (layer_types, mlp_layer_types and the RoPE by layer type
    derived alike)."""
    import transformers

    check_config_defaults(MiMoV2FlashConfig)
    theirs = json.loads(transformers.MiMoV2FlashConfig().to_json_string())
    theirs.pop("transformers_version")
    assert MiMoV2FlashConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(n_routed_experts=8, n_group=3), "n_group"),
        (dict(v_head_dim=0), "v_head_dim"),
        (dict(attention_value_scale="x"), "attention_value_scale"),
        (dict(num_hidden_layers=2, mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(num_hidden_layers=2, layer_types=["full_attention", "local"]), "layer_types"),
        (dict(rope_parameters={"full_attention": {"rope_theta": 1.0}}), "rope_parameters"),
        (
            dict(
                rope_parameters={
                    k: {"rope_theta": 1.0, "partial_rotary_factor": 0.001}
                    for k in ("full_attention", "sliding_attention")
                }
            ),
            "partial_rotary_factor",
        ),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        MiMoV2FlashConfig.from_dict({"model_type": "mimo_v2_flash", **bad})


# GGUF: llama.cpp's "mimo2"


def _hub_config(c) -> dict:
    """The Hub's config.json keys MimoV2Model's converter reads, of transformers' config `c`."""
    rope = c.rope_parameters
    return dict(hybrid_layer_pattern=[int(t == "sliding_attention") for t in c.layer_types],
                swa_num_key_value_heads=2 * c.num_key_value_heads, sliding_window=c.sliding_window,
                rope_theta=rope["full_attention"]["rope_theta"], swa_rope_theta=rope["sliding_attention"]["rope_theta"],
                partial_rotary_factor=rope["full_attention"]["partial_rotary_factor"], layernorm_epsilon=c.rms_norm_eps,
                scoring_func="sigmoid", topk_method="noaux_tc")  # fmt: skip


def write_mimo_gguf(hf, path: str, mtp_tensors: bool = False, nextn: int = 3) -> None:
    """The GGUF llama.cpp's MimoV2Model converter makes of `hf` (--outtype f32) from the Hub's config.json spelling:
    TextModel's keys (block_count with its 3 next-token-prediction blocks, the sliding layers' RoPE base, the
    experts' groups, the sigmoid gating), then the KV heads per block (sliding ones for the 3 blocks too), the
    window and flags, the value head size, the rotary dimensions, the epsilon, the value scale, nextn_predict_layers;
    tensors by gguf-py's map (attention_sink_bias + ".weight", e_score_correction_bias as exp_probs_b.bias), the
    experts stacked. `mtp_tensors`: a next-token-prediction block's first tensors too (the Hub's model.mtp.*);
    `nextn` 0: as --no-mtp writes it."""
    import gguf
    from gguf_mimic import add_toy_vocab, stacked_experts
    from safetensors.torch import load_file

    c, hp = hf.config, _hub_config(hf.config)
    n = c.num_hidden_layers
    hybrid = hp["hybrid_layer_pattern"] + [1] * nextn
    w = gguf.GGUFWriter(path, "mimo2")
    w.add_block_count(n + nextn)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_rope_freq_base_swa(hp["swa_rope_theta"])
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_head_count_kv([hp["swa_num_key_value_heads"] if s else c.num_key_value_heads for s in hybrid])
    w.add_sliding_window(hp["sliding_window"])
    w.add_sliding_window_pattern(hybrid)
    w.add_value_length(c.v_head_dim)  # the converter's TextModel keys wrote head_dim first; it overwrites
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_rope_dimension_count(int(c.head_dim * hp["partial_rotary_factor"]))
    w.add_layer_norm_rms_eps(hp["layernorm_epsilon"])
    if c.attention_value_scale is not None:
        w.add_float32("mimo2.attention.value_scale", float(c.attention_value_scale))
    if nextn:
        w.add_nextn_predict_layers(nextn)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MIMO2, n + nextn)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.n_routed_experts):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if "attention_sink" in name and not name.endswith(".weight"):
            name += ".weight"
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")),
                     np.ascontiguousarray(t.float().numpy()))  # fmt: skip
    if mtp_tensors:  # the converter's model.mtp.layers.0.* as block n: its own names, then the layer's
        w.add_tensor(f"blk.{n}.nextn.enorm.weight", np.ones(c.hidden_size, np.float32))
        w.add_tensor(f"blk.{n}.attn_norm.weight", np.ones(c.hidden_size, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_converters_file(tmp_path_factory, tmp_path):
    """The converter's file (next-token-prediction blocks counted and one present, not loaded) loads as
    MiMoV2FlashForCausalLM with transformers' logits and config (layer kinds by the flags and routers, KV heads,
    head sizes, partial RoPE with a base per kind, the value scale); llama.cpp runs it with close logits."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    _, hf = MIMO.checkpoint(tmp_path_factory)
    write_mimo_gguf(hf, str(tmp_path / "mtp.gguf"), mtp_tensors=True)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="mtp.gguf")
    assert type(model).__name__ == "MiMoV2FlashForCausalLM"
    c, want = model.config, hf.config
    for f in ("num_hidden_layers", "layer_types", "mlp_layer_types", "num_key_value_heads", "head_dim",
              "v_head_dim", "sliding_window", "n_routed_experts", "moe_intermediate_size", "n_group"):  # fmt: skip
        assert getattr(c, f) == getattr(want, f), f
    assert c.attention_value_scale == pytest.approx(0.707)
    assert {k: r["rope_theta"] for k, r in c.rope_parameters.items()} == {"full_attention": 5e6,
                                                                          "sliding_attention": 1e4}  # fmt: skip
    with torch.no_grad():
        ours, theirs = model(ROW).logits[0], hf(ROW).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    same_logits(model, hf)
    path = str(tmp_path / "model.gguf")
    write_mimo_gguf(hf, path)
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_out_reads_back_and_runs_in_llama_cpp(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """autolm's GGUF out (the converter's keys without next-token-prediction blocks) reads back as the same model;
    llama.cpp runs it with autolm's logits."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(MIMO.checkpoint(tmp_path_factory)[0])
    path = save_gguf(model, merged_tokenizer, str(tmp_path / "m.gguf"), "f32")
    g = GGUFFile(path)
    assert g.get("attention.head_count_kv") == [1, 2, 2] and g.get("rope.dimension_count") == 8
    assert g.get("attention.sliding_window_pattern") == [0, 1, 1] and g.get("attention.value_length") == 16
    assert "blk.1.attn_sinks.weight" in {t.name for t in g.tensors}
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    for f in ("layer_types", "mlp_layer_types", "num_key_value_heads", "sliding_window", "v_head_dim"):
        assert getattr(back.config, f) == getattr(model.config, f), f
    rope = back.config.rope_parameters
    assert {k: r["rope_theta"] for k, r in rope.items()} == {"full_attention": 5e6, "sliding_attention": 1e4}
    assert back.config.attention_value_scale == pytest.approx(0.707)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, want, atol=1e-5, rtol=1e-5)
        ours = model(ROW).logits[0]
    _close_to_llama_cpp(ours, llama_cpp_logits(path))


def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """The variant (no renormalisation, a routed scaling, a tied head) and differing rotary dimensions per layer
    kind: a ConfigError naming the fields, no file. GGUF in: sliding layers' KV heads other than twice the full
    layers' are refused."""
    from autolm.gguf_writer import save_gguf
    from autolm.models.mimo_v2_flash import _gguf_derive

    model = autolm.AutoModelForCausalLM.from_pretrained(VARIANT.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="tie_word_embeddings") as e:
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert "norm_topk_prob" in str(e.value) and "routed_scaling_factor" in str(e.value)
    directory, _ = MIMO.checkpoint(tmp_path_factory)
    rope = {k: {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": p}
            for k, p in (("full_attention", 0.5), ("sliding_attention", 0.334))}  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, rope_parameters=rope)
    with pytest.raises(autolm.ConfigError, match="partial_rotary_factor"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
    keys = {
        "attention.sliding_window_pattern": [0, 1],
        "attention.key_length": 8,
        "attention.value_length": 8,
    }
    d = {"num_hidden_layers": 2, "num_key_value_heads": [2, 2], "rope_parameters": {"rope_theta": 1.0}}
    with pytest.raises(autolm.ConfigError, match="twice"):
        _gguf_derive(d, lambda k, default=None: keys.get(k, default))
