"""ERNIE 4.5 MoE (ERNIE-4.5-21B-A3B / 300B-A47B) against transformers and peft: ERNIE 4.5's attention (interleaved
RoPE in fp32, GQA), one dense layer before the mixture (moe_layer_start_index 1), 4 experts of which each token
uses 2, chosen by softmax + a randomized e_score_correction_bias and weighted by the plain softmax renormalised,
one shared expert; and a variant with use_bias (q/k/v/o, the dense and shared MLPs, the head), an untied head,
head_dim 32, a mixture ending before the last layer, two shared experts and a moe_norm_min that clamps. The
checkpoint as transformers writes it (one tensor per expert, mlp.moe_statics.*); the standard battery, GGUF as
llama.cpp's Ernie4_5MoeModel converter writes it (in, and out of autolm), a chat template and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_mimic import add_text_model, add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_ernie4_5 import _template
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError
from autolm.models.ernie4_5_moe import Ernie4_5_MoeConfig, gguf_write_config

_SHAPE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, moe_num_experts=4, moe_k=2)  # fmt: skip
# peft has no default for ernie4_5_moe, and takes up/down_proj for the experts' parameters (target_parameters)
_LORA = ["q_proj", "k_proj", "v_proj", "o_proj"]
# ERNIE-4.5-21B-A3B's shape: a dense first layer, one shared expert of moe_intermediate_size (the converter's
# intermediate_size // num_key_value_heads), no biases, a tied head: what llama.cpp's ernie4_5-moe holds
ERNIE_MOE = Family(
    "Ernie4_5_MoeConfig",
    dict(_SHAPE, moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1),
    lora_targets=_LORA,
)
# what else the config allows: biases, an untied head, head_dim twice hidden / heads, experts in layers 0 and 1
# only, two shared experts, a clamp of the weights' sum at 0.8 (above many sums of two of four softmax values)
VARIANT = Family(
    "Ernie4_5_MoeConfig",
    dict(_SHAPE, moe_intermediate_size=16, moe_num_shared_experts=2, moe_layer_start_index=0, moe_layer_end_index=1,
         moe_norm_min=0.8, use_bias=True, tie_word_embeddings=False, head_dim=32,
         rope_parameters={"rope_type": "default", "rope_theta": 1000.0}),
    lora_targets=["q_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"ernie4_5_moe": ERNIE_MOE, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ERNIE_MOE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ERNIE_MOE.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ERNIE_MOE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """check_save, and the files autolm saves hold the checkpoint's tensor names (per expert, the correction bias
    as mlp.moe_statics.e_score_correction_bias) and its config keys."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert {"model.layers.1.mlp.experts.3.gate_proj.weight",
            "model.layers.1.mlp.moe_statics.e_score_correction_bias"} <= saved  # fmt: skip


def test_disk_offload(tmp_path_factory, tmp_path):
    ERNIE_MOE.check_disk_offload(tmp_path_factory, tmp_path)


# ---- structure, config.json, the Hub's files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the router's correction bias, biases where use_bias, the head's
    included); the layers' kinds as transformers builds them; config.json round-trips with transformers' keys;
    transformers' tensor-parallel plan less its experts entries (nn.Experts shards itself)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert ("lm_head.bias" in model.state_dict()) == (name == "variant")
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == (["GatedMLP", "SparseMoeBlock", "SparseMoeBlock"] if name == "ernie4_5_moe"
                     else ["SparseMoeBlock", "SparseMoeBlock", "GatedMLP"])  # fmt: skip
    plan = {k: v for k, v in hf.config.base_model_tp_plan.items() if ".experts" not in k}
    assert type(model).tp_patterns == plan


def test_hub_multi_token_prediction_tensors_are_skipped(tmp_path_factory, tmp_path):
    """The Hub's files hold an MTP block (model.mtp_block.0.*, mtp_emb_norm, ...) the model has not: skipped, as
    transformers skips them; the logits stay."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory, hf = ERNIE_MOE.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "hub")
    tensors = load_file(f"{directory}/model.safetensors")
    tensors.update({"model.mtp_block.0.mlp.experts.0.gate_proj.weight": torch.ones(32, 64),
                    "model.mtp_emb_norm.0.weight": torch.ones(64), "model.mtp_linear_proj.0.weight": torch.ones(64, 128)})  # fmt: skip
    save_file(tensors, str(tmp_path / "hub" / "model.safetensors"), metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "hub")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_resize_keeps_the_head_bias_as_transformers(tmp_path_factory):
    """With use_bias the head's bias grows with the vocabulary: the old entries, then their mean, as transformers."""
    import transformers

    directory, _ = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(VOCAB + 8)
    hf.resize_token_embeddings(VOCAB + 8)
    torch.testing.assert_close(model.lm_head.bias, hf.lm_head.bias)
    assert model(torch.tensor([[VOCAB + 3]])).logits.shape[-1] == VOCAB + 8


def test_default_config_and_errors(tmp_path):
    """Ernie4_5_MoeConfig() holds transformers' defaults (initializer_range, kept only where config.json has it,
    aside); moe_layer_end_index -1 reads as the last layer; bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.Ernie4_5_MoeConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Ernie4_5_MoeConfig().to_dict() == theirs
    base = dict(model_type="ernie4_5_moe", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                moe_num_experts=4, moe_k=2)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(base))
    config = autolm.AutoConfig.from_pretrained(tmp_path)
    assert (config.moe_layer_end_index, config.rope_parameters["rope_theta"], config.head_dim) == (
        1,
        500000.0,
        16,
    )
    for change, key in ((dict(moe_k=5), "moe_k"), (dict(moe_num_experts=0), "moe_num_experts"),
                        (dict(moe_layer_interval=0), "moe_layer_interval"),
                        (dict(moe_num_shared_experts=-1), "moe_num_shared_experts"),
                        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
                        (dict(moe_norm_min="small"), "moe_norm_min"), (dict(use_bias="no"), "use_bias"),
                        (dict(moe_layer_end_index=-2), "moe_layer_end_index")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes ernie4_5-moe ----------------------------------------------


def write_ernie4_5_moe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' ERNIE 4.5 MoE `hf` (--outtype f32), from the checkpoint
    files as it reads them: TextModel's metadata (no vocabulary size, no rope.dimension_count, the head size only
    where config.json has head_dim), then Ernie4_5MoeModel's expert keys (the shared experts' length as
    intermediate_size // num_key_value_heads); e_score_correction_bias renamed to e_score_correction.bias (its
    filter_tensors) and written unsqueezed (1, experts) as exp_probs_b.bias; each layer's per-expert gate/up/down
    stacked into ffn_{gate,up,down}_exps, the rest by gguf-py's name map; no output tensor for a tied head."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    config = json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "ernie4_5-moe")
    add_text_model(w, c)
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_expert_count(config["moe_num_experts"])
    w.add_expert_used_count(config["moe_k"])
    w.add_interleave_moe_layer_step(config["moe_layer_interval"])
    w.add_leading_dense_block_count(config["moe_layer_start_index"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_expert_shared_count(config["moe_num_shared_experts"])
    if config["moe_num_shared_experts"] > 0:
        w.add_expert_shared_feed_forward_length(config["intermediate_size"] // config["num_key_value_heads"])
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.ERNIE4_5_MOE, c.num_hidden_layers)
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in tensors.items():
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if ".mlp.experts." in name:
            stem, expert, part, _ = name.rsplit(".", 3)  # <layer>.mlp.experts, e, gate_proj, weight
            if expert != "0":
                continue
            t = torch.stack([tensors[f"{stem}.{e}.{part}.weight"] for e in range(c.num_experts)])
            name = f"{stem}.{part}.weight"
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(t.float().numpy())
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Ernie4_5_MoeForCausalLM with transformers' logits (the correction bias from
    exp_probs_b, the dense first layer from leading_dense_block_count); int8 from it quantizes the experts."""
    _, hf = ERNIE_MOE.checkpoint(tmp_path_factory)
    write_ernie4_5_moe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "Ernie4_5_MoeForCausalLM"
    c = model.config
    assert (c.moe_layer_start_index, c.moe_num_shared_experts, c.num_experts, c.num_experts_per_tok) == (
        1,
        1,
        4,
        2,
    )
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[1].mlp.experts).__name__ == "Int8Experts"


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path):
    """A model llama.cpp's ernie4_5-moe cannot run (biases, a mixture ending early, a clamp that bites) is refused
    naming the fields, and no file is written (test_gguf_out checks the F32 file of the plain checkpoint against
    the converter's)."""
    from autolm.gguf_writer import save_gguf

    variant = autolm.AutoModelForCausalLM.from_pretrained(VARIANT.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="'ernie4_5_moe' model") as e:
        save_gguf(variant, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "no.gguf"), "f32")
    assert all(f in str(e.value) for f in ("use_bias", "moe_layer_end_index", "moe_norm_min"))
    assert not os.path.exists(tmp_path / "no.gguf")


def test_gguf_out_refuses_a_shared_length_the_converter_gets_wrong():
    """The converter writes the shared experts' length as intermediate_size // num_key_value_heads; where that is
    not their size, llama.cpp would build them wrong: refused, naming the fields."""
    config = Ernie4_5_MoeConfig.from_dict(
        {**_SHAPE, "moe_intermediate_size": 24, "moe_num_shared_experts": 2}
    )
    with pytest.raises(ConfigError, match="intermediate_size // num_key_value_heads.*moe_num_shared_experts"):
        gguf_write_config({}, config)


# ---- a chat template and the command line -----------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """ERNIE-4.5-21B-A3B-PT's chat template has the dense ERNIE 4.5's shape (test_family_ernie4_5's)."""
    check_cli(
        ERNIE_MOE, _template(tmp_path), tmp_path_factory, tmp_path, "Ernie4_5_MoeForCausalLM (ernie4_5_moe)"
    )
