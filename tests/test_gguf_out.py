"""GGUF out (autolm convert DIR OUT.gguf): a model written in llama.cpp's layout, names, permutation and block
types loads back with the same logits (exactly in F32; within the type's rounding when quantized), and the
tokenizer's metadata is what llama.cpp's converter wrote for the real model."""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch

import autolm
from autolm.errors import ConfigError
from autolm.gguf_writer import save_gguf
from autolm.sources.gguf import GGUFFile

IDS = torch.tensor([[5, 17, 33, 2, 98, 140, 7, 61, 120, 9, 44]])
# families llama.cpp's converter writes as another's architecture: their files read back as that family
READ_AS = {
    "mistral": "llama",
    "internlm3": "llama",
    "iquestcoder": "llama",
    "gemma4_unified_text": "gemma4_text",
}


@pytest.fixture(scope="module")
def smol_tokenizer(smol_gguf):
    return autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])


def _gguf_model(path: str, **kw):
    return autolm.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), progress=False, **kw
    )


@pytest.mark.parametrize("name", ["mistral", "qwen2_tied_bias", "qwen3"])
def test_f32_round_trip_gives_the_same_logits(checkpoint, tmp_path, smol_tokenizer, name):
    """Llama-permuted q/k (Mistral, written as "llama"), biases and tied embeddings (Qwen 2), q/k norms (Qwen 3)."""
    directory, _ = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), "f32")
    back = _gguf_model(path)
    assert back.config.model_type == READ_AS.get(name, model.config.model_type)
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_llama3_rope_goes_out_as_rope_freqs_and_comes_back(checkpoint, tmp_path, smol_tokenizer):
    """Llama 3's RoPE scaling: written as llama.cpp's converter writes it (a rope_freqs tensor, each frequency's
    divisor), read back as per-dimension factors that compute the same rotation."""
    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    path = save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), "f32")
    g = GGUFFile(path)
    freqs = next(t for t in g.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(g.values(freqs), dtype=np.float32)
    factor = model.config.rope_parameters["factor"]
    assert factors.shape == (model.config.head_dim // 2,) and 1.0 <= factors.min() < factors.max() == factor
    back = _gguf_model(path)
    assert back.config.rope_parameters["short_factor"] == pytest.approx(factors.tolist())
    with torch.no_grad():
        want = model(IDS).logits
        torch.testing.assert_close(back(IDS).logits, want, rtol=1e-5, atol=1e-5)
        assert (
            _plain_rope(directory, tmp_path)(IDS).logits - want
        ).abs().max() > 1e-3  # the scaling matters here


def _plain_rope(directory: str, tmp_path) -> torch.nn.Module:
    """The checkpoint with its RoPE scaling taken out of config.json."""
    plain = tmp_path / "plain"
    shutil.copytree(directory, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    cfg.pop("rope_scaling", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    return autolm.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)


def exact_kernels(monkeypatch):
    """The kept layers on torch's float kernels (the C++ kernel rounds activations to int8, as llama.cpp does;
    tests/test_gguf_blocks.py pins it): kept and dequantized models then agree within float rounding."""
    from autolm.kernels import native

    monkeypatch.setattr(native, "computes", lambda kind, columns: False)


def test_q8_0_writes_llama_cpp_blocks(checkpoint, tmp_path, smol_tokenizer, monkeypatch):
    exact_kernels(monkeypatch)
    directory, _ = checkpoint("mistral")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), "q8_0")
    g = GGUFFile(path)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in g.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert g.metadata["general.file_type"] == 7 and g.metadata["general.architecture"] == "llama"
    down = next(t for t in g.tensors if t.name == "blk.1.ffn_down.weight")
    w = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(
        np.asarray(down.data), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    )
    kept_model = _gguf_model(path, quantization="gguf")
    kept_model.kv_cache_dtype = torch.float32  # float rounding alone (float16 is llama.cpp's cache)
    with torch.no_grad():
        want, kept = model(IDS).logits, kept_model(IDS).logits
        dequantized = _gguf_model(path)(IDS).logits
    torch.testing.assert_close(kept, dequantized, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(dequantized, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_tokenizer_metadata_is_what_llama_cpp_wrote(smol_gguf, smol_tokenizer, tmp_path):
    """The real model out again: vocabulary, token types, merges, special ids, llama.cpp's pre-tokenizer name
    (found by its converter's hash) and the chat template equal the file llama.cpp's converter made."""
    source = os.path.join(*smol_gguf)
    path = save_gguf(_gguf_model(source), smol_tokenizer, str(tmp_path / "smol.gguf"), "f16")
    a, b = GGUFFile(source).metadata, GGUFFile(path).metadata
    keys = [k for k in a if k.startswith(("tokenizer.", "llama.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert len(keys) > 15 and b["tokenizer.ggml.pre"] == "smollm"
    assert {k: b.get(k) for k in keys} == {k: a[k] for k in keys}
    back = autolm.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol.gguf")
    text = "Hello, world! What is the capital of France?"
    assert back.encode(text) == smol_tokenizer.encode(text)


def test_refusals_are_clear(checkpoint, tmp_path, smol_tokenizer):
    directory, _ = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with pytest.raises(ConfigError, match="q3_k"):
        save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), "q3_k")
    quantized = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization="int8")
    with pytest.raises(ConfigError, match="float weights"):
        save_gguf(quantized, smol_tokenizer, str(tmp_path / "m.gguf"), "f16")
    assert not os.path.exists(tmp_path / "m.gguf")


def test_cli_convert_writes_a_gguf(checkpoint, tmp_path, smol_tokenizer):
    from autolm.cli import main

    directory, _ = checkpoint("qwen2_tied_bias")
    smol_tokenizer.save_pretrained(directory)
    out = str(tmp_path / "q.gguf")
    assert main(["convert", directory, out, "--quantize", "q8_0"]) == 0
    assert GGUFFile(out).metadata["general.file_type"] == 7
    assert main(["convert", directory, out, "--quantize", "int4"]) == 1


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_are_llama_cpp_blocks(checkpoint, tmp_path, smol_tokenizer, kind, monkeypatch):
    """Q4_K / Q5_K / Q6_K written here dequantize (gguf's reference code) to within their step of the weights;
    rows that are not whole 256-blocks fall back as llama.cpp does; the file loads kept and dequantized alike."""
    exact_kernels(monkeypatch)
    from autolm.kernels.ggml_quantize import quantize_k, quantize_q6_k

    w = np.random.default_rng(0).normal(0, 0.05, (64, 512)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    write = {"q4_k": quantize_k, "q5_k": lambda a: quantize_k(a, bits=5), "q6_k": quantize_q6_k}[kind]
    back = gguf.quants.dequantize(write(w), qtype)
    assert np.abs(back - w).mean() < {"q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.03}[kind] * np.abs(w).mean()
    directory, _ = checkpoint("mistral")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), kind)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in GGUFFile(path).tensors}
    assert (
        types["blk.0.ffn_down.weight"] == {"q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0"}[kind]
    )  # rows of 96
    with torch.no_grad():
        kept = _gguf_model(path, quantization="gguf")(IDS).logits
        dequantized = _gguf_model(path)(IDS).logits
    torch.testing.assert_close(kept, dequantized, rtol=0.02, atol=0.02 * dequantized.abs().max().item())


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_sentencepiece_vocabulary_round_trips(tmp_path, style):
    """A SentencePiece-style vocabulary (Llama 2 / Mistral: Metaspace; Phi-3: a normalizer) goes out as llama.cpp's
    "llama" model: scores in the merges' order and no merges, byte tokens typed BYTE, the prefix space as
    add_space_prefix; autolm and transformers read the file back as the same tokenizer (merges from the scores),
    and the model with the same logits. (That llama.cpp tokenizes it alike: tests/test_gguf_llamacpp.py.)"""
    import transformers
    from spm_tokenizer import SPECIALS, write_spm_checkpoint

    write_spm_checkpoint(str(tmp_path), style)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path)
    path = save_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    meta = GGUFFile(path).metadata
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[: len(SPECIALS) + 256] == [2, 3, 3] + [6] * 256  # <unk>, <s>, </s>, the bytes
    merged = scores[len(SPECIALS) + 256 :]
    assert max(merged) < 0 and len(set(merged)) > 50  # one score per merge rank
    back = autolm.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    with open(os.path.join(os.path.dirname(__file__), "data", "english.txt")) as f:
        long = f.read()[:1500]
    for text in ["hello world", " x", "Unicode: \u00e9 \u2713 \u6f22\u5b57\n\n  tabs\t", long]:
        ids = tok.encode(text)
        assert back.encode(text) == theirs.encode(text) == ids, text
        assert back.decode(ids) == tok.decode(ids)
    with torch.no_grad():
        torch.testing.assert_close(_gguf_model(path)(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_q4_k_m_gives_attn_v_and_ffn_down_more_bits_where_llama_cpp_does(
    checkpoint, tmp_path, smol_tokenizer
):
    """llama.cpp's Q4_K_M mix on two layers: use_more_bits picks the last one (7 * 2 / 8 = 1), whose attn_v and
    ffn_down get Q6_K (Q8_0, rows of 64 / 96 not being whole 256-blocks), the others Q4_K (Q5_0); file type 15.
    (Tensor by tensor against llama.cpp's own quantizer: tests/test_gguf_llamacpp.py.)"""
    directory, _ = checkpoint("mistral")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, smol_tokenizer, str(tmp_path / "m.gguf"), "q4_k_m")
    g = GGUFFile(path)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in g.tensors}
    assert g.metadata["general.file_type"] == 15
    for name in ("attn_v", "ffn_down"):
        assert (types[f"blk.0.{name}.weight"], types[f"blk.1.{name}.weight"]) == ("Q5_0", "Q8_0"), name
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q5_0"


# ---- every family: the converter's file, read back as the model ----------------------------------------------


def _byte_level(tmp_path_factory, merges: list[tuple[str, str]]):
    """A tiny byte-level BPE tokenizer: <pad>, <s>, </s>, the 256 bytes, then each merge's token."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update(
        (c, len(vocab)) for c in [*sorted(pre_tokenizers.ByteLevel.alphabet()), *map("".join, merges)]
    )
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    d = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """No merges: the vocabulary a save_gguf of a tiny checkpoint writes fast."""
    return _byte_level(tmp_path_factory, [])


@pytest.fixture(scope="module")
def merged_tokenizer(tmp_path_factory):
    """One merge: llama.cpp loads a "gpt2" vocabulary only with its merges key, which no merges leave out."""
    return _byte_level(tmp_path_factory, [("a", "b")])


def _families():
    """model_type -> (a tiny checkpoint llama.cpp's format can hold, or a tuple of them (its variants), the
    test-side converter mimic writing the file convert_hf_to_gguf.py makes of it (hf model, path), or None where
    there is none)."""
    import test_deepseek_ocr2_gguf as deepseek_ocr2
    import test_family_afmoe as afmoe
    import test_family_apertus as apertus
    import test_family_arcee as arcee
    import test_family_bailing_hybrid as bailing_hybrid
    import test_family_bamba as bamba
    import test_family_bloom as bloom
    import test_family_chameleon as chameleon
    import test_family_cohere as cohere
    import test_family_cohere2 as cohere2
    import test_family_cohere2_moe as cohere2_moe
    import test_family_dbrx as dbrx
    import test_family_deepseek_v2 as deepseek_v2
    import test_family_deepseek_v3 as deepseek_v3
    import test_family_deepseek_v4 as deepseek_v4
    import test_family_deepseek_v32 as deepseek_v32
    import test_family_dots1 as dots1
    import test_family_dots3_note as dots3_note
    import test_family_ernie4_5 as ernie
    import test_family_ernie4_5_moe as ernie_moe
    import test_family_exaone4 as exaone4
    import test_family_exaone_moe as exaone_moe
    import test_family_falcon as falcon
    import test_family_falcon_h1 as falcon_h1
    import test_family_falcon_mamba as falcon_mamba
    import test_family_gemma as gemma
    import test_family_gemma1 as gemma1
    import test_family_gemma3n as gemma3n
    import test_family_gemma4_gguf as gemma4
    import test_family_gemma4_unified as gemma4_unified
    import test_family_glm as glm
    import test_family_glm4 as glm4
    import test_family_glm4_moe as glm4_moe
    import test_family_glm4_moe_lite as glm4_moe_lite
    import test_family_glm5_next as glm5_next
    import test_family_glm_moe_dsa as glm_moe_dsa
    import test_family_gpt2 as gpt2
    import test_family_gpt_bigcode as bigcode
    import test_family_gpt_neox as neox
    import test_family_granite as granite
    import test_family_granite_swa as granite_swa
    import test_family_granitemoe as granitemoe
    import test_family_granitemoe_swa as granitemoe_swa
    import test_family_granitemoehybrid as granitemoehybrid
    import test_family_granitemoeshared as granitemoeshared
    import test_family_hrm_text as hrm_text
    import test_family_hunyuan_v1_dense as hunyuan
    import test_family_hunyuan_v1_moe as hunyuan_moe
    import test_family_hunyuan_vl as hunyuan_vl
    import test_family_hy_v3 as hy_v3
    import test_family_hy_v4 as hy_v4
    import test_family_internlm3 as internlm3
    import test_family_iquestcoder as iquestcoder
    import test_family_jais2 as jais2
    import test_family_jamba as jamba
    import test_family_kimi_linear as kimi_linear
    import test_family_laguna as laguna
    import test_family_lfm2 as lfm2
    import test_family_lfm2_moe as lfm2_moe
    import test_family_llama4 as llama4
    import test_family_mamba as mamba
    import test_family_mamba2 as mamba2
    import test_family_mellum as mellum
    import test_family_mimo_v2_flash as mimo_v2_flash
    import test_family_minicpm3 as minicpm3
    import test_family_minimax as minimax
    import test_family_minimax_m2 as minimax_m2
    import test_family_minimax_m3 as minimax_m3
    import test_family_ministral3 as ministral3
    import test_family_mistral4 as mistral4
    import test_family_moe as moe
    import test_family_mpt as mpt
    import test_family_nemotron as nemotron
    import test_family_nemotron_h as nemotron_h
    import test_family_nemotron_h_moe_gguf as nemotron_h_moe
    import test_family_olmo as olmo
    import test_family_olmo2 as olmo2
    import test_family_olmo3 as olmo3
    import test_family_olmoe as olmoe
    import test_family_paddleocr_vl as paddleocr_vl
    import test_family_phi as phi
    import test_family_phi3 as phi3
    import test_family_phimoe as phimoe
    import test_family_qwen3_5 as qwen3_5
    import test_family_qwen3_5_moe as qwen3_5_moe
    import test_family_qwen3_next as qwen3_next
    import test_family_seed_oss as seed_oss
    import test_family_smollm3 as smollm3
    import test_family_solar_open as solar_open
    import test_family_stablelm as stablelm
    import test_family_starcoder2 as starcoder2
    import test_family_step3p5 as step3p5
    import test_family_youtu as youtu
    import test_muse_glimmer_gguf as muse_glimmer
    from conftest import SPECS
    from family_checks import Family
    from gguf_llamacpp import write_gguf
    from gguf_moe import write_moe_gguf

    def spec(name):
        return Family(SPECS[name][0], SPECS[name][1])

    def gpt2_writer(hf, path):
        gpt2.write_gpt2_gguf(hf.name_or_path, path)

    return {
        "llama": (spec("llama_linear"), None),
        "mistral": (spec("mistral"), None),
        "qwen2": (spec("qwen2_tied_bias"), None),
        "qwen3": (spec("qwen3"), None),
        "gemma2": (gemma.GGUF_FAMILIES["gemma2"], gemma.write_gguf),
        "gemma3_text": (gemma.GGUF_FAMILIES["gemma3"], gemma.write_gguf),
        "phi3": (phi3.PHI3, write_gguf),
        "olmo2": (olmo2.OLMO2_GGUF, write_gguf),
        "granite": (granite.GRANITE, write_gguf),
        "smollm3": (smollm3.SMOLLM3_GGUF, write_gguf),
        **{name: (moe.GGUF_FAMILIES[name], write_moe_gguf) for name in moe.GGUF_FAMILIES},
        "gpt2": (gpt2.GPT2, gpt2_writer),
        "gemma": (gemma1.GEMMA, gemma1.write_gguf),
        "starcoder2": (starcoder2.GGUF_VARIANT, write_gguf),
        "phi": (phi.PHI, write_gguf),
        "gpt_neox": (neox.NEOX, lambda hf, path: neox.write_gptneox_gguf(hf.name_or_path, hf, path)),
        "olmo": (olmo.OLMO, olmo.write_olmo_gguf),
        "stablelm": (tuple(stablelm.FAMILIES.values()), stablelm.write_stablelm_gguf),
        "granitemoe": (granitemoe.GRANITEMOE, granitemoe.write_granitemoe_gguf),
        "cohere": ((cohere.COHERE, cohere.QK64), cohere.write_cohere_gguf),
        "chameleon": (chameleon.GGUF_FAMILIES[0], chameleon.write_chameleon_gguf),  # no swin_norm: refused
        "olmoe": (olmoe.PLAIN, olmoe.write_olmoe_gguf),  # llama.cpp's olmoe clamps and renormalises nothing
        "glm4": (tuple(glm4.FAMILIES.values()), glm4.write_glm4_gguf),
        "olmo3": ((olmo3.OLMO3_GGUF, olmo3.OLMO3_YARN_GGUF), olmo3.write_olmo3_gguf),
        "exaone4": ((exaone4.EXAONE4_1B_GGUF, exaone4.EXAONE4_32B_GGUF), exaone4.write_exaone4_gguf),
        "ernie4_5": (ernie.ERNIE, ernie.write_ernie4_5_gguf),
        "nemotron": (tuple(nemotron.FAMILIES.values()), nemotron.write_nemotron_gguf),
        "arcee": ((arcee.ARCEE, arcee.YARN_FAMILY), arcee.write_arcee_gguf),
        "glm4_moe": (glm4_moe.PLAIN, glm4_moe.write_glm4moe_gguf),
        "dots1": (dots1.PLAIN, dots1.write_dots1_gguf),
        "deepseek_v2": (tuple(deepseek_v2.GGUF_FAMILIES.values()), deepseek_v2.write_deepseek_v2_gguf),
        "deepseek_v3": (tuple(deepseek_v3.GGUF_FAMILIES.values()), deepseek_v3.write_deepseek_v3_gguf),
        "deepseek_v32": (deepseek_v32.GGUF_FAMILY, deepseek_v32.write_deepseek_v32_gguf),
        "glm_moe_dsa": (glm_moe_dsa.GGUF_FAMILY, glm_moe_dsa.write_glm_moe_dsa_gguf),
        "glm5_next_text": (glm5_next.GGUF_FAMILY, glm5_next.write_glm5_next_gguf),
        "ernie4_5_moe": (ernie_moe.ERNIE_MOE, ernie_moe.write_ernie4_5_moe_gguf),
        "seed_oss": ((seed_oss.GGUF_FAMILY, seed_oss.TIED), seed_oss.write_seed_oss_gguf),
        "hunyuan_v1_dense": (hunyuan.GGUF_FAMILY, hunyuan.write_hunyuan_gguf),
        "hunyuan_vl_text": (hunyuan_vl.GGUF_FAMILY, hunyuan_vl.write_hunyuan_vl_gguf),
        "gpt_bigcode": (bigcode.MQA, bigcode.write_starcoder_gguf),
        "ministral3": (ministral3.MINISTRAL3, ministral3.write_ministral3_gguf),
        "mistral4": (mistral4.LATE, mistral4.write_mistral4_gguf),
        "minimax_m2": (minimax_m2.M2, minimax_m2.write_minimax_m2_gguf),
        "minimax_m3_vl_text": (minimax_m3.GGUF_FAMILY, minimax_m3.write_minimax_m3_gguf),
        "muse_glimmer_text": (muse_glimmer.GGUF_FAMILY, muse_glimmer.write_muse_glimmer_gguf),
        "minimax": (minimax.GGUF_FAMILY, minimax.write_minimax_gguf),
        "minicpm3": (tuple(minicpm3.GGUF_FAMILIES.values()), minicpm3.write_minicpm3_gguf),
        "granitemoe_swa": (tuple(granitemoe_swa.GGUF_FAMILIES.values()), granite_swa.write_granite_swa_gguf),
        "granite_swa": (granite_swa.GRANITE_SWA_GGUF, granite_swa.write_granite_swa_gguf),
        "internlm3": (internlm3.PLAIN, None),
        "iquestcoder": (iquestcoder.IQUEST, iquestcoder.write_iquestcoder_gguf),
        "gemma3n_text": (gemma3n.GGUF, gemma3n.write_gemma3n_gguf),
        "mamba2": (mamba2.GGUF_FAMILIES, mamba2.write_mamba2_gguf),
        "glm": ((glm.GLM, glm.TIED), glm.write_glm_gguf),
        "apertus": (apertus.APERTUS, apertus.write_apertus_gguf),
        "llama4_text": (tuple(llama4.GGUF_FAMILIES.values()), llama4.write_llama4_gguf),
        "glm4_moe_lite": (glm4_moe_lite.GGUF_FAMILY, glm4_moe_lite.write_glm4_moe_lite_gguf),
        "falcon_mamba": (falcon_mamba.GGUF_FAMILIES, mamba.write_mamba_gguf),
        "jamba": (jamba.GGUF_FAMILIES, jamba.write_jamba_gguf),
        "kimi_linear": (kimi_linear.GGUF_FAMILY, kimi_linear.write_kimi_linear_gguf),
        "gemma4_text": (tuple(gemma4.GGUF_FAMILIES.values()), gemma4.write_gemma4_gguf),
        "gemma4_unified_text": (tuple(gemma4_unified.GGUF_FAMILIES.values()), gemma4.write_gemma4_gguf),
        "cohere2_moe": ((cohere2_moe.NORTH, cohere2_moe.SOFTMAX), cohere2_moe.write_cohere2_moe_gguf),
        "cohere2": (cohere2.R7B, cohere2.write_cohere2_gguf),
        "lfm2": ((lfm2.PLAIN, lfm2.IDXS), lfm2.write_lfm2_gguf),
        "granitemoehybrid": (granitemoehybrid.GGUF_FAMILIES, granitemoehybrid.write_granitemoehybrid_gguf),
        "granitemoeshared": (granitemoeshared.SHARED, granitemoeshared.write_granitemoeshared_gguf),
        "lfm2_moe": (lfm2_moe.GGUF, lfm2_moe.write_lfm2_moe_gguf),
        "nemotron_h": (
            (nemotron_h.GGUF_DENSE, nemotron_h_moe.GGUF_MOE, nemotron_h_moe.GGUF_LATENT),
            nemotron_h_moe.write_gguf,
        ),
        "mamba": (mamba.GGUF_FAMILIES, mamba.write_mamba_gguf),
        "falcon_h1": (falcon_h1.GGUF_FAMILIES, falcon_h1.write_falcon_h1_gguf),
        "qwen3_next": (qwen3_next.GGUF_FAMILY, qwen3_next.write_qwen3_next_gguf),
        "qwen3_5_text": (qwen3_5.GGUF_FAMILY, qwen3_5.write_qwen3_5_gguf),
        "qwen3_5_moe_text": (qwen3_5_moe.GGUF_FAMILY, qwen3_5.write_qwen3_5_gguf),
        "mpt": (mpt.SIX, mpt.write_mpt_gguf),
        "bloom": (bloom.MAIN, bloom.write_bloom_gguf),
        "dbrx": (dbrx.PLAIN, dbrx.write_dbrx_gguf),
        "phimoe": (phimoe.PLAIN, phimoe.write_phimoe_gguf),
        "afmoe": (afmoe.TRINITY, afmoe.write_afmoe_gguf),
        "mellum": (mellum.GGUF, mellum.write_mellum_gguf),
        "laguna": (laguna.GGUF_XS, laguna.write_laguna_gguf),
        # the converter reads the release's config.json spelling only (test_family_step3p5 writes its file so)
        "step3p5": (step3p5.G, None),
        "mimo_v2_flash": (
            mimo_v2_flash.MIMO,
            lambda hf, path: mimo_v2_flash.write_mimo_gguf(hf, path, nextn=0),
        ),
        "bamba": (bamba.GGUF_FAMILIES, bamba.write_bamba_gguf),
        "bailing_hybrid": (bailing_hybrid.GGUF_FAMILY, bailing_hybrid.write_bailingmoe3_gguf),
        "hunyuan_v1_moe": (hunyuan_moe.GGUF_FAMILY, hunyuan_moe.write_hunyuan_moe_gguf),
        "hrm_text": (hrm_text.STACKED, hrm_text.write_hrm_gguf),
        "hy_v3": (hy_v3.HY, hy_v3.write_hy_v3_gguf),
        # the converter's file of the checkpoint with its rotated rows as llama.cpp's pairs (models.hy_v4_gguf)
        "hy_v4": (hy_v4.GGUF_FAMILY, hy_v4.write_hy_v4_gguf_paired),
        # the converter's file with the experts as floats (it repacks the released FP4 experts in MXFP4)
        "deepseek_v4": (deepseek_v4.GGUF_FAMILY, deepseek_v4.write_deepseek4_gguf_f32),
        # the converter's file of the checkpoint with its indexer's rotated rows as llama.cpp's halves (models.dots3_note_gguf)
        "dots3_note_text": (dots3_note.GGUF_FAMILY, dots3_note.write_dots3_gguf_halves),
        "exaone_moe": (exaone_moe.PLAIN, exaone_moe.write_exaone_moe_gguf),
        "solar_open": (solar_open.HUB, solar_open.write_solar_open_gguf),
        "youtu": (youtu.YOUTU, youtu.write_youtu_gguf),
        "deepseek_ocr2_text": (deepseek_ocr2.OCR, deepseek_ocr2.write_deepseek_ocr2_gguf),
        "paddleocr_vl_text": (paddleocr_vl.PADDLE, paddleocr_vl.write_paddleocr_gguf),
        "jais2": (jais2.JAIS2, jais2.write_jais2_gguf),
        "falcon": (
            (falcon.FALCON_7B, falcon.FALCON_40B, falcon.FALCON_11B),
            lambda hf, path: falcon.write_falcon_gguf(hf.name_or_path, hf, path),
        ),
    }


def _registered():
    """Every family with a GGUF layout, by its own model_type (not the types that load as another family's model:
    Gemma 3's image-text `gemma3` runs the `gemma3_text` model)."""
    from autolm.models import model_class, model_types

    return sorted(
        t
        for t in model_types()
        if getattr(model_class(t), "gguf", None) is not None and model_class(t).config_class.model_type == t
    )


def test_every_family_with_a_gguf_layout_is_covered():
    assert sorted(_families()) == _registered()


@pytest.mark.parametrize("model_type", _registered())
def test_f32_round_trip_of_every_family(model_type, tmp_path_factory, tmp_path, byte_tokenizer):
    """For each of the family's checkpoints: save_gguf's F32 file loads back with the model's logits, and holds
    the metadata (the same "<arch>.*" keys, values and GGUF types) and the tensors (names, shapes, F32 bytes)
    the converter mimic writes for it."""
    families, mimic = _families()[model_type]
    for i, family in enumerate(families if isinstance(families, tuple) else (families,)):
        directory, hf = family.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        path = save_gguf(model, byte_tokenizer, str(tmp_path / f"m{i}.gguf"), "f32")
        back = _gguf_model(path)
        assert back.config.model_type == READ_AS.get(model_type, model.config.model_type)
        with torch.no_grad():
            torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
        if mimic is not None:
            mimic(hf, str(tmp_path / f"ref{i}.gguf"))
            _same_file(GGUFFile(path), GGUFFile(str(tmp_path / f"ref{i}.gguf")))


def _same_file(ours, ref) -> None:
    """The converter's "<arch>.*" metadata (every key it writes, the value within float rounding and its type: a
    bool stays a bool) and tensors (names, shapes, bytes) in autolm's file."""
    assert ours.architecture == ref.architecture
    arch = f"{ref.architecture}."
    want = {k: v for k, v in ref.metadata.items() if k.startswith(arch)}
    got = {k: ours.metadata.get(k) for k in want}
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    lists = [
        k for k, v in want.items() if isinstance(v, list)
    ]  # per-layer values (sliding-window flags): exact
    assert {k: got.pop(k) for k in lists} == {k: want.pop(k) for k in lists}
    assert got == pytest.approx(want)
    theirs = {t.name: t for t in ref.tensors}
    assert {t.name: t.shape for t in ours.tensors} == {n: t.shape for n, t in theirs.items()}
    differ = [t.name for t in ours.tensors if not np.array_equal(t.data, theirs[t.name].data)]
    assert differ == [], f"tensors whose F32 bytes differ from the converter's: {differ}"


def test_a_sliding_window_llama_cpp_drops_goes_out_with_a_warning(
    checkpoint, tmp_path, byte_tokenizer, caplog
):
    """llama.cpp's converter writes Mistral as "llama", whose graph runs no sliding window: a Mistral with one
    (Mistral 7B v0.1's 4096) goes out as the converter writes it, with a warning naming the window; the file reads
    back as Llama, the same model over as many tokens as the window and another one beyond."""
    directory, _ = checkpoint("mistral_sliding")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="autolm.gguf"):
        path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert "no sliding window" in caplog.text and "last 6 tokens" in caplog.text
    assert "llama.attention.sliding_window" not in GGUFFile(path).metadata
    back = _gguf_model(path)
    assert back.config.model_type == "llama"
    with torch.no_grad():
        want, got = model(IDS).logits, back(IDS).logits
    torch.testing.assert_close(got[:, :6], want[:, :6], rtol=1e-5, atol=1e-5)
    assert (got[:, 6:] - want[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gemma2", "smollm3", "qwen2_moe", "gpt_oss"])
def test_what_llama_cpp_cannot_hold_is_refused(name, tmp_path_factory, tmp_path, byte_tokenizer):
    """Gemma 2's attention scale off head_dim, SmolLM3's NoPE layers off llama.cpp's interval, Qwen 2 MoE's
    dense layers, gpt-oss's SwiGLU limit off llama.cpp's: a ConfigError naming the model type and the field, and
    no file."""
    import test_family_gemma as gemma
    import test_family_moe as moe
    import test_family_smollm3 as smollm3

    family, field = {
        "gemma2": (gemma.GEMMA2, "query_pre_attn_scalar"),
        "smollm3": (smollm3.SMOLLM3, "no_rope_layers"),
        "qwen2_moe": (moe.FAMILIES["qwen2_moe"], "mlp_only_layers"),
        "gpt_oss": (moe.FAMILIES["gpt_oss"], "swiglu_limit"),
    }[name]
    directory, _ = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with pytest.raises(ConfigError, match=f"'{name}' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert os.listdir(tmp_path) == []
