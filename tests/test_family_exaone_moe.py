"""EXAONE MoE (K-EXAONE) against transformers and peft: pre-norm layers with EXAONE 4's per-head q/k norms, GQA,
head_dim != hidden / heads, local and global layers alternating (a 5-slot window shorter than the prompts, the
global layers without RoPE); a dense first layer then two mixture layers of 8 experts in 2 groups (each token's
experts from the 1 best group; sigmoid scores steered by a random e_score_correction_bias, renormalised, scaled by
routed_scaling_factor) plus 2 shared experts; the checkpoint as transformers writes it (one tensor per expert, the
correction bias outside the router) and with the Hub's multi-token-prediction weights (`mtp.*`), which are not
loaded. Also a model whose mlp_layer_types put the dense layer in the middle, and one of global layers only (none
rotated). The standard battery, GGUF as llama.cpp's ExaoneMoEModel converter writes it (in, and out of
autolm: the same file), and the CLI (K-EXAONE's chat template is not among the test data: ChatML stands in)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from gguf_mimic import add_text_model, add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_glm4_moe import RoutedFamily, check_gguf_in, check_layers_and_routing
from test_family_phi import _byte_tokenizer

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=64,
    sliding_window=5,
    sliding_window_pattern=2,  # layers 0 and 2 local, 1 global (NoPE)
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for exaone_moe
EXAONE = RoutedFamily("ExaoneMoeConfig", dict(SIZES, n_group=2, topk_group=1), lora_targets=TARGETS)
# what llama.cpp's exaone-moe runs: no groups; config.json's scoring_func "sigmoid" (K-EXAONE's, not a field of
# transformers' config) gives the converter the gating function, which llama.cpp requires
PLAIN = RoutedFamily("ExaoneMoeConfig", dict(SIZES, scoring_func="sigmoid"), lora_targets=TARGETS)
TIED = RoutedFamily("ExaoneMoeConfig", dict(PLAIN.kwargs, tie_word_embeddings=True))
# the dense layer in the middle (mlp_layer_types over first_k_dense_replace)
MIXED = RoutedFamily("ExaoneMoeConfig", dict(SIZES, mlp_layer_types=["sparse", "dense", "sparse"]))
# YaRN, which llama.cpp's exaone-moe does not apply
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = RoutedFamily("ExaoneMoeConfig", dict(SIZES, rope_parameters=YARN_ROPE))
# every layer global: none rotates
GLOBAL = RoutedFamily("ExaoneMoeConfig", dict(SIZES, layer_types=["full_attention"] * 3))


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


@pytest.mark.parametrize("family", [EXAONE, MIXED, GLOBAL], ids=["grouped", "mixed", "global"])
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    EXAONE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    EXAONE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("family", [EXAONE, MIXED], ids=["grouped", "mixed"])
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    EXAONE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    EXAONE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    EXAONE.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    EXAONE.check_disk_offload(tmp_path_factory, tmp_path)


def test_layers_and_routing(tmp_path_factory):
    """Layer 0 dense, the others mixtures with shared experts, the checkpoint's correction biases loaded (and they
    matter), fp32 in a bf16 load; the global layer rotates nothing (and the model's layers follow mlp_layer_types)."""
    check_layers_and_routing(EXAONE, tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(EXAONE.checkpoint(tmp_path_factory)[0])
    assert [model.config.layer_rope(i) for i in range(3)] == ["default", None, "default"]
    assert [model.config.layer_window(i) for i in range(3)] == [5, None, 5]
    mixed = autolm.AutoModelForCausalLM.from_pretrained(MIXED.checkpoint(tmp_path_factory)[0])
    kinds = [type(layer.mlp).__name__ for layer in mixed.model.layers]
    assert kinds == ["SparseMoeBlock", "GatedMLP", "SparseMoeBlock"]


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's per-expert tensors, its correction bias name
    (outside the router) and only transformers' config keys in the files autolm saves."""
    _, saved = EXAONE.check_saved_files(tmp_path_factory, tmp_path)
    assert {
        "model.layers.1.mlp.experts.7.gate_proj.weight",
        "model.layers.2.mlp.e_score_correction_bias",
    } <= saved


# ---- GGUF: llama.cpp's ExaoneMoEModel converter, emulated -------------------------------------------------------


# config.json's scoring_func -> gguf.ExpertGatingFuncType
GATING = {"sigmoid": "SIGMOID", "softmax": "SOFTMAX"}


def write_exaone_moe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (ExaoneMoEModel, --outtype f32) makes of transformers' EXAONE MoE `hf`, from
    the checkpoint files: TextModel's keys (block_count counting the next-token-prediction layers, expert and group
    counts, the gating function where config.json has scoring_func, the head size where it has head_dim), the
    vocabulary size, the window and the local layers as
    flags (Exaone4Model), then the experts' lengths, shared experts, weights' scale and renormalisation, the leading
    dense layers, nextn_predict_layers and RoPE scaling "none"; no q/k permutation; each layer's experts stacked,
    the correction bias as exp_probs_b.bias, the mtp.* weights as layers past the last; a plain vocabulary."""
    import gguf

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    nextn = hp.get("num_nextn_predict_layers", 0)
    w = gguf.GGUFWriter(path, "exaone-moe")
    add_text_model(w, c, c.num_hidden_layers + nextn)
    if hp.get("scoring_func") in GATING:  # TextModel's gating function, from config.json's scoring_func
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[GATING[hp["scoring_func"]]])
    w.add_expert_count(c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    if "head_dim" in hp:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_vocab_size(c.vocab_size)
    if hp.get("sliding_window") is not None:
        w.add_sliding_window(hp["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.num_shared_experts)
    w.add_expert_shared_feed_forward_length(c.moe_intermediate_size * c.num_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_nextn_predict_layers(nextn)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.EXAONE_MOE, c.num_hidden_layers + nextn)
    for name, t in _converter_tensors(hf, nextn):
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _converter_tensors(hf, nextn: int) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under the names the converter hands gguf-py's map: mtp.layers.<i> as layer
    num_hidden_layers + i, the mtp block's own weights as every such layer's nextn ones, the experts stacked."""
    from safetensors.torch import load_file

    c = hf.config
    n = c.num_hidden_layers
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    remap = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
             "norm": "shared_head.norm"}  # fmt: skip
    renamed: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith("mtp.layers."):
            i, rest = name.removeprefix("mtp.layers.").split(".", 1)
            renamed[f"model.layers.{int(i) + n}.{rest}"] = t
        elif name.startswith("mtp."):
            stem, kind = name.removeprefix("mtp.").rsplit(".", 1)
            renamed.update((f"model.layers.{b}.{remap[stem]}.{kind}", t) for b in range(n, n + nextn))
        else:
            renamed[name] = t
    out = []
    for name, t in stacked_experts(renamed, ".mlp.experts.", c.num_experts):
        out.append((name.replace("e_score_correction_bias", "e_score_correction.bias"), t))
    return out


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as ExaoneMoeForCausalLM with transformers' logits (the local / global layers
    from the flags; int8 from it quantizes the experts)."""
    model = check_gguf_in(PLAIN, write_exaone_moe_gguf, tmp_path_factory, tmp_path, "ExaoneMoeForCausalLM")
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    c = model.config
    assert (c.layer_types, c.mlp_layer_types) == (hf.config.layer_types, hf.config.mlp_layer_types)
    assert (c.head_dim, c.num_shared_experts, c.sliding_window) == (32, 2, 5)


@pytest.mark.parametrize(
    ("family", "refused"),
    [(EXAONE, "n_group"), (MIXED, "mlp_layer_types"), (YARN, "RoPE"), (TIED, "tie_word_embeddings")],
    ids=["grouped", "mixed", "yarn", "tied"],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    family, refused, tmp_path_factory, tmp_path, byte_tokenizer
):
    """Groups of experts (llama.cpp's exaone-moe routes without them), dense layers past the leading ones, YaRN
    (its converter writes RoPE scaling "none"), a tied head (it requires output.weight): refused, naming the field,
    and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_gguf_without_a_gating_function_is_refused(tmp_path_factory, tmp_path):
    """The converter's file of a config.json without scoring_func holds no expert_gating_func, which llama.cpp's
    exaone-moe requires: refused, naming the key."""
    _, hf = RoutedFamily("ExaoneMoeConfig", SIZES).checkpoint(tmp_path_factory)
    write_exaone_moe_gguf(hf, str(tmp_path / "model.gguf"))
    with pytest.raises(autolm.ConfigError, match="expert_gating_func"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")


def test_mtp_weights_are_not_loaded(tmp_path_factory, tmp_path):
    """The Hub's checkpoints hold a multi-token-prediction block (`mtp.fc`, its norms and a full mixture layer
    under `mtp.layers.0`; config.json's num_nextn_predict_layers 1): autolm skips it, silently, as transformers
    does; and in the GGUF file llama.cpp's converter makes of such a checkpoint (as layer num_hidden_layers), as
    llama.cpp does."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from autolm.sources.gguf import GGUFFile

    directory, hf = PLAIN.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "mtp")
    tensors = load_file(f"{directory}/model.safetensors")
    h = hf.config.hidden_size
    extra = {
        k.replace("model.layers.2.", "mtp.layers.0."): v.clone()
        for k, v in tensors.items()
        if ".layers.2." in k
    }
    extra.update({"mtp.fc.weight": torch.zeros(h, 2 * h), "mtp.pre_fc_norm_embedding.weight": torch.ones(h),
                  "mtp.pre_fc_norm_hidden.weight": torch.ones(h), "mtp.norm.weight": torch.ones(h)})  # fmt: skip
    save_file({**tensors, **extra}, str(tmp_path / "mtp" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    (tmp_path / "mtp" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert model.load_report.notes == autolm.AutoModelForCausalLM.from_pretrained(directory).load_report.notes
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    write_exaone_moe_gguf(
        SimpleNamespace(config=hf.config, name_or_path=str(tmp_path / "mtp")), str(tmp_path / "m.gguf")
    )
    assert "blk.3.nextn.eh_proj.weight" in {t.name for t in GGUFFile(str(tmp_path / "m.gguf")).tensors}
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert model.config.num_hidden_layers == 3
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    long = RoutedFamily(
        EXAONE.config_cls, dict(EXAONE.kwargs, max_position_embeddings=2048), lora_targets=["q_proj"]
    )
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "ExaoneMoeForCausalLM (exaone_moe)")


def test_default_config_is_transformers():
    """ExaoneMoeConfig holds transformers' defaults (its sliding_window_pattern, kept where config.json gives it,
    and initializer_range aside); layer_types and mlp_layer_types derived as transformers derives them."""
    import transformers

    from autolm.models.exaone_moe import ExaoneMoeConfig

    theirs = json.loads(transformers.ExaoneMoeConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "sliding_window_pattern"):
        theirs.pop(key)
    assert ExaoneMoeConfig().to_dict() == theirs
    for kw in (
        dict(num_hidden_layers=8, first_k_dense_replace=3),
        dict(num_hidden_layers=6, sliding_window=16, sliding_window_pattern=3, first_k_dense_replace=0),
        dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "dense"]),
    ):
        ours, want = ExaoneMoeConfig.from_dict(kw), transformers.ExaoneMoeConfig(**kw)
        assert (ours.layer_types, ours.mlp_layer_types) == (want.layer_types, want.mlp_layer_types)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts=8, num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts=8, n_group=3), "n_group"),
        (dict(num_experts=8, n_group=2, topk_group=3), "topk_group"),
        (dict(num_experts=8, n_group=2, topk_group=1, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(first_k_dense_replace="1"), "first_k_dense_replace"),
        (dict(num_shared_experts=0), "num_shared_experts"),
        (dict(moe_intermediate_size="8"), "moe_intermediate_size"),
        (dict(routed_scaling_factor=0), "routed_scaling_factor"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob"),
        (dict(num_hidden_layers=2, mlp_layer_types=["dense", "moe"]), "mlp_layer_types"),
        (dict(num_hidden_layers=3, mlp_layer_types=["dense", "sparse"]), "mlp_layer_types"),
        (dict(num_hidden_layers=4, sliding_window_pattern=0), "sliding_window_pattern"),
        (dict(sliding_window=None), "sliding_window"),
        (dict(num_hidden_layers=4, sliding_window_pattern="LLLG"), "sliding_window_pattern"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.exaone_moe import ExaoneMoeConfig

    with pytest.raises(autolm.ConfigError, match=match):
        ExaoneMoeConfig.from_dict({"num_hidden_layers": 4, **bad})
