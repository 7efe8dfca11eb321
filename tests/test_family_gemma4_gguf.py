"""Gemma 4 in llama.cpp's GGUF layout (arch "gemma4"), in and out, on three tiny checkpoints llama.cpp's format
holds: DENSE (31B's layout: full layers with their own head size and one KV head, their values their keys), MOE
(26B-A4B's: the experts beside the dense MLP, the router's two scales) and SMALL (E2B / E4B's: per-layer inputs,
KV sharing over the last three layers, double-wide MLPs there). write_gemma4_gguf mimics the converter
(conversion/gemma.py, Gemma4Model), reading config.json as it does."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab
from test_family_gemma4 import _SIZES, _TARGETS, DENSE, _transformers_checkpoint
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.gguf_writer import save_gguf
from autolm.sources.gguf import GGUFFile

_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
}  # llama.cpp's graph has no proportional RoPE factor
_GGUF_SIZES = dict(_SIZES, rope_parameters=_ROPE)
GGUF_DENSE = Family("Gemma4TextConfig", dict(_GGUF_SIZES, num_hidden_layers=4, global_head_dim=32,
                                             num_global_key_value_heads=1, attention_k_eq_v=True,
                                             layer_types=["sliding_attention", "full_attention"] * 2),
                    lora_targets=_TARGETS)  # fmt: skip
# the full layers' head size other than the sliding ones' (as 26B-A4B's): transformers writes per_layer_config
GGUF_MOE = Family("Gemma4TextConfig", dict(_GGUF_SIZES, num_hidden_layers=3, global_head_dim=32, enable_moe_block=True,
                                           num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                           layer_types=["sliding_attention", "full_attention", "full_attention"]),
                  lora_targets=_TARGETS)  # fmt: skip
GGUF_SMALL = Family("Gemma4TextConfig", dict(_GGUF_SIZES, num_hidden_layers=5, global_head_dim=32,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                          "sliding_attention", "full_attention"],
                                             hidden_size_per_layer_input=8, vocab_size_per_layer_input=160,
                                             num_kv_shared_layers=3, use_double_wide_mlp=True),
                    lora_targets=_TARGETS)  # fmt: skip
GGUF_FAMILIES = {"dense": GGUF_DENSE, "moe": GGUF_MOE, "small": GGUF_SMALL}
variants = pytest.mark.parametrize("family", list(GGUF_FAMILIES.values()), ids=list(GGUF_FAMILIES))


IDS = torch.tensor([[5, 17, 33, 2, 98, 140, 7, 61, 120, 9, 44]])


def _full_config(hp: dict, key: str):
    """Gemma4Model's lookup: config.json's global value, else the first full layer's per_layer_config entry."""
    value = hp.get({"head_dim": "global_head_dim", "num_key_value_heads": "num_global_key_value_heads"}[key])
    for i, entry in (hp.get("per_layer_config") or {}).items():
        if value is None and hp["layer_types"][int(i)] == "full_attention" and key in entry:
            return entry[key]
    return value


def _metadata(w, hp: dict) -> None:
    """TextModel's, Gemma3Model's and Gemma4Model's set_gguf_parameters (the last value of each key)."""
    n, types, swa_hd = hp["num_hidden_layers"], hp["layer_types"], hp["head_dim"]
    full_hd, full_kv = _full_config(hp, "head_dim"), _full_config(hp, "num_key_value_heads")
    rope, shared = hp["rope_parameters"], hp["num_kv_shared_layers"]
    w.add_block_count(n)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    ff = hp["intermediate_size"]
    w.add_feed_forward_length(
        [ff if i < n - shared else 2 * ff for i in range(n)] if hp["use_double_wide_mlp"] else ff
    )
    w.add_head_count(hp["num_attention_heads"])
    kv = hp["num_key_value_heads"]
    w.add_head_count_kv(
        kv if full_kv is None else [kv if t == "sliding_attention" else full_kv for t in types]
    )
    w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
    w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("num_experts") is not None:
        w.add_expert_count(hp["num_experts"])
    if hp.get("top_k_experts") is not None:
        w.add_expert_used_count(hp["top_k_experts"])
    w.add_key_length(full_hd)
    w.add_value_length(full_hd)
    w.add_file_type(0)
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])
    w.add_shared_kv_layers(shared)
    w.add_embedding_length_per_layer_input(hp.get("hidden_size_per_layer_input") or 0)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    w.add_key_length_swa(swa_hd)
    w.add_value_length_swa(swa_hd)
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_rope_dimension_count(full_hd)
    w.add_rope_dimension_count_swa(swa_hd)


def _tensor_name(names, name: str) -> str:
    """Gemma4Model.filter_tensors / modify_tensors, then gguf-py's name map."""
    bid = name.split(".")[2] if name.startswith("model.layers.") else None
    if name.endswith("router.scale"):
        return f"blk.{bid}.ffn_gate_inp.scale"
    if name.endswith(".per_expert_scale"):
        return f"blk.{bid}.ffn_down_exps.scale"
    if name.endswith("layer_scalar") or (".experts." in name and not name.endswith(".weight")):
        name += ".weight"
    return names.get_name(name, try_suffixes=(".weight", ".bias"))


def write_gemma4_gguf(hf, path: str, kind: str = "F32", split_experts: bool = False) -> None:
    """The GGUF llama.cpp's Gemma4Model converter makes of transformers' Gemma 4 `hf` (its folder's config.json
    read as the converter reads it); `kind` "Q8_0" quantizes the layers' matrices whose rows are whole blocks;
    `split_experts`: the experts' gate and up as ffn_gate_exps / ffn_up_exps (llama.cpp's graph takes both)."""
    import gguf

    hp = json.load(open(os.path.join(hf.name_or_path, "config.json")))
    hp = {**hp, **hp.get("text_config", {})}
    w = gguf.GGUFWriter(path, "gemma4")
    _metadata(w, hp)
    add_toy_vocab(w)
    full = hp["rope_parameters"]["full_attention"]
    hd = _full_config(hp, "head_dim")
    rotated = int(hd * full["partial_rotary_factor"] / 2)
    w.add_tensor("rope_freqs.weight", torch.tensor([1.0] * rotated + [1e30] * (hd // 2 - rotated)).numpy())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, hp["num_hidden_layers"])
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        new, data = _tensor_name(names, name), t.float().numpy()
        if split_experts and new.endswith("ffn_gate_up_exps.weight"):
            gate, up = t.float().chunk(2, 1)
            w.add_tensor(new.replace("gate_up", "gate"), gate.contiguous().numpy())
            w.add_tensor(new.replace("gate_up", "up"), up.contiguous().numpy())
            continue
        quantized = kind != "F32" and data.ndim == 2 and new.startswith("blk.") and data.shape[-1] % 32 == 0
        if quantized and ".ffn_gate_inp." not in new:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return (
            model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
            .logits[mask.bool()]
            .float()
        )


@variants
def test_gguf_in_llama_cpp_layout(family, tmp_path):
    """The converter's file (random layer_scalar values) loads as Gemma4ForCausalLM with transformers' config
    and logits; its Q8_0 version, kept in its blocks, close (within 6% on average: 3.7% found)."""
    hf = _transformers_checkpoint(tmp_path / "hf", family.kwargs)
    hf.name_or_path = str(tmp_path / "hf")
    write_gemma4_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, autolm.AutoConfig.from_pretrained(hf.name_or_path)
    assert type(model).__name__ == "Gemma4ForCausalLM"
    n = c.num_hidden_layers
    assert c.layer_types == want.layer_types and c.own_rope_kinds() == want.own_rope_kinds()
    assert [c.layer_head_dim(i) for i in range(n)] == [want.layer_head_dim(i) for i in range(n)]
    assert [c.layer_kv_heads(i) for i in range(n)] == [want.layer_kv_heads(i) for i in range(n)]
    for key in (
        "attention_k_eq_v",
        "enable_moe_block",
        "num_kv_shared_layers",
        "hidden_size_per_layer_input",
    ):
        assert getattr(c, key) == getattr(want, key), key
    assert float(model.model.layers[0].layer_scalar) != 1.0
    ids, mask = padded_batch()
    theirs = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    if family is GGUF_MOE:  # the experts' gate and up apart: the same model
        write_gemma4_gguf(hf, str(tmp_path / "split.gguf"), split_experts=True)
        split = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="split.gguf")
        torch.testing.assert_close(_logits(split, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    write_gemma4_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    # Q8_0 weights (and, kept in blocks, Q8_0 activations) through random times-w norms: a few percent
    assert (_logits(q, ids, mask) - theirs).abs().mean() <= 0.06 * theirs.abs().mean()


@variants
def test_gguf_out_is_the_converters_file(family, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """save_gguf writes the converter's metadata and tensors, byte for byte; the file loads back with the model's
    logits, and a GGUF-loaded model goes out as the same file."""
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_gemma4_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    again = save_gguf(back, byte_tokenizer, str(tmp_path / "again.gguf"), "f32")
    _same_file(GGUFFile(again), GGUFFile(str(tmp_path / "ref.gguf")))


def test_image_text_checkpoint_goes_out_as_the_text_model(tmp_path, byte_tokenizer):  # noqa: F811
    """The image-text checkpoint's language model (model_type gemma4) goes out as the text model's file."""
    hf = _transformers_checkpoint(tmp_path / "hf", GGUF_DENSE.kwargs, image_text=True)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert GGUFFile(path).architecture == "gemma4" and back.config.model_type == "gemma4_text"
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(back, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (None, r"rope_parameters\['full_attention'\] factor"),  # DENSE's proportional RoPE factor 2
        (dict(hidden_activation="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
    ],
    ids=["rope_factor", "activation", "attention_bias"],
)
def test_what_llama_cpp_cannot_run_is_refused(change, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A proportional RoPE factor, another activation, attention biases: a ConfigError naming the field, no file."""
    family = DENSE if change is None else Family("Gemma4TextConfig", dict(GGUF_DENSE.kwargs, **change))
    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with pytest.raises(ConfigError, match=f"'gemma4_text' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert os.listdir(tmp_path) == []
