"""DeepSeek-V2 (V2, V2-Lite, Coder-V2) against transformers and peft: MLA with the complex-number (interleaved) RoPE,
with and without the low-rank query, YaRN with mscale_all_dim; a dense first layer, then softmax-routed experts,
greedy (no renormalisation, norm_topk_prob ignored as transformers does) and group-limited (the best single
probability of each group), scaled by routed_scaling_factor, plus the shared experts; biases on the dense and shared
MLPs (mlp_bias). The standard battery, config.json as transformers writes it, GGUF as llama.cpp's DeepseekV2Model
converter writes it (in and out), what llama.cpp's deepseek2 cannot run refused, the config values refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from family_checks import Family, same_logits
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
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    routed_scaling_factor=1.5,
    max_position_embeddings=64,
)
# peft has no default target modules for deepseek_v2
_TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
# V2-Lite's shape: plain q_proj, greedy routing, n_group / topk_group 1
LITE = Family(
    "DeepseekV2Config", dict(SIZES, n_group=1, topk_group=1, scoring_func="softmax"), lora_targets=_TARGETS
)
# V2's: the low-rank query, 2 groups of which 1 competes (by their best probability), YaRN as DeepSeek-V2 ships it
GROUPED = Family(
    "DeepseekV2Config",
    dict(SIZES, q_lora_rank=32, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=16.0,
         max_position_embeddings=256,
         rope_scaling=dict(type="yarn", factor=4.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
                           original_max_position_embeddings=64)),
    lora_targets=_TARGETS,
)  # fmt: skip
# biases on q_a / kv_a / o and the dense and shared MLPs, v wider than q/k (32 > 24: q, k padded), norm_topk_prob
# (ignored), n_group given to greedy routing (ignored)
BIASES = Family(
    "DeepseekV2Config",
    dict(SIZES, q_lora_rank=32, attention_bias=True, mlp_bias=True, v_head_dim=32, norm_topk_prob=True, n_group=4,
         topk_group=1),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"lite": LITE, "grouped": GROUPED, "biases": BIASES}
# V2-Lite's depth: llama.cpp's deepseek2 projects q without a low rank only in 26- or 27-layer models (most of them
# dense here: a random router's near-ties, in 25 layers, tip some token to other experts under float16 rounding)
LITE26 = Family(LITE.config_cls, dict(LITE.kwargs, num_hidden_layers=26, first_k_dense_replace=24),
                lora_targets=_TARGETS)  # fmt: skip
# what llama.cpp's deepseek2 runs: no groups that limit the choice, no renormalisation, no MLP biases
GGUF_FAMILIES = {
    "lite": LITE26,
    "q_lora_yarn": Family(
        "DeepseekV2Config",
        dict(SIZES, q_lora_rank=32, attention_bias=False, max_position_embeddings=256,
             rope_scaling=dict(type="yarn", factor=4.0, mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
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
    GROUPED.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", ["lite", "grouped"])
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["lite", "biases"])
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GROUPED.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict; the checkpoint's per-expert tensors and transformers'
    config.json (keys and values) in the files autolm saves."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.2.mlp.experts.7.gate_proj.weight" in saved


def test_disk_offload(tmp_path_factory, tmp_path):
    GROUPED.check_disk_offload(tmp_path_factory, tmp_path)


def test_router_is_transformers(tmp_path_factory):
    """The grouped router picks transformers' experts with its weights, and the groups change the choice."""
    _, hf = GROUPED.checkpoint(tmp_path_factory)
    directory, _ = GROUPED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    ids, weights = model.model.layers[1].mlp.gate(x)
    _, their_weights, their_ids = hf.model.layers[1].mlp.gate(x)
    order, their_order = ids.sort(dim=-1), their_ids.sort(dim=-1)
    assert torch.equal(order.values, their_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices), their_weights.gather(1, their_order.indices))
    gate = model.model.layers[1].mlp.gate
    gate.n_group = 1
    assert not torch.equal(gate(x)[0].sort(dim=-1).values, order.values)


# ---- GGUF: llama.cpp's DeepseekV2Model converter, emulated ------------------------------------------------------


def write_deepseek_v2_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (DeepseekV2Model, --outtype f32) makes of transformers' DeepSeek-V2 `hf`: as
    for DeepSeek-V3 (test_family_deepseek_v3.write_deepseek_v3_gguf) but the group keys only where config.json
    gives them, a gating function only where it names scoring_func, no router bias."""
    import gguf
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope = c["rope_parameters"]
    w = gguf.GGUFWriter(path, "deepseek2")
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
    if c.get("n_group") is not None:
        w.add_expert_group_count(c["n_group"])
    if c.get("topk_group") is not None:
        w.add_expert_group_used_count(c["topk_group"])
    if c.get("scoring_func") == "softmax":
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
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
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, c["num_hidden_layers"])
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for name, t in stacked_experts(tensors, ".mlp.experts.", c["n_routed_experts"]):
        for piece, value in mla_pieces(name, t, heads, nope):
            base, kind = piece.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return _byte_tokenizer(tmp_path_factory.mktemp("dsv2") / "tokenizer")


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as DeepseekV2ForCausalLM (not DeepSeek-V3, which shares llama.cpp's deepseek2)
    with transformers' logits; a file of DeepSeek-V3 (its sigmoid gating function) still loads as DeepSeek-V3."""
    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_deepseek_v2_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert model.config.topk_method == "greedy"
    same_logits(model, hf)
    from test_family_deepseek_v3 import GGUF_FAMILIES as V3
    from test_family_deepseek_v3 import write_deepseek_v3_gguf

    _, v3 = V3["dsv3"].checkpoint(tmp_path_factory)
    write_deepseek_v3_gguf(v3, str(tmp_path / "v3.gguf"))
    assert type(autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="v3.gguf")).__name__ == (
        "DeepseekV3ForCausalLM"
    )


def test_gguf_out(tmp_path_factory, tmp_path, byte_tokenizer):
    """save_gguf's file loads back as DeepSeek-V2 with the model's logits."""
    from autolm.gguf_writer import save_gguf

    for i, family in enumerate(GGUF_FAMILIES.values()):
        directory, hf = family.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        save_gguf(model, byte_tokenizer, str(tmp_path / f"m{i}.gguf"), "f32")
        back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m{i}.gguf")
        assert type(back).__name__ == "DeepseekV2ForCausalLM"
        same_logits(back, hf)


@pytest.mark.parametrize(
    ("name", "change", "refused"),
    [
        ("grouped", {}, "topk_group"),
        ("biases", {"norm_topk_prob": False, "n_group": None, "topk_group": None}, "mlp_bias"),
        ("lite", {"norm_topk_prob": True}, "norm_topk_prob"),
        ("lite", {"n_group": 4, "topk_group": 2}, "topk_group"),
        ("lite", {"scoring_func": "sigmoid"}, "scoring_func"),
        ("shallow_lite", {}, "q_lora_rank"),
    ],
)
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, name, change, refused):
    """What llama.cpp's deepseek2 cannot run is refused, naming it: groups that limit the choice (llama.cpp ranks
    them by their two best scores' sum, and applies them to greedy routing too), MLP biases, norm_topk_prob
    (llama.cpp would renormalise), a sigmoid scoring_func, a plain q projection in a model of a depth where
    llama.cpp reads a low-rank one."""
    from autolm.gguf_writer import save_gguf

    family = {**FAMILIES, "lite": LITE26, "shallow_lite": LITE}[name]
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        if key == "scoring_func":
            model.config.extra[key] = value
        else:
            setattr(model.config, key, value)
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


# ---- config ------------------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """DeepseekV2Config() holds transformers' defaults (but num_experts_per_tok, null there); initializer_range and
    pretraining_tp, kept only where given, aside."""
    import transformers

    from autolm.models.deepseek_v2 import DeepseekV2Config

    theirs = json.loads(transformers.DeepseekV2Config(num_experts_per_tok=6).to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert DeepseekV2Config().to_dict() == theirs


def test_cli(tmp_path_factory, tmp_path):
    """DeepSeek-V3's chat template (DeepSeek-V2's is not among the test templates; the same User/Assistant form)."""
    long = Family(LITE.config_cls, dict(SIZES, max_position_embeddings=2048), lora_targets=["q_proj"])
    check_cli(long, "deepseek-v3.jinja", tmp_path_factory, tmp_path, "DeepseekV2ForCausalLM (deepseek_v2)")


def test_config_errors_name_the_key():
    from autolm.models.deepseek_v2 import DeepseekV2Config

    small = dict(hidden_size=64, num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2)
    DeepseekV2Config(**small)
    DeepseekV2Config(**small, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    for key, bad in (
        ("topk_method", "noaux_tc"),
        ("n_group", 0),
        ("topk_group", "2"),
        ("mlp_bias", "no"),
        ("moe_layer_freq", 2),
        ("q_lora_rank", 0),
        ("kv_lora_rank", None),
        ("qk_rope_head_dim", 7),
        ("num_key_value_heads", 2),
        ("num_experts_per_tok", None),
        ("routed_scaling_factor", 0),
        ("first_k_dense_replace", -1),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            DeepseekV2Config.from_dict({**small, key: bad})
    grouped = {**small, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    for key, bad in (("n_group", None), ("n_group", 3), ("topk_group", 5)):
        with pytest.raises(autolm.ConfigError, match=key):
            DeepseekV2Config.from_dict({**grouped, key: bad})
