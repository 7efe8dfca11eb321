"""Hunyuan MoE (Tencent's Hunyuan-A13B) against transformers and peft: Hunyuan dense's attention (per-head q/k RMSNorms
after RoPE, q/k/v/o biases, a head size of its own, GQA, NTK-alpha RoPE) with a mixture of experts in every layer
(the router `mlp.gate.wg` in fp32, softmax over all experts, top k renormalised, k given per layer) plus a shared
MLP every token passes (`mlp.shared_mlp`); the released config.json's per-layer lists (moe_topk,
moe_intermediate_size, num_shared_expert); a variant with plain RoPE, one k for every layer and a tied head. The
standard battery, the checkpoint as transformers writes it (one tensor per expert), config.json in transformers'
keys, GGUF as llama.cpp's HunYuanMoEModel converter writes "hunyuan-moe" (in and out), a chat template through the
CLI, the config values refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.hunyuan_v1_moe import HunYuanMoEV1Config

# the released configs' RoPE: NTK-alpha (a fixed, larger base), factor 1
ALPHA = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
# peft has no default for hunyuan_v1_moe, and takes down_proj for the experts' parameters (target_parameters)
LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]
# every quirk on: q/k/v/o biases, head_dim 32 over 64 / 4 heads, GQA, NTK-alpha RoPE, a different k in each layer
# (top 1 too), the released config.json's per-layer lists
HUNYUAN_MOE = Family(
    "HunYuanMoEV1Config",
    dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
         head_dim=32, max_position_embeddings=64, attention_bias=True, rope_parameters=ALPHA, num_experts=4,
         moe_topk=[2, 3, 1], moe_intermediate_size=[32] * 3, num_shared_expert=[1] * 3),
    lora_targets=LORA,
)  # fmt: skip
# plain RoPE, one k for every layer, a tied head, no biases
TIED = Family(
    "HunYuanMoEV1Config",
    dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
         head_dim=16, max_position_embeddings=64, tie_word_embeddings=True, num_experts=4, moe_topk=2,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    lora_targets=LORA,
)  # fmt: skip
# what llama.cpp's converter takes (it asserts alpha 1000, base 10000, a 128-wide head from hidden_size / heads and
# a context of 32k or 256k; it reads the per-layer lists), no biases
GGUF_FAMILY = Family(
    "HunYuanMoEV1Config",
    dict(hidden_size=256, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
         head_dim=128, max_position_embeddings=262144, rope_parameters=ALPHA, num_experts=4, moe_topk=[2, 2],
         moe_intermediate_size=[32, 32], num_shared_expert=[1, 1]),
)  # fmt: skip
FAMILIES = {"hunyuan_moe": HUNYUAN_MOE, "tied": TIED, "gguf": GGUF_FAMILY}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    HUNYUAN_MOE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HUNYUAN_MOE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["hunyuan_moe", "tied"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    HUNYUAN_MOE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    HUNYUAN_MOE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HUNYUAN_MOE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", ["hunyuan_moe", "tied"])
def test_save(tmp_path_factory, tmp_path, name):
    """check_save, and the files autolm saves hold the checkpoint's tensor names (one per expert, the router as
    mlp.gate.wg) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.gate.wg.weight",
            "model.layers.1.mlp.shared_mlp.down_proj.weight"} <= saved  # fmt: skip


def test_disk_offload(tmp_path_factory, tmp_path):
    HUNYUAN_MOE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- structure, config.json ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hunyuan_moe", "tied"])
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the router as mlp.gate.wg, fp32 in a bf16 model as transformers
    keeps it; the shared MLP; biases where attention_bias); each layer's k; config.json round-trips with
    transformers' keys (the released per-layer lists included); the attention and shared MLP split as Llama's
    (transformers' plan names only the experts)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert ("model.layers.0.self_attn.o_proj.bias" in model.state_dict()) == (name == "hunyuan_moe")
    tops = [layer.mlp.gate.top_k for layer in model.model.layers]
    assert tops == [layer.mlp.gate.top_k for layer in hf.model.layers]
    assert set(hf.config.base_model_tp_plan) == {
        f"layers.*.mlp.experts{s}" for s in ("", ".gate_up_proj", ".down_proj")
    }
    plan = type(model).tp_patterns
    assert (
        plan["layers.*.mlp.shared_mlp.down_proj"] == "rowwise"
        and plan["layers.*.self_attn.q_proj"] == "colwise"
    )
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    half = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    assert half.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_default_config_and_errors(tmp_path):
    """HunYuanMoEV1Config() holds transformers' defaults (initializer_range, kept only where config.json has it,
    aside; head_dim, null in transformers' default, is hidden_size / num_attention_heads); bad values, per-layer
    values transformers cannot build and the original code's switches transformers does not implement raise
    ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.HunYuanMoEV1Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert theirs.pop("head_dim") is None
    ours = HunYuanMoEV1Config().to_dict()
    assert ours.pop("head_dim") == 4096 // 32
    assert ours == theirs
    base = dict(model_type="hunyuan_v1_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                intermediate_size=32, num_experts=4, moe_topk=2)  # fmt: skip
    for change, key in ((dict(num_experts=0), "num_experts"), (dict(num_experts=[4, 4]), "num_experts"),
                        (dict(moe_topk=5), "moe_topk"), (dict(moe_topk=[2]), "moe_topk"),
                        (dict(moe_topk=[2, 0]), "moe_topk"), (dict(moe_topk="2"), "moe_topk"),
                        (dict(moe_intermediate_size=[32, 16]), "moe_intermediate_size"),
                        (dict(num_shared_expert=[1, 2]), "num_shared_expert"),
                        (dict(use_cla=True), "use_cla"), (dict(use_mla=True), "use_mla"),
                        (dict(use_qk_norm=False), "use_qk_norm"), (dict(use_mixed_mlp_moe=False), "use_mixed_mlp_moe"),
                        (dict(output_router_logits="no"), "output_router_logits"), (dict(eod_token_id=-1), "eod_token_id"),
                        (dict(rope_parameters={**ALPHA, "alpha": 0}), "alpha")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)
    # what the released config.json says and transformers builds: accepted
    released = dict(moe_topk=[2, 2], moe_intermediate_size=[32, 32], num_shared_expert=[1, 1], use_cla=False,
                    use_mla=False, use_qk_norm=True, use_mixed_mlp_moe=True)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **released}))
    assert autolm.AutoConfig.from_pretrained(tmp_path).moe_topk == [2, 2]


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes hunyuan-moe -----------------------------------------------


def _metadata(w, config: dict) -> None:
    """HunYuanMoEModel.set_gguf_parameters (conversion/hunyuan.py) on config.json's values: TextModel's keys (no
    experts-used count: config.json has no num_experts_per_tok), the shared MLP's length as intermediate_size and
    the per-layer lists' single values; for dynamic RoPE the NTK-alpha base over hidden_size / heads (alpha 1000
    where none), scaling type none, factor 1, 256k as both context lengths (asserting its assumptions)."""
    import gguf

    rope = config["rope_parameters"]
    dynamic = rope.get("rope_type") == "dynamic"
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(config["num_experts"])
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_expert_shared_feed_forward_length(config["intermediate_size"])
    for key, add in (("moe_intermediate_size", w.add_expert_feed_forward_length),
                     ("moe_topk", w.add_expert_used_count), ("num_shared_expert", w.add_expert_shared_count)):  # fmt: skip
        assert all(v == config[key][0] for v in config[key])
        add(config[key][0])
    if dynamic:
        alpha, base = rope.get("alpha", 1000), rope.get("rope_theta", 10000.0)
        dim = config["hidden_size"] // config["num_attention_heads"]
        assert alpha == 1000 and base == 10000.0 and dim == 128
        assert config["max_position_embeddings"] in (32 * 1024, 256 * 1024)
        w.add_rope_freq_base(base * alpha ** (dim / (dim - 2)))
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1)
        w.add_rope_scaling_orig_ctx_len(256 * 1024)
        w.add_context_length(256 * 1024)


def write_hunyuan_moe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Hunyuan MoE `hf` (--outtype f32), from the checkpoint
    files as the converter reads them: _metadata, then each layer's per-expert down/gate/up tensors stacked into
    ffn_{down,gate,up}_exps, the rest (mlp.gate.wg as ffn_gate_inp, mlp.shared_mlp.* as ffn_*_shexp, the per-head
    norms as attn_{q,k}_norm) by gguf-py's name map; no q/k permutation; no output tensor for a tied head; a plain
    vocabulary."""
    import gguf
    from safetensors.torch import load_file

    config = json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "hunyuan-moe")
    _metadata(w, config)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.HUNYUAN_MOE, config["num_hidden_layers"])
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in tensors.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if ".mlp.experts." in name:
            stem, expert, part, _ = name.rsplit(".", 3)  # <layer>.mlp.experts, e, gate_proj, weight
            if expert != "0":
                continue
            t = torch.stack([tensors[f"{stem}.{e}.{part}.weight"] for e in range(config["num_experts"])])
            name = f"{stem}.{part}.weight"
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as HunYuanMoEV1ForCausalLM with transformers' logits (NTK-alpha RoPE as a plain
    base, the per-head norms, the router, the shared MLP); the per-layer lists come back as config.json gives them;
    int8 from it quantizes the experts."""
    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    write_hunyuan_moe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "HunYuanMoEV1ForCausalLM"
    c = model.config
    assert c.rope_parameters["rope_type"] == "default" and c.max_position_embeddings == 256 * 1024
    assert c.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 1000.0 ** (128 / 126), rel=1e-6)
    assert (c.num_experts, c.moe_topk, c.num_key_value_heads, c.head_dim) == (4, [2, 2], 1, 128)
    assert (c.extra["moe_intermediate_size"], c.extra["num_shared_expert"]) == ([32, 32], [1, 1])
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].mlp.experts).__name__ == "Int8Experts"


# what llama.cpp's hunyuan-moe cannot run: attention biases
BIASED = Family("HunYuanMoEV1Config", {**GGUF_FAMILY.kwargs, "attention_bias": True})


@pytest.mark.parametrize(
    "family, field",
    [(BIASED, "attention_bias"), (HUNYUAN_MOE, "moe_topk [2, 3, 1]"), (TIED, "moe_topk 2")],
    ids=["biases", "k-per-layer", "one-k"],
)
def test_gguf_out_refuses_what_the_file_cannot_say(tmp_path_factory, tmp_path, byte_tokenizer, family, field):  # noqa: F811
    """Refused by name, no file written: attention biases (llama.cpp's hunyuan-moe reads none), k differing by
    layer (the converter holds one), one k for every layer (the converter reads a per-layer list)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


# ---- the command line (Hunyuan-A13B's own template is not in tests/data: ChatML's stands in) ---------------------


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family(
        "HunYuanMoEV1Config", {**HUNYUAN_MOE.kwargs, "max_position_embeddings": 256}, lora_targets=LORA
    )
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path,
              "HunYuanMoEV1ForCausalLM (hunyuan_v1_moe)")  # fmt: skip
