"""GLM-OCR's language model (glm_ocr: the image-text checkpoints, text_config glm_ocr_text) against transformers'
GlmOcrForConditionalGeneration (a tiny vision tower) and peft. GLM-OCR's text layer is GLM-4V's without q/k/v biases,
with a head_dim of its own (32 over 64 / 4 heads here) and multimodal RoPE over interleaved pairs rotating the whole
head (plain RoPE on text): autolm's GLM-4 (glm4) runs it and saves it as the glm4 text model transformers'
Glm4ForCausalLM loads. A variant with head_dim hidden / heads, partial rotation and a head tied by text_config (as
files before transformers 5 hold it). The battery, the next-token-prediction layer the Hub's files hold (skipped, in
safetensors and in GGUF), GLM-OCR's text defaults, and GGUF as llama.cpp's GlmOCRModel converter writes "glm4" (q/k
rows regrouped for its multimodal RoPE, the layer counted in block_count), with llama.cpp's own logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.models import GlmOcrConfig

# transformers maps glm_ocr to no causal-LM auto class; its image-text model is the causal LM the battery runs
transformers.AutoModelForCausalLM.register(
    transformers.GlmOcrConfig, transformers.GlmOcrForConditionalGeneration, exist_ok=True
)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4)
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TEXT = dict(TOKENS, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})  # fmt: skip
_TARGETS = [
    "q_proj",
    "v_proj",
    "o_proj",
]  # peft has no default for glm_ocr; the tower's MLP shares gate/up/down
OCR = Family("GlmOcrConfig", dict(text_config=TEXT, vision_config=VISION), lora_targets=_TARGETS)
VARIANT = Family(
    "GlmOcrConfig",
    dict(text_config=dict({k: v for k, v in TEXT.items() if k != "head_dim"}, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                           "mrope_section": [2, 1, 1]}),
         vision_config=VISION),
    lora_targets=_TARGETS,
)  # fmt: skip
FAMILIES = {"ocr": OCR, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    OCR.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    OCR.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    """An adapter peft made on the image-text model (model.language_model.* names) gives peft's logits in autolm;
    autolm saves it under the text model's names, which peft loads over the saved glm4 text model (transformers'
    Glm4ForCausalLM) with the same logits; merged, the same."""
    import peft
    from family_checks import _randomize_lora

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=5)
    real, pos = mask.bool(), positions(mask)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS))
    _randomize_lora(pm)
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
    pm.unload()
    autolm.AutoModelForCausalLM.from_pretrained(directory).save_pretrained(tmp_path / "text")
    ours = autolm.PeftModel.from_pretrained(autolm.AutoModelForCausalLM.from_pretrained(directory),
                                            str(tmp_path / "peft"))  # fmt: skip
    text = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits[real], expected, atol=1e-4, rtol=1e-4
        )
        ours.save_pretrained(tmp_path / "ours")
        back = peft.PeftModel.from_pretrained(text, str(tmp_path / "ours"))
        again = back(input_ids=ids, attention_mask=mask, position_ids=pos).logits[real]
        torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)
        merged = ours.merge_and_unload()(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    OCR.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    OCR.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_text_model_is_glm4(tmp_path_factory, tmp_path, name):
    """check_save (saved, transformers' AutoModelForCausalLM loads it, as Glm4ForCausalLM, with equal logits; autolm
    loads it back bit-identical); the language model's tensors under transformers' text names, no q/k/v biases, the
    head tied as the wrapper ties it, head_dim and the rotary share as GLM-OCR reads them."""
    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model).__name__ == "Glm4ForCausalLM" and model.config.model_type == "glm4"
    prefix = "model.language_model."
    theirs = {k.replace(prefix, "model."): tuple(v.shape) for k, v in hf.state_dict().items()
              if k.startswith(prefix) or k == "lm_head.weight"}  # fmt: skip
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert not any(k.endswith("q_proj.bias") for k in theirs)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "variant") == hf.config.tie_word_embeddings
    c = model.config
    assert (c.head_dim, c.rope_parameters["partial_rotary_factor"]) == (
        (32, 1.0) if name == "ocr" else (16, 0.5)
    )
    assert transformers.AutoConfig.from_pretrained(tmp_path / "saved").model_type == "glm4"


def _with_nextn(directory: str, hf, out) -> None:
    """The checkpoint as the Hub's files hold GLM-OCR: a next-token-prediction layer at model.language_model.layers.
    <num_hidden_layers> (a copy of the last layer, its eh_proj and norms) and num_nextn_predict_layers 1."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, out)
    tensors = load_file(f"{directory}/model.safetensors")
    n, h = hf.config.text_config.num_hidden_layers, hf.config.text_config.hidden_size
    last = f".layers.{n - 1}."
    extra = {k.replace(last, f".layers.{n}."): v.clone() for k, v in tensors.items() if last in k}
    stem = f"model.language_model.layers.{n}."
    extra.update({f"{stem}eh_proj.weight": torch.randn(h, 2 * h), f"{stem}enorm.weight": torch.ones(h),
                  f"{stem}hnorm.weight": torch.ones(h), f"{stem}shared_head.norm.weight": torch.ones(h)})  # fmt: skip
    save_file({**tensors, **extra}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(config))


def test_nextn_layer_is_not_loaded(tmp_path_factory, tmp_path):
    """The Hub's next-token-prediction layer is skipped, silently, as transformers does: the same logits."""
    directory, hf = OCR.checkpoint(tmp_path_factory)
    _with_nextn(directory, hf, tmp_path / "mtp")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp")
    assert model.load_report.notes == autolm.AutoModelForCausalLM.from_pretrained(directory).load_report.notes
    assert len(model.model.layers) == 2
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_text_defaults_and_tying():
    """GLM-OCR's text defaults where text_config leaves them out are transformers' GlmOcrTextConfig's (head_dim
    hidden / heads, whole-head rotation, no biases whatever text_config says); the head is tied by the outer config
    or, as older files hold it, by text_config."""
    ours = GlmOcrConfig(text_config={"attention_bias": True})
    theirs = transformers.GlmOcrConfig().text_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "pad_token_id"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours.rope_parameters["partial_rotary_factor"] == 1.0 and ours.attention_bias is False
    for outer, text in ((None, None), (None, True), (True, False), (False, True), (False, False)):
        d = {"text_config": dict(TEXT, **({} if text is None else {"tie_word_embeddings": text}))}
        if outer is not None:
            d["tie_word_embeddings"] = outer
        tied = transformers.GlmOcrConfig(**json.loads(json.dumps(d))).tie_word_embeddings
        assert GlmOcrConfig.from_dict(d).tie_word_embeddings == tied, (outer, text)


# ---- GGUF, as llama.cpp's GlmOCRModel converter writes glm4 ------------------------------------------------------


def _regrouped(a: np.ndarray, head_dim: int) -> np.ndarray:
    """conversion/glm.py's Glm4Model.normal_to_neox of q's / k's rows (whole-head rotation): per head, the even
    rows, then the odd ones."""
    heads = a.reshape(-1, head_dim, *a.shape[1:])
    return np.concatenate([heads[:, 0::2], heads[:, 1::2]], axis=1).reshape(a.shape)


def write_glm_ocr_gguf(directory: str, hf, path: str) -> None:
    """The GGUF llama.cpp's GlmOCRModel converter makes of the checkpoint at `directory` (F32): TextModel's keys with
    block_count counting the next-token-prediction layer, the head size as key/value length, the rotary dimensions,
    the RoPE sections, nextn_predict_layers; the language model's tensors by gguf-py's map (the nextn layer's as
    blk.<n>.nextn.*), q's and k's rows regrouped; an output tensor for the untied head."""
    import gguf
    from gguf_mimic import add_text_model, add_toy_vocab
    from safetensors.torch import load_file

    c = hf.config.text_config
    w = gguf.GGUFWriter(path, "glm4")
    add_text_model(w, c, c.num_hidden_layers + 1)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_dimension_sections([*c.rope_parameters["mrope_section"], 0])
    w.add_nextn_predict_layers(1)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4, c.num_hidden_layers + 1)
    for name, t in load_file(f"{directory}/model.safetensors").items():
        if not (name.startswith("model.language_model.") or name == "lm_head.weight"):
            continue  # the vision tower (the mmproj file's)
        base, kind = name.replace("model.language_model.", "model.").rsplit(".", 1)
        a = np.ascontiguousarray(t.float().numpy())
        if base.endswith(("q_proj", "k_proj")):
            a = _regrouped(a, c.head_dim)
        w.add_tensor(f"{names.get_name(base)}.{kind}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_with_llama_cpp(tmp_path_factory, tmp_path):
    """The converter's file of a Hub-like checkpoint (with its next-token-prediction layer) loads as Glm4ForCausalLM
    with transformers' logits: the layer left out, the sections kept, q/k rows in the model's order; llama.cpp runs
    the same file with logits close to autolm's."""
    from test_gguf_remote_archs import ROW, _close_to_llama_cpp, llama_cpp_logits

    from autolm.sources.gguf import GGUFFile

    directory, hf = OCR.checkpoint(tmp_path_factory)
    _with_nextn(directory, hf, tmp_path / "mtp")
    path = str(tmp_path / "model.gguf")
    write_glm_ocr_gguf(str(tmp_path / "mtp"), hf, path)
    assert "blk.2.nextn.eh_proj.weight" in {t.name for t in GGUFFile(path).tensors}
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c = model.config
    assert type(model).__name__ == "Glm4ForCausalLM" and c.num_hidden_layers == 2
    assert (c.head_dim, c.rope_parameters["partial_rotary_factor"], c.rope_parameters["mrope_section"]) == (
        32, 1.0, [4, 6, 6]
    )  # fmt: skip
    assert not c.attention_bias and not c.tie_word_embeddings
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        row = model(ROW).logits[0]
    _close_to_llama_cpp(row, llama_cpp_logits(path))
