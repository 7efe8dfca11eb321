"""DeepSeek-V3 (DeepSeek-V3/R1, Kimi K2, Moonlight) against transformers and peft: Multi-head Latent Attention with
the low-rank query (q_a_proj, q_a_layernorm, q_b_proj) and without it (q_proj), the compressed KV latent and the
shared rotary key, RoPE over interleaved pairs and rotate-half, v_head_dim below and above the q/k head width (the
zero padding of v, or of q and k), YaRN with mscale_all_dim (the score scale and the tables' factor); a dense first
layer, then sigmoid-routed experts in 2 groups (1 chosen) with the correction bias, 2 per token, renormalised and
scaled, plus the shared expert. The standard battery, config.json as transformers writes it (and as DeepSeek-V3
ships it), the multi-token prediction layer skipped, GGUF as llama.cpp's DeepseekV2Model converter writes it (in and
out; kv_b_proj split into attn_k_b / attn_v_b), the CLI with DeepSeek-V3's chat template, the config values refused."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_mla_lengths, add_toy_vocab, stacked_experts
from gguf_moe import mla_pieces
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
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
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
)
# peft has no default target modules for deepseek_v3
_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
DSV3 = Family("DeepseekV3Config", SIZES, lora_targets=_TARGETS)
# no low-rank query (q_proj), rotate-half RoPE, biases on q_a / kv_a / o, v wider than q/k (32 > 24: q, k padded)
PLAIN_Q = Family(
    "DeepseekV3Config",
    dict(
        SIZES,
        q_lora_rank=None,
        rope_interleave=False,
        attention_bias=True,
        v_head_dim=32,
        norm_topk_prob=False,
    ),
    lora_targets=_TARGETS,
)
# YaRN (DeepSeek-V3 ships it): mscale / mscale_all_dim give the tables a factor and the scores mscale squared
YARN = Family(
    "DeepseekV3Config",
    dict(SIZES, max_position_embeddings=256,
         rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1,
                           original_max_position_embeddings=64)),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"dsv3": DSV3, "plain_q": PLAIN_Q, "yarn": YARN}
# what llama.cpp's deepseek2 runs: DeepSeek-V3's config.json names sigmoid scoring (the converter writes the gating
# function only then); YaRN with mscale == mscale_all_dim, as DeepSeek-V3 ships it
GGUF_FAMILIES = {
    "dsv3": Family("DeepseekV3Config", dict(SIZES, scoring_func="sigmoid")),
    "plain_q_yarn": Family(
        "DeepseekV3Config",
        dict(SIZES, q_lora_rank=None, norm_topk_prob=False, scoring_func="sigmoid", max_position_embeddings=256,
             num_hidden_layers=26, first_k_dense_replace=24,  # Moonlight's depth (test_family_deepseek_v2.LITE26)
             rope_scaling=dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1,
                               original_max_position_embeddings=64)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DSV3.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", ["dsv3", "plain_q"])
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["dsv3", "plain_q"])
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DSV3.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict; the checkpoint's per-expert tensors and transformers'
    config.json (keys and values) in the files autolm saves."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    DSV3.check_disk_offload(tmp_path_factory, tmp_path)


# ---- MLA specifics ------------------------------------------------------------------------------------------------


def test_attention_shape_and_scale(tmp_path_factory):
    """The KV cache holds every head at max(qk_head_dim, v_head_dim); the score scale is transformers' (YaRN's
    mscale_all_dim squared on qk_head_dim ** -0.5), which differs from the plain scale in the YaRN checkpoint."""
    for name, want in (("dsv3", (4, 24)), ("plain_q", (4, 32)), ("yarn", (4, 24))):
        directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert model.attention_shapes()[0] == want
        ours, theirs = model.model.layers[1].self_attn.scaling, hf.model.layers[1].self_attn.scaling
        assert ours == pytest.approx(theirs, rel=1e-12)
        assert (ours != pytest.approx(24**-0.5)) == (name == "yarn")


def test_mtp_layer_is_skipped(tmp_path_factory, tmp_path, caplog):
    """DeepSeek-V3's files carry its multi-token prediction layer as model.layers.61: skipped on load without a
    word, as transformers skips it; other layers past num_hidden_layers are skipped with the loader's warning."""
    from safetensors.torch import load_file, save_file

    directory, _ = DSV3.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "mtp")
    path = tmp_path / "mtp" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.61.enorm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="autolm"):
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert len(model.model.layers) == 3 and "deeper layers" not in caplog.text
    tensors["model.layers.7.enorm.weight"] = torch.ones(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="autolm"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert "deeper layers were not loaded" in caplog.text


# ---- GGUF: llama.cpp's DeepseekV2Model converter, emulated ------------------------------------------------------


def write_deepseek_v3_gguf(
    hf, path: str, arch: str = "deepseek2", names_of: str = "DEEPSEEK2", extra=None
) -> None:
    """The GGUF llama.cpp's converter (DeepseekV2Model, --outtype f32) makes of transformers' DeepSeek-V3 `hf`, from
    the checkpoint files as it reads them: TextModel's metadata with num_key_value_heads 1 (MLA as MQA), the key /
    value lengths of the latent, then its own keys; the experts stacked, kv_b_proj split per head into attn_k_b
    (transposed) and attn_v_b, e_score_correction_bias as exp_probs_b.bias, the rest by gguf-py's name map.
    A subclass of that converter: its `arch`, the gguf-py MODEL_ARCH naming its tensors, `extra(writer, config.json)`
    writing its own keys."""
    import gguf
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope = c["rope_parameters"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)
    if rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(c["first_k_dense_replace"])
    w.add_vocab_size(c["vocab_size"])
    if c["q_lora_rank"] is not None:
        w.add_q_lora_rank(c["q_lora_rank"])
    add_mla_lengths(w, c)
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    if c["norm_topk_prob"]:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    if rope.get("mscale_all_dim") is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    if extra is not None:
        extra(w, c)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, names_of), c["num_hidden_layers"])
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for name, t in stacked_experts(tensors, ".mlp.experts.", c["n_routed_experts"]):
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        for piece, value in mla_pieces(name, t, heads, nope):
            base, kind = piece.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return _byte_tokenizer(tmp_path_factory.mktemp("dsv3") / "tokenizer")


# llama.cpp's attn_k_b / attn_v_b are assembled into kv_b_proj by the family's checkpoint rule (GGUFMla)
@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as DeepseekV3ForCausalLM with transformers' logits."""
    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_deepseek_v3_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "refused"), [("dsv3", "expert_gating_func"), ("plain_q", "rope_interleave"), ("yarn", "RoPE")]
)
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, name, refused):
    """What llama.cpp's deepseek2 cannot run is refused, naming it: no scoring_func in config.json (llama.cpp would
    route with softmax), rotate-half RoPE (and attention biases), YaRN with mscale != mscale_all_dim (llama.cpp
    leaves the tables unscaled)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FAMILIES[name].checkpoint(tmp_path_factory)[0])
    if name != "dsv3":
        model.config.extra["scoring_func"] = "sigmoid"
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


# ---- config ------------------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """DeepseekV3Config() holds transformers' defaults (DeepSeek-V3's sizes, head_dim = qk_rope_head_dim,
    qk_head_dim written); initializer_range and pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.deepseek_v3 import DeepseekV3Config

    theirs = json.loads(transformers.DeepseekV3Config().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert DeepseekV3Config().to_dict() == theirs


def test_cli(tmp_path_factory, tmp_path):
    """DeepSeek-V3's chat template (its tokenizer_config.json)."""
    long = Family(DSV3.config_cls, dict(SIZES, max_position_embeddings=2048), lora_targets=["q_b_proj"])
    check_cli(long, "deepseek-v3.jinja", tmp_path_factory, tmp_path, "DeepseekV3ForCausalLM (deepseek_v3)")


def test_config_errors_name_the_key():
    from autolm.models.deepseek_v3 import DeepseekV3Config

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2,
                 topk_group=1, num_experts_per_tok=2)  # fmt: skip
    DeepseekV3Config(**small)
    for key, bad in (
        ("q_lora_rank", 0),
        ("kv_lora_rank", None),
        ("qk_rope_head_dim", 7),
        ("qk_nope_head_dim", "16"),
        ("v_head_dim", -1),
        ("moe_intermediate_size", 0),
        ("n_shared_experts", 0),
        ("num_key_value_heads", 2),
        ("num_experts_per_tok", 9),
        ("n_group", 3),
        ("topk_group", 3),
        ("first_k_dense_replace", -1),
        ("routed_scaling_factor", 0),
        ("num_nextn_predict_layers", -1),
        ("rope_interleave", "yes"),
        ("norm_topk_prob", None),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            DeepseekV3Config.from_dict({**small, key: bad})
    with pytest.raises(autolm.ConfigError, match="num_experts_per_tok"):
        DeepseekV3Config(**{**small, "num_experts_per_tok": 5})  # more than the chosen group holds


def test_config_reads_deepseek_v3_json(tmp_path_factory, tmp_path):
    """DeepSeek-V3's config.json spelling (rope_scaling with "type": "yarn", rope_theta at the top level, its
    own keys kept) loads with transformers' logits and saves back in that spelling."""
    src, hf = YARN.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    rope.pop("rope_type")
    theta = rope.pop("rope_theta")
    d.update(rope_theta=theta, rope_scaling=rope, topk_method="noaux_tc", scoring_func="sigmoid")
    path.write_text(json.dumps(d))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "v4")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["rope_scaling"]["rope_type"] == "yarn" and saved["rope_theta"] == theta
    assert saved["topk_method"] == "noaux_tc" and "rope_parameters" not in saved
    assert os.path.exists(tmp_path / "saved" / "model.safetensors")
