"""GLM-4.7-Flash (glm4_moe_lite) against transformers and peft: DeepSeek-V3's Multi-head Latent Attention (the
low-rank query and without it, RoPE over interleaved pairs and rotate-half, YaRN with mscale_all_dim) with GLM-4.5's
sigmoid-routed experts in groups (correction bias, renormalised, scaled) and the shared expert, the dense layers
where mlp_layer_types says (not only leading ones). The standard battery, config.json as transformers writes it,
the next-token-prediction layer skipped, the CLI, the config values refused. GGUF as llama.cpp's Glm4MoeLiteModel
converter writes it (deepseek2, DeepSeek-V3's layout, no gating function), in and out, on a checkpoint of
GLM-4.7-Flash's shape (47 layers, 154880 tokens), the only one llama.cpp routes with the sigmoid."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions, randomize
from family_checks import Family
from gguf_mimic import add_mla_lengths
from gguf_moe import mla_pieces
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    mlp_layer_types=["dense", "sparse", "dense"],
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=1,
    routed_scaling_factor=1.8,
    max_position_embeddings=64,
)
# peft has no default target modules for glm4_moe_lite
_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
FLASH = Family("Glm4MoeLiteConfig", SIZES, lora_targets=_TARGETS)
# no low-rank query, rotate-half RoPE, attention biases, v wider than q/k, no renormalisation, YaRN
PLAIN_Q = Family(
    "Glm4MoeLiteConfig",
    dict(SIZES, q_lora_rank=None, rope_interleave=False, attention_bias=True, v_head_dim=32, norm_topk_prob=False,
         mlp_layer_types=["sparse", "dense", "sparse"], max_position_embeddings=256,
         rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1,
                           original_max_position_embeddings=64)),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"flash": FLASH, "plain_q": PLAIN_Q}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    FLASH.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    FLASH.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FLASH.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict (the dense layer after a sparse one); the checkpoint's
    per-expert tensors and transformers' config.json (keys and values) in the files autolm saves."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    sparse = 1 if name == "flash" else 2
    assert f"model.layers.{sparse}.mlp.experts.7.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    FLASH.check_disk_offload(tmp_path_factory, tmp_path)


def test_nextn_layer_is_skipped(tmp_path_factory, tmp_path, caplog):
    """GLM-4.7-Flash's next-token-prediction layer (model.layers.47; or num_nextn_predict_layers past the last
    layer) is skipped on load without a word; config.json's first_k_dense_replace and num_nextn_predict_layers
    (not transformers' fields) are kept on saving."""
    from safetensors.torch import load_file, save_file

    directory, _ = FLASH.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "mtp")
    path = tmp_path / "mtp" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.47.enorm.weight"] = torch.ones(64)
    tensors["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    config.update(num_nextn_predict_layers=1, first_k_dense_replace=1)
    (tmp_path / "mtp" / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="autolm"):
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert len(model.model.layers) == 3 and "deeper layers" not in caplog.text
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1 and saved["first_k_dense_replace"] == 1


def test_default_config_is_transformers():
    """Glm4MoeLiteConfig() holds transformers' defaults (GLM-4.7-Flash's sizes, mlp_layer_types derived);
    initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.glm4_moe_lite import Glm4MoeLiteConfig

    theirs = json.loads(transformers.Glm4MoeLiteConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert Glm4MoeLiteConfig().to_dict() == theirs


def test_cli(tmp_path_factory, tmp_path):
    """DeepSeek-V3's chat template (GLM-4.7-Flash's is not among the test templates)."""
    long = Family(FLASH.config_cls, dict(SIZES, max_position_embeddings=2048), lora_targets=["q_b_proj"])
    check_cli(long, "deepseek-v3.jinja", tmp_path_factory, tmp_path, "Glm4MoeLiteForCausalLM (glm4_moe_lite)")


def test_config_errors_name_the_key():
    from autolm.models.glm4_moe_lite import Glm4MoeLiteConfig

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, n_routed_experts=8,
                 n_group=2, topk_group=1, num_experts_per_tok=2)  # fmt: skip
    Glm4MoeLiteConfig(**small)
    for key, bad in (
        ("mlp_layer_types", ["dense"]),
        ("mlp_layer_types", ["dense", "moe"]),
        ("q_lora_rank", 0),
        ("kv_lora_rank", None),
        ("qk_rope_head_dim", 7),
        ("num_key_value_heads", 2),
        ("num_experts_per_tok", 9),
        ("n_group", 3),
        ("routed_scaling_factor", 0),
        ("rope_interleave", "yes"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            Glm4MoeLiteConfig.from_dict({**small, key: bad})
    with pytest.raises(autolm.ConfigError, match="partial_rotary_factor"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        Glm4MoeLiteConfig.from_dict({**small, "rope_parameters": rope})


# ---- GGUF: llama.cpp's Glm4MoeLiteModel converter, emulated ------------------------------------------------------

# GLM-4.7-Flash's shape (llama.cpp routes a deepseek2 file without expert_gating_func with the sigmoid only for it),
# tiny otherwise: 47 layers (the first dense), 154880 tokens, tied embeddings
GGUF_SIZES = dict(hidden_size=32, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=47,
                  first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                  n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.8, vocab_size=154880,
                  max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)  # fmt: skip
_GGUF: dict = {}


def gguf_checkpoint(tmp_path_factory):
    """(directory, transformers' model) of GGUF_SIZES, made once per session."""
    import transformers

    if not _GGUF:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.Glm4MoeLiteConfig(**GGUF_SIZES))
        randomize(model)
        with torch.no_grad():  # 47 random layers: their outputs damped, so that rounding does not snowball
            for name, p in model.named_parameters():
                if "o_proj" in name or "down_proj" in name:
                    p.mul_(0.2)
        d = str(tmp_path_factory.mktemp("glm4_moe_lite_gguf"))
        model.save_pretrained(d)
        _GGUF["ckpt"] = (
            d,
            transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval(),
        )
    return _GGUF["ckpt"]


GGUF_FAMILY = SimpleNamespace(checkpoint=gguf_checkpoint)  # for test_gguf_out's round trip, as a Family


def write_glm4_moe_lite_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's Glm4MoeLiteModel converter (conversion/glm.py, DeepseekV2Model's) makes of transformers'
    GLM-4.7-Flash `hf`, from config.json and the checkpoint as it reads them: TextModel's metadata with MLA as MQA,
    the latent's key / value lengths, DeepseekV2Model's keys (leading_dense_block_count from config.json's
    first_k_dense_replace, 0 without it; no expert_gating_func: config.json names no scoring function), the block
    count with num_nextn_predict_layers (none here); the experts stacked, kv_b_proj split per head into attn_k_b
    (transposed) and attn_v_b, the correction bias as exp_probs_b.bias, the tied head not written; a vocabulary of
    vocab_size tokens. `kind` "Q8_0" quantizes the matrices whose rows are whole blocks."""
    import gguf
    from gguf_mimic import stacked_experts
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    nextn = c.get("num_nextn_predict_layers", 0)
    blocks = c["num_hidden_layers"] + nextn
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(blocks)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_leading_dense_block_count(c.get("first_k_dense_replace", 0))
    w.add_vocab_size(c["vocab_size"])
    w.add_q_lora_rank(c["q_lora_rank"])
    add_mla_lengths(w, c)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    if nextn:
        w.add_nextn_predict_layers(nextn)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, c["vocab_size"]))])
    w.add_token_scores([0.0] * c["vocab_size"])
    w.add_token_types([3, 3, 3] + [1] * (c["vocab_size"] - 3))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, blocks)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for name, t in stacked_experts(tensors, ".mlp.experts.", c["n_routed_experts"]):
        if name == "lm_head.weight" and c["tie_word_embeddings"]:
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        for piece, value in mla_pieces(name, t, heads, nope):
            base, suffix = piece.rsplit(".", 1)
            new, data = f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(value.float().numpy())
            quantized = data.ndim >= 2 and data.shape[-1] % 32 == 0 and "ffn_gate_inp" not in new
            if kind != "F32" and quantized and new.startswith("blk."):
                qtype = gguf.GGMLQuantizationType[kind]
                w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file (no gating function) loads as Glm4MoeLiteForCausalLM, not DeepSeek-V2 or V3, with the
    sigmoid routing, the leading dense layer and transformers' logits; Q8_0 in its own blocks: close."""
    _, hf = gguf_checkpoint(tmp_path_factory)
    write_glm4_moe_lite_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM"
    assert model.config.mlp_layer_types == hf.config.mlp_layer_types and model.config.norm_topk_prob
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        got = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        write_glm4_moe_lite_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask, position_ids=positions(mask)).logits[real].float()
        plain = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf")  # dequantized
        dequantized = plain(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    # 47 layers routing top-2 of 4 experts: Q8_0's rounding changes some tokens' experts (the dequantized weights
    # alone move the logits by ~14% of their mean size here), so the bound is loose; a wrong layout is far off
    assert (got - dequantized).abs().mean() <= 0.2 * dequantized.abs().mean()
    assert (got - want).abs().mean() <= 0.25 * want.abs().mean()


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path):
    """FLASH (3 layers, a dense layer after a mixture), and GLM-4.7-Flash's shape with rotate-half RoPE or 46
    layers (which llama.cpp would route with the softmax) are refused, naming the field; no file is written."""
    from test_gguf_out import byte_tokenizer

    from autolm.gguf_writer import save_gguf

    tok = byte_tokenizer.__wrapped__(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(FLASH.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="mlp_layer_types"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    directory, _ = gguf_checkpoint(tmp_path_factory)
    for change, field in ((dict(rope_interleave=False), "rope_interleave"),
                          (dict(num_hidden_layers=46), "num_hidden_layers 46.*softmax")):  # fmt: skip
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, **change)
        with pytest.raises(autolm.ConfigError, match=field):
            save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert list(tmp_path.iterdir()) == []
