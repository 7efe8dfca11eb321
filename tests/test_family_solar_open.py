"""Solar Open against transformers and peft: Llama's attention (q/k/v biases, head_dim != hidden / heads, GQA, RoPE
over the whole head with base 1e6) and GLM-4.5's mixture in every layer: 8 experts in 2 groups (each token's experts
from the 1 best group; sigmoid scores steered by a random e_score_correction_bias, renormalised, scaled by
routed_scaling_factor) plus 2 shared experts, one tensor per expert on disk. The standard battery; config.json as
Solar-Open-100B's spells it (GLM-4.5's unused keys, partial_rotary_factor 1.0, transformers 4's RoPE keys), kept as
read and ignored as transformers ignores them; GGUF as llama.cpp's SolarOpenModel converter writes it (in; out in
tests/test_gguf_out.py, run by llama.cpp in tests/test_gguf_llamacpp.py)."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from conftest import padded_batch, positions
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_glm4_moe import (
    RoutedFamily,
    byte_tokenizer,  # noqa: F401
    check_gguf_in,
    check_gguf_out_refuses,
    write_tensors,
)

import autolm

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for solar_open
SOLAR = RoutedFamily("SolarOpenConfig", dict(SIZES, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                              attention_bias=True), lora_targets=TARGETS)  # fmt: skip
# as Solar-Open-100B's config.json spells it (GLM-4.5's keys it does not use, the factor 1.0, YaRN), and what
# llama.cpp's glm4moe runs: no groups, no biases (the top k not renormalised, which it honours)
HUB = RoutedFamily("SolarOpenConfig", dict(SIZES, head_dim=16, intermediate_size=96, first_k_dense_replace=0,
                                            use_qk_norm=False, norm_topk_prob=False,
                                            rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=2.0,
                                                                 original_max_position_embeddings=32,
                                                                 partial_rotary_factor=1.0)),
                    lora_targets=TARGETS)  # fmt: skip
FAMILIES = {"solar": SOLAR, "hub": HUB}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    SOLAR.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    SOLAR.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SOLAR.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SOLAR.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    SOLAR.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    SOLAR.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes; the checkpoint's per-expert tensors and config.json (keys and values: the
    Hub spelling's unused GLM-4.5 keys too) in the files autolm saves, which transformers loads with equal logits."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in saved
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in saved


def test_layers(tmp_path_factory):
    """Every layer a mixture with shared experts (no dense lead layer), Llama's attention (no q/k norms), RoPE
    over the whole head; the checkpoint's random correction biases loaded and kept in fp32 under bf16."""
    directory, hf = SOLAR.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for ours, theirs in zip(model.model.layers, hf.model.layers, strict=True):
        assert type(ours.mlp).__name__ == "SparseMoeBlock" and hasattr(ours.mlp, "shared_experts")
        assert ours.self_attn.qk_norm is None
        bias = ours.mlp.gate.e_score_correction_bias
        assert bias.abs().min() > 0 and torch.equal(bias, theirs.mlp.gate.e_score_correction_bias)
    cos, _ = model.model.rotary.tables(torch.arange(4)[None], torch.float32)["default"]
    assert cos.shape[-1] == model.config.head_dim == 32
    half = (
        autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).model.layers[0].mlp.gate
    )
    assert (half.weight.dtype, half.e_score_correction_bias.dtype) == (torch.bfloat16, torch.float32)


def test_hub_spelling_is_kept_and_ignored(tmp_path_factory, tmp_path):
    """Solar-Open-100B's config.json as shipped (transformers 4's rope_theta and partial_rotary_factor at the top
    level, YaRN in rope_scaling) with GLM-4.5's keys saying what transformers' Solar Open ignores (a dense first layer,
    q/k norms, a next-token-prediction layer): the same model as transformers loads from it, saved back in that
    spelling with every key, which transformers loads with equal logits."""
    import transformers

    src, _ = HUB.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "hub")
    path = tmp_path / "hub" / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    hub = {**d, "rope_theta": rope["rope_theta"], "partial_rotary_factor": 1.0, "rope_scaling": scaling,
           "first_k_dense_replace": 1, "use_qk_norm": True, "num_nextn_predict_layers": 1}  # fmt: skip
    path.write_text(json.dumps(hub))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "hub")
    assert (model.config.first_k_dense_replace, model.config.use_qk_norm, model.config.rope_parameters) == (
        0,
        False,
        rope,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hub", attn_implementation="eager")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == {
        k: v for k, v in hub.items() if k != "transformers_version"
    }
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    with torch.no_grad():
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_default_config_is_transformers():
    """SolarOpenConfig() holds transformers' defaults (Solar-Open-100B's sizes, RoPE base 1e6, no
    partial_rotary_factor written); initializer_range, kept only where given, aside."""
    import transformers

    from autolm.models.solar_open import SolarOpenConfig

    theirs = json.loads(transformers.SolarOpenConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert SolarOpenConfig().to_dict() == theirs


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor"),
        ({"n_routed_experts": 8, "n_group": 3}, "n_group"),
        ({"n_routed_experts": 8, "num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"routed_scaling_factor": 0}, "routed_scaling_factor"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(bad, match):
    from autolm.models.solar_open import SolarOpenConfig

    with pytest.raises(autolm.ConfigError, match=match):
        SolarOpenConfig.from_dict(
            {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, **bad}
        )


# ---- GGUF: llama.cpp's SolarOpenModel converter (a Glm4MoeModel), emulated ---------------------------------------


def write_solar_open_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's SolarOpenModel converter makes of transformers' Solar Open `hf` (--outtype f32), from
    config.json as it reads it: TextModel's keys (those config.json has: the feed-forward length, YaRN, the expert
    counts and groups, the head size), Glm4MoeModel's (the rotary dimensions head_dim * partial_rotary_factor, 0.5
    without one; the expert lengths; leading_dense_block_count and nextn_predict_layers where config.json gives
    them; the sigmoid gating; the scale and renormalisation); GLM-4.5's tensors (experts stacked, the correction
    bias as exp_probs_b.bias); a plain vocabulary."""
    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope, nextn = c["rope_parameters"], c.get("num_nextn_predict_layers", 0)
    w = gguf.GGUFWriter(path, "glm4moe")
    w.add_block_count(c["num_hidden_layers"] + nextn)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    if "intermediate_size" in c:
        w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    if rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if key in rope:
                add(rope[key])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(c["n_routed_experts"])
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_expert_group_count(c["n_group"])
    w.add_expert_group_used_count(c["topk_group"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(int(c["head_dim"] * rope.get("partial_rotary_factor", 0.5)))
    w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    w.add_expert_shared_count(c["n_shared_experts"])
    if "first_k_dense_replace" in c:
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(c["routed_scaling_factor"])
    w.add_expert_weights_norm(c["norm_topk_prob"])
    if "num_nextn_predict_layers" in c:
        w.add_nextn_predict_layers(nextn)
    write_tensors(w, hf, gguf.MODEL_ARCH.GLM4_MOE, c["num_hidden_layers"] + nextn)


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file of Solar-Open-100B's spelling (no dense lead layer) loads as Solar Open with
    transformers' logits; int8 from it quantizes the experts. A glm4moe file with dense lead layers stays GLM-4.5's."""
    from autolm.models import gguf_family

    model = check_gguf_in(HUB, write_solar_open_gguf, tmp_path_factory, tmp_path, "SolarOpenForCausalLM")
    assert "partial_rotary_factor" not in model.config.rope_parameters
    assert model.config.extra == {}  # GLM-4.5's keys the file says (no dense layer) are not Solar Open's
    meta = {"general.architecture": "glm4moe", "glm4moe.expert_count": 8}
    for dense, cls in ((0, "SolarOpenForCausalLM"), (1, "Glm4MoeForCausalLM")):
        assert gguf_family({**meta, "glm4moe.leading_dense_block_count": dense}).__name__ == cls


def test_gguf_out_refuses_groups(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp's glm4moe routes without groups: a model with them is refused, naming the field."""
    check_gguf_out_refuses(SOLAR, tmp_path_factory, tmp_path, byte_tokenizer, "n_group")
