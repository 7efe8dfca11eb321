"""HunYuan-VL's language model (hunyuan_vl_text; hunyuan_vl: the image-text checkpoints) against transformers'
HunYuanVLForConditionalGeneration (a tiny vision tower; transformers has no text-only causal LM: its
HunYuanVLTextModel carries the tied head's hidden states) and peft. Hunyuan dense's layer (per-head q/k RMSNorms
after RoPE, q/k/v/o biases, a head size of its own, GQA) with XD-RoPE: 4 or 3 sections, NTK-alpha ("xdrope" in the
released files, read as "dynamic" with an alpha) or plain dynamic NTK scaling; on text every axis holds the text
position, so it is plain RoPE. The battery, the text model saved (transformers' HunYuanVLTextModel loads it), the
config as transformers reads it (legacy names, the tie rule), GGUF as llama.cpp's HunyuanVLTextModel converter
writes "hunyuan_vl" (in and out) and llama.cpp's own logits on both files."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from conftest import padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import HunYuanVLConfig, HunYuanVLTextConfig

# transformers maps hunyuan_vl to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.HunYuanVLConfig, transformers.HunYuanVLForConditionalGeneration, exist_ok=True
)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
              out_hidden_size=64, max_image_size=32, min_image_size=16)  # fmt: skip
SIZES = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# the released files' XD-RoPE: NTK-alpha, four sections (sequence, width, height, image index); transformers
# writes it as type "dynamic" with mrope_section (the legacy spelling is read in test_config_...)
XDROPE = {
    "rope_type": "xdrope",
    "alpha": 1000.0,
    "factor": 1.0,
    "rope_theta": 10000.0,
    "xdrope_section": [4, 4, 4, 4],
}
ALPHA = {
    "rope_type": "dynamic",
    "alpha": 1000.0,
    "factor": 1.0,
    "rope_theta": 10000.0,
    "mrope_section": [4, 4, 4, 4],
}
# every quirk on: q/k/v/o biases, head_dim 32 over 64 / 4 heads, GQA, XD-RoPE with NTK-alpha
HUNYUAN = Family(
    "HunYuanVLConfig",
    dict(
        SIZES,
        head_dim=32,
        max_position_embeddings=64,
        attention_bias=True,
        rope_parameters=ALPHA,
        vision_config=VISION,
    ),
    lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"],  # peft has no default for hunyuan_vl
)
# what llama.cpp's hunyuan_vl runs: no biases, head_dim 16, 4 sections, NTK-alpha
GGUF_FAMILY = Family(
    "HunYuanVLConfig",
    dict(SIZES, head_dim=16, max_position_embeddings=64, vision_config=VISION,
         rope_parameters={"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0,
                          "mrope_section": [2, 2, 2, 2]}),
)  # fmt: skip
# plain dynamic NTK scaling (the base grows past 16 positions), three sections, as many KV heads as heads
DYNAMIC = Family(
    "HunYuanVLConfig",
    dict(SIZES, num_key_value_heads=4, head_dim=16, max_position_embeddings=16, vision_config=VISION,
         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
)  # fmt: skip
FAMILIES = {"hunyuan": HUNYUAN, "gguf": GGUF_FAMILY, "dynamic": DYNAMIC}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["hunyuan", "dynamic"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    HUNYUAN.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["hunyuan", "dynamic"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    HUNYUAN.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    HUNYUAN.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HUNYUAN.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    HUNYUAN.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The language model's tensors under transformers' text names (the vision tower's skipped); saved, it is the
    hunyuan_vl_text model: text_config's keys and values, transformers' HunYuanVLTextModel loads it with hidden
    states whose tied head gives autolm's logits, and autolm loads it back bit-identical."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "HunYuanVLForCausalLM" and model.config.model_type == "hunyuan_vl_text"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert ("model.layers.0.self_attn.o_proj.bias" in theirs) == (name == "hunyuan")
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype"):
            d.pop(key, None)
    assert written == original
    text = transformers.AutoModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert type(text).__name__ == "HunYuanVLTextModel"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        hidden = text(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state[real]
        torch.testing.assert_close(ours, hidden @ text.embed_tokens.weight.T, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_is_transformers_on_text(tmp_path_factory, name):
    """transformers' XD-RoPE tables over text positions (every axis the text position) are autolm's plain RoPE
    (NTK-alpha's fixed base; dynamic scaling growing past max_position_embeddings), at 8 and 40 positions."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    rotary = hf.model.language_model.rotary_emb
    assert len(rotary.mrope_section) >= 3
    for length in (8, 40):
        pos = torch.arange(length)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1), pos)
        ours = model.model.rotary.tables(pos, torch.float32)["default"]
        torch.testing.assert_close(ours[0][:, 0], cos, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours[1][:, 0], sin, atol=1e-6, rtol=1e-6)


def test_config_defaults_legacy_names_and_errors():
    """HunYuanVLTextConfig() holds transformers' defaults; a legacy file (attention_head_dim, pad_id, rope_scaling
    type "xdrope" with xdrope_section) reads as transformers reads it; the head is tied unless both configs untie
    it; bad values raise ConfigError naming the key."""
    theirs = json.loads(transformers.HunYuanVLTextConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert theirs.pop("head_dim") is None  # transformers' default: hidden_size / num_attention_heads
    ours = HunYuanVLTextConfig().to_dict()
    assert ours.pop("head_dim") == 4096 // 32
    assert ours == theirs
    legacy = dict(SIZES, attention_head_dim=32, pad_id=5, rope_scaling=XDROPE)
    ours, theirs = (
        HunYuanVLTextConfig.from_dict(legacy),
        transformers.HunYuanVLTextConfig(**copy.deepcopy(legacy)),
    )
    assert (ours.head_dim, ours.pad_token_id) == (theirs.head_dim, theirs.pad_token_id) == (32, 5)
    assert ours.rope_parameters == theirs.rope_parameters
    no_pad = HunYuanVLTextConfig.from_dict(dict(SIZES, pad_token_id=-1))  # HunyuanOCR's files
    assert (
        no_pad.pad_token_id == transformers.HunYuanVLTextConfig(**SIZES, pad_token_id=-1).pad_token_id == -1
    )
    assert no_pad.to_dict()["pad_token_id"] == -1
    for outer, text in ((None, None), (False, None), (None, False), (False, False), (True, False)):
        d = {"text_config": dict(SIZES, **({} if text is None else {"tie_word_embeddings": text}))}
        if outer is not None:
            d["tie_word_embeddings"] = outer
        tied = transformers.HunYuanVLConfig(**copy.deepcopy(d)).tie_word_embeddings
        assert HunYuanVLConfig.from_dict(d).tie_word_embeddings == tied, (outer, text)
    flat = HunYuanVLConfig.from_dict({"model_type": "hunyuan_vl", **legacy, "vision_config": VISION})
    assert type(flat).__name__ == "HunYuanVLTextConfig" and flat.head_dim == 32
    assert flat.rope_parameters == ours.rope_parameters
    sections = {"rope_type": "default", "rope_theta": 1e4}
    for change, key in ((dict(rope_parameters={**sections, "mrope_section": [4, 2]}), "mrope_section"),
                        (dict(rope_parameters={**sections, "mrope_section": [4, 2.5, 1.5]}), "mrope_section"),
                        (dict(rope_scaling={**XDROPE, "mrope_section": [2, 2, 2, 2]}), "xdrope_section"),
                        (dict(sep_token_id=-1), "sep_token_id"), (dict(pad_token_id=-2), "pad_token_id"),
                        (dict(eod_token_id=-1), "eod_token_id")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            HunYuanVLTextConfig.from_dict(dict(SIZES, **change))


# ---- GGUF, as llama.cpp's HunyuanVLTextModel converter writes hunyuan_vl ----------------------------------------


def write_hunyuan_vl_gguf(hf, path: str) -> None:
    """The text model's GGUF llama.cpp's converter makes of transformers' HunYuan-VL `hf` (F32): TextModel's keys
    (the head size as key/value length), then (XD-RoPE: type "dynamic" with sections, which it renames "xdrope")
    the base unscaled, rope.scaling.alpha, scaling type none, the factor, the context as both lengths and the
    sections; Hunyuan's tensors (q/k not permuted), no output tensor for the tied head."""
    import gguf
    from gguf_mimic import add_toy_vocab

    c, w = hf.config.text_config, gguf.GGUFWriter(path, "hunyuan_vl")
    rope = c.rope_parameters
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_scaling_alpha(float(rope["alpha"]))
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    w.add_rope_scaling_factor(float(rope.get("factor", 1)))
    w.add_rope_scaling_orig_ctx_len(c.max_position_embeddings)
    w.add_rope_dimension_sections(list(rope["mrope_section"]))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.HUNYUAN_VL, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if not name.startswith("model.language_model."):
            continue  # the vision tower (the mmproj file's) and the tied head
        base, kind = name.replace("model.language_model.", "model.").rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_in_and_out_with_llama_cpp(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as the family with transformers' logits and the config read back (the alpha,
    the sections, the unscaled base); autolm's GGUF out reads back equal; llama.cpp runs both files with logits
    close to autolm's."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    _, hf = GGUF_FAMILY.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_hunyuan_vl_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "HunYuanVLForCausalLM"
    c = model.config
    assert c.rope_parameters == {"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0,
                                 "mrope_section": [2, 2, 2, 2]}  # fmt: skip
    assert (c.head_dim, c.num_key_value_heads, c.max_position_embeddings) == (16, 2, 64)
    assert c.tie_word_embeddings and not c.attention_bias
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        row = model(ROW).logits[0]
    out = save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert back.config.rope_parameters == c.rope_parameters
    with torch.no_grad():
        torch.testing.assert_close(back(ROW).logits[0], row, atol=1e-5, rtol=1e-5)
    _close_to_llama_cpp(row, llama_cpp_logits(path))
    _close_to_llama_cpp(row, llama_cpp_logits(out))


@pytest.mark.parametrize(
    "name, key", [("hunyuan", "attention_bias"), ("dynamic", "RoPE")], ids=["biases", "dynamic"]
)
def test_gguf_out_refuses_what_llama_cpp_computes_otherwise(
    tmp_path_factory,
    tmp_path,
    merged_tokenizer,  # noqa: F811
    name,
    key,
):
    """Refused by name, no file: attention biases (llama.cpp's hunyuan_vl reads none); dynamic NTK scaling without
    an alpha (the file can hold only a fixed base)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FAMILIES[name].checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match=key):
        save_gguf(model, merged_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert os.listdir(tmp_path) == []
