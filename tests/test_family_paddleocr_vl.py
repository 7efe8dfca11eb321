"""PaddleOCR-VL's language model (paddleocr_vl_text; paddleocr_vl: the image-text checkpoints) against transformers'
PaddleOCRVLForConditionalGeneration (a tiny vision tower; transformers has no text-only causal LM: its
PaddleOCRTextModel carries the head's hidden states) and peft. ERNIE 4.5's layer with Qwen 2 VL's multimodal RoPE
over halves (plain RoPE on text), head_dim 32 over 64 / 4 heads; a variant with every bias (`use_bias`), an untied
head and as many KV heads as heads. The battery, the files' own layout (projector as mlp_AR.*, tower as visual.*),
the text model saved (transformers' PaddleOCRTextModel loads it), the config as transformers reads it (the Hub's flat
file, the tie rule, defaults), and GGUF as llama.cpp's PaddleOCRModel converter writes "paddleocr" (in and out),
with llama.cpp's own logits on both files."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import merged_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import PaddleOCRTextConfig, PaddleOCRVLConfig

# transformers maps paddleocr_vl to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.PaddleOCRVLConfig, transformers.PaddleOCRVLForConditionalGeneration, exist_ok=True
)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
              image_size=16)  # fmt: skip
ROPE = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 6, 6]}
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=64, rope_parameters=ROPE)  # fmt: skip
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# the text settings passed flat, as transformers' config takes the Hub's files (it nests them as text_config)
PADDLE = Family("PaddleOCRVLConfig", dict(SIZES, vision_config=VISION), lora_targets=["o_proj", "gate_proj"])
VARIANT = Family(
    "PaddleOCRVLConfig",
    dict(text_config=dict(SIZES, **TOKENS, use_bias=True, num_key_value_heads=4, tie_word_embeddings=False,
                          rope_parameters={**ROPE, "mrope_section": [8, 4, 4]}),
         vision_config=VISION, tie_word_embeddings=False),
    lora_targets=["o_proj", "up_proj", "down_proj"],
)  # fmt: skip
FAMILIES = {"paddle": PADDLE, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    PADDLE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    VARIANT.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    PADDLE.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    PADDLE.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_transformers(tmp_path_factory, tmp_path, name):
    """The checkpoint as transformers writes it (the files' own layout: model.*, visual.*, mlp_AR.*) loads as
    PaddleOCRVLForCausalLM under transformers' text names, halves rotated, the head tied as the wrapper ties it;
    saved, it is the paddleocr_vl_text model: text_config's keys and values, transformers' PaddleOCRTextModel loads
    it with hidden states whose head gives autolm's logits, and autolm loads it back bit-identical."""
    from safetensors import safe_open

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    with safe_open(f"{directory}/model.safetensors", "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} >= {"mlp_AR", "visual", "model"}  # noqa: SIM118
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "PaddleOCRVLForCausalLM" and model.config.model_type == "paddleocr_vl_text"
    assert not any(layer.self_attn.rope_interleaved for layer in model.model.layers)
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "paddle") == hf.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())["text_config"]
    for d in (written, original):
        for key in ("transformers_version", "architectures", "dtype", "tie_word_embeddings"):
            d.pop(key, None)
    assert written == original
    text = transformers.PaddleOCRTextModel.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        hidden = text(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state[real]
        torch.testing.assert_close(ours, hidden @ model.lm_head.weight.T, atol=1e-4, rtol=1e-4)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())


def test_config_as_transformers_reads_it():
    """PaddleOCRTextConfig() holds transformers' defaults; the Hub's flat file (text settings at the top level, the
    sections in rope_scaling) reads as transformers reads it; the head is tied unless both configs untie it; a bad
    mrope_section names the key."""
    check_config_defaults(PaddleOCRTextConfig)
    hub = {"model_type": "paddleocr_vl", **TOKENS, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
           "num_hidden_layers": 2, "intermediate_size": 96, "rope_theta": 5e5, "vision_start_token_id": 5,
           "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [4, 6, 6]},
           "vision_config": VISION}  # fmt: skip
    ours, theirs = (
        PaddleOCRVLConfig.from_dict(copy.deepcopy(hub)),
        transformers.PaddleOCRVLConfig(**copy.deepcopy(hub)),
    )
    assert type(ours).__name__ == "PaddleOCRTextConfig"
    for key in ("hidden_size", "head_dim", "num_hidden_layers", "intermediate_size", "vocab_size"):
        assert getattr(ours, key) == getattr(theirs.text_config, key), key
    assert ours.rope_parameters["rope_theta"] == theirs.text_config.rope_parameters["rope_theta"] == 5e5
    assert "vision_start_token_id" not in ours.extra and "vision_config" not in ours.extra
    for outer, text in ((None, None), (False, None), (None, False), (False, False), (True, False)):
        d = {"text_config": dict(SIZES, **({} if text is None else {"tie_word_embeddings": text}))}
        if outer is not None:
            d["tie_word_embeddings"] = outer
        tied = transformers.PaddleOCRVLConfig(**copy.deepcopy(d)).tie_word_embeddings
        assert PaddleOCRVLConfig.from_dict(d).tie_word_embeddings == tied, (outer, text)
    with pytest.raises(ConfigError, match="mrope_section"):
        PaddleOCRTextConfig.from_dict(dict(SIZES, rope_parameters={**ROPE, "mrope_section": [4, "x"]}))


# ---- GGUF, as llama.cpp's PaddleOCRModel converter writes paddleocr ----------------------------------------------


def write_paddleocr_gguf(hf, path: str) -> None:
    """The text model's GGUF llama.cpp's converter makes of transformers' PaddleOCR-VL `hf` (F32): TextModel's keys
    (the head size as key/value length), the RoPE sections (four, the last 0); ERNIE 4.5's tensors by gguf-py's map
    (q/k not permuted), no output tensor for the tied head."""
    import gguf
    from gguf_mimic import add_text_model, add_toy_vocab

    c, w = hf.config.text_config, gguf.GGUFWriter(path, "paddleocr")
    add_text_model(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_sections([*c.rope_parameters["mrope_section"], 0])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PADDLEOCR, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if not name.startswith("model.language_model."):
            continue  # the vision tower and projector (the mmproj file's) and the tied head
        base, kind = name.replace("model.language_model.", "model.").rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_in_and_out_with_llama_cpp(tmp_path_factory, tmp_path, merged_tokenizer):  # noqa: F811
    """The converter's file loads as PaddleOCRVLForCausalLM with transformers' logits and the config read back (the
    sections, the head size, no biases, the tied head); autolm's GGUF out reads back equal; llama.cpp runs both
    files with logits close to autolm's. An MLP-biased model (use_bias) is refused, no file written."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.gguf_writer import save_gguf

    _, hf = PADDLE.checkpoint(tmp_path_factory)
    path = str(tmp_path / "model.gguf")
    write_paddleocr_gguf(hf, path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "PaddleOCRVLForCausalLM"
    c = model.config
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 6, 6]}
    assert (c.head_dim, c.num_key_value_heads, c.tie_word_embeddings, c.use_bias) == (32, 2, True, False)
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
    biased = autolm.AutoModelForCausalLM.from_pretrained(VARIANT.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="use_bias"):
        save_gguf(biased, merged_tokenizer, str(tmp_path / "refused" / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "refused" / "out.gguf")
