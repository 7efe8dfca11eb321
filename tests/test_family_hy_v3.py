"""Hunyuan v3 (Hy3) against transformers and peft: per-head q/k RMSNorms, GQA, head_dim 32 (twice hidden_size /
heads); a dense first layer then mixtures of 8 experts of which each token uses 2 (sigmoid scores steered by a
random `mlp.e_score_correction_bias`, the chosen plain scores renormalised and scaled by router_scaling_factor) with
one shared expert; and a variant with mlp_layer_types sparse/dense/sparse, two shared experts, another scaling, a
tied head and enable_moe_fp32_combine off. The checkpoint as transformers writes it (per-expert tensors,
mlp.router.gate, mlp.expert_bias, mlp.shared_mlp); the standard battery, GGUF as llama.cpp's HYV3Model converter writes
it (in; out in test_gguf_out, run by llama.cpp in test_gguf_llamacpp) and the config's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import padded_batch, positions
from family_checks import check_config_defaults
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_minimax_m2 import RoutedFamily
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm
from autolm.models.hy_v3 import HYV3Config

_SHAPE = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)  # fmt: skip
_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for hy_v3
HY = RoutedFamily("HYV3Config", dict(_SHAPE, num_hidden_layers=2), lora_targets=_LORA)
VARIANT = RoutedFamily(
    "HYV3Config",
    dict(_SHAPE, num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"], num_shared_experts=2,
         router_scaling_factor=0.7, tie_word_embeddings=True, enable_moe_fp32_combine=False,
         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    lora_targets=["q_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"hy_v3": HY, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    HY.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HY.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    HY.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HY.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    HY.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save; the files autolm saves hold the checkpoint's names (per expert, mlp.router.gate,
    mlp.expert_bias, mlp.shared_mlp) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.2.mlp.experts.7.up_proj.weight", "model.layers.2.mlp.router.gate.weight",
            "model.layers.2.mlp.expert_bias", "model.layers.2.mlp.shared_mlp.down_proj.weight"} <= saved or (
        name == "hy_v3")  # fmt: skip
    assert (
        name == "variant"
        or {"model.layers.1.mlp.expert_bias", "model.layers.0.mlp.gate_proj.weight"} <= saved
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; the layers' kinds from mlp_layer_types; the random correction biases loaded
    on the block (transformers' values), and they change the logits; config.json round-trips."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == (["GatedMLP", "HYV3MoE"] if name == "hy_v3" else ["HYV3MoE", "GatedMLP", "HYV3MoE"])
    attn = model.model.layers[0].self_attn
    assert (attn.q_norm.weight.shape, attn.k_norm.weight.shape) == ((32,), (32,))
    sparse = [i for i, k in enumerate(kinds) if k == "HYV3MoE"]
    for i in sparse:
        ours = model.model.layers[i].mlp.e_score_correction_bias
        assert ours.abs().min() > 0 and torch.equal(ours, hf.model.layers[i].mlp.e_score_correction_bias)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        for i in sparse:
            model.model.layers[i].mlp.e_score_correction_bias.zero_()
        after = model(ids, attention_mask=mask).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_multi_token_prediction_layer_is_skipped(tmp_path_factory, tmp_path):
    """The Hub's files hold a next-token-prediction layer (model.layers.<num_hidden_layers>.*): skipped, as
    transformers skips it; the logits stay."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = HY.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    tensors = load_file(f"{directory}/model.safetensors")
    tensors["model.layers.2.input_layernorm.weight"] = torch.ones(64)
    tensors["model.layers.2.mlp.router.gate.weight"] = torch.ones(8, 64)
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids, mask = padded_batch()
    real, pos = mask.bool(), positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- GGUF: llama.cpp's HYV3Model converter, emulated ----------------------------------------------------------------


def write_hy_v3_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' HY V3 `hf` (--outtype f32), from the checkpoint files:
    TextModel's keys (the experts' counts, the head size as key and value length), the experts' and shared experts'
    lengths, renormalised sigmoid routing and its scale; no q/k permutation; each layer's experts stacked, the rest
    (mlp.router.gate, mlp.expert_bias as bare exp_probs_b, mlp.shared_mlp) by gguf-py's map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    w = gguf.GGUFWriter(path, "hy_v3")
    add_text_model(w, c)
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(c.moe_intermediate_size * c.num_shared_experts)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(float(c.router_scaling_factor))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    add_toy_vocab(w)
    # the installed gguf-py predates MODEL_ARCH.HY_V3: AfMoE's map names the same tensors, but for its extra norm
    # after attention (llama.cpp's hy_v3 has none: post_attention_layernorm is its ffn_norm)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.AFMOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".mlp.experts.", c.num_experts):
        out = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert out is not None, name
        out = out.replace(".post_attention_norm.", ".ffn_norm.")
        w.add_tensor(out, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as HYV3ForCausalLM with transformers' logits (correction biases, the shared
    expert and the scale included)."""
    _, hf = HY.checkpoint(tmp_path_factory)
    write_hy_v3_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "HYV3ForCausalLM"
    c = model.config
    assert (c.head_dim, c.num_experts, c.num_shared_experts) == (32, 8, 1)
    assert c.router_scaling_factor == pytest.approx(2.826)
    ids, mask = padded_batch()
    real, pos = mask.bool(), positions(mask)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_gguf_out_refuses_other_mlp_layer_types(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """mlp_layer_types other than the default: refused by name (the file cannot say them)."""
    from autolm.gguf_writer import save_gguf

    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(autolm.ConfigError, match="mlp_layer_types"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")


def test_default_config_is_transformers():
    """HYV3Config holds transformers' defaults (its mlp_layer_types derived alike)."""
    import transformers

    check_config_defaults(HYV3Config)
    theirs = json.loads(transformers.HYV3Config().to_json_string())
    theirs.pop("transformers_version")
    assert HYV3Config().to_dict() == theirs


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts="8"), "experts"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(num_shared_experts=0), "num_shared_experts"),
        (dict(router_scaling_factor=-1), "router_scaling_factor"),
        (dict(num_hidden_layers=2, mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(enable_moe_fp32_combine="yes"), "enable_moe_fp32_combine"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    with pytest.raises(autolm.ConfigError, match=match):
        HYV3Config.from_dict({"model_type": "hy_v3", **bad})
