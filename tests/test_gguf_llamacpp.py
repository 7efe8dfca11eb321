"""llama.cpp itself as the oracle (llama-cpp-python, an optional test-only package; skipped where it is absent):
SmolLM2 requantized by llama.cpp's own quantizer to Q4_K_M, Q5_K_M, Q6_K and Q8_0 (once per session) and its shipped
Q4_1 file, kept in their blocks by autolm, give llama.cpp's next tokens over a text; and a model directory
written out as GGUF by autolm loads in llama.cpp with the same tokens, chat template and logits; every family's
GGUF out runs in llama.cpp with the model's logits."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

import autolm

llama_cpp = pytest.importorskip("llama_cpp")

FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}
TEXT = os.path.join(os.path.dirname(__file__), "data", "english.txt")


@pytest.fixture(scope="session")
def smol_quants(smol_gguf, tmp_path_factory):
    """name -> path: SmolLM2's Q4_1 file and llama.cpp's requantizations of it."""
    source = os.path.join(*smol_gguf)
    out = {"Q4_1": source}
    folder = tmp_path_factory.mktemp("quants")
    for name, ftype in FTYPES.items():
        path = str(folder / f"smol-{name}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        assert llama_cpp.llama_model_quantize(source.encode(), path.encode(), ctypes.byref(params)) == 0
        out[name] = path
    return out


def llamacpp_logits(path: str, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position of `ids` (teacher-forced), fp32 (T, vocab)."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True,
                          n_threads=2, verbose=False)  # fmt: skip
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)


def _text_ids(tok, n: int = 300) -> list[int]:
    """The first n tokens of a text: over 300, the share of next tokens that agree with llama.cpp's moves by ~1%
    with a change of float rounding in one kernel (over 100 it moved by up to 4%, from 0.92 to 0.88)."""
    with open(TEXT) as f:
        return tok.encode(f.read()[:4000])[:n]


@pytest.mark.parametrize("name", ["Q4_1", *FTYPES])
def test_kept_blocks_agree_with_llama_cpp(smol_quants, name):
    path = smol_quants[name]
    folder, file = os.path.dirname(path), os.path.basename(path)
    model = autolm.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, quantization="gguf", progress=False
    )
    tok = autolm.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    ids = _text_ids(tok)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    theirs = llamacpp_logits(path, ids)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    # llama.cpp rounds activations to 8 bits for its quantized dot products, as autolm's C++ kernel does (where it
    # is built; else fp32, bf16 for the int4 layers), and both keep the KV cache in f16: the logits differ by a
    # little, the next tokens by a few percent at most
    assert agree >= 0.9, (name, agree)
    assert (ours - theirs).abs().mean() < 0.05 * theirs.abs().mean(), name


@pytest.mark.parametrize("kind", ["q8_0", "q4_k"])
def test_hf_directory_to_gguf_runs_in_llama_cpp(smol_dir, tmp_path, kind):
    """HF -> GGUF (autolm convert) -> llama.cpp: the same tokens for a chat, the chat template, the logits."""
    from autolm.convert import convert_to_gguf

    path = convert_to_gguf(smol_dir, str(tmp_path / f"smol-{kind}.gguf"), kind)
    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    tok = autolm.AutoTokenizer.from_pretrained(smol_dir)
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word, please."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    ids = tok.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    ids += _text_ids(tok)
    kept = autolm.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(path), quantization="gguf", progress=False
    )
    with torch.no_grad():
        ours, same_file = model(torch.tensor([ids])).logits[0], kept(torch.tensor([ids])).logits[0]
    theirs = llamacpp_logits(path, ids)
    assert (same_file.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
    if kind == "q8_0":  # within Q8_0's rounding of the float model too
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("kind", ["q4_k_m", "q5_k_m"])
def test_k_quant_mixes_are_llama_cpps(smol_dir, tmp_path, kind):
    """autolm convert --quantize q4_k_m / q5_k_m gives each tensor the type llama.cpp's own quantizer gives it from
    the same model (the mix's Q6_K layers, fallbacks for rows that are not whole 256-blocks, the tied head), and
    llama.cpp's next tokens on the file follow the model's."""
    import gguf

    from autolm.convert import convert_to_gguf
    from autolm.gguf_writer import TYPES
    from autolm.sources.gguf import GGUFFile

    f16 = convert_to_gguf(smol_dir, str(tmp_path / "f16.gguf"), "f16")
    ours = convert_to_gguf(smol_dir, str(tmp_path / f"{kind}.gguf"), kind)
    theirs = str(tmp_path / "theirs.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = TYPES[kind][1], 2
    assert llama_cpp.llama_model_quantize(f16.encode(), theirs.encode(), ctypes.byref(params)) == 0
    types = [
        {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in GGUFFile(p).tensors}
        for p in (ours, theirs)
    ]
    assert types[0] == types[1]
    assert GGUFFile(ours).metadata["general.file_type"] == GGUFFile(theirs).metadata["general.file_type"]
    model = autolm.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    kept = autolm.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=os.path.basename(ours), quantization="gguf", progress=False
    )
    ids = _text_ids(autolm.AutoTokenizer.from_pretrained(smol_dir))
    with torch.no_grad():
        exact, same_file = model(torch.tensor([ids])).logits[0], kept(torch.tensor([ids])).logits[0]
    on_ours, on_theirs = llamacpp_logits(ours, ids), llamacpp_logits(theirs, ids)
    assert (on_ours.argmax(-1) == same_file.argmax(-1)).float().mean().item() >= 0.9
    # autolm's plainer choice of K-quant scales costs little against llama.cpp's search
    error = lambda logits: (logits - exact).abs().mean().item()  # noqa: E731
    assert error(on_ours) < 1.5 * error(on_theirs)


def test_llama3_rope_scaling_means_the_same_in_llama_cpp(smol_dir, tmp_path):
    """SmolLM2 given Llama 3's RoPE scaling: autolm convert writes the rope_freqs tensor llama.cpp's converter
    writes, llama.cpp's logits follow the scaled model (not the unscaled one), and autolm reads the file back
    as the scaled model."""
    import json
    import shutil

    from autolm.convert import convert_to_gguf

    scaled = tmp_path / "llama3"
    shutil.copytree(smol_dir, scaled)
    cfg = json.loads((scaled / "config.json").read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 10000.0)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": theta, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    cfg.pop("rope_scaling", None)
    (scaled / "config.json").write_text(json.dumps(cfg))
    path = convert_to_gguf(str(scaled), str(tmp_path / "smol-llama3.gguf"), "f16")
    model = autolm.AutoModelForCausalLM.from_pretrained(scaled, dtype=torch.float32)
    plain = autolm.AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    back = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    ids = _text_ids(autolm.AutoTokenizer.from_pretrained(smol_dir))
    with torch.no_grad():
        ours, unscaled, read = (m(torch.tensor([ids])).logits[0] for m in (model, plain, back))
    theirs = llamacpp_logits(path, ids)
    gap = lambda a, b: (a - b).abs().mean().item()  # noqa: E731
    assert gap(ours, theirs) < 0.2 * gap(unscaled, theirs)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
    torch.testing.assert_close(read, ours, rtol=0.02, atol=0.02 * ours.abs().max().item())  # within f16


# the child that runs llama.cpp on a file (a failed assertion there aborts the process: not this one)
_CHILD = """
import sys, numpy as np, llama_cpp
path, ids = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, n_threads=2,
                      flash_attn=sys.argv[4] == "1", verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
"""
# llama.cpp's phimoe routes with a softmax over the top two experts, not Phi-3.5-MoE's sparsemixer
_OTHER_ROUTING = {"phimoe"}
# llama.cpp's chameleon suppresses the image tokens in its first output row only (test_family_chameleon compares
# the other rows over the text tokens)
_FIRST_ROW_ONLY = {"chameleon"}
# llama.cpp runs MiniMax-M3's block-sparse selection only with flash attention (else it attends densely)
_FLASH_ONLY = {"minimax_m3_vl_text"}


@pytest.fixture(scope="module")
def oracle_tokenizer(tmp_path_factory):
    """A byte-level vocabulary llama.cpp loads: one merge (it refuses a BPE vocabulary without), and the special
    tokens its vocabulary loader looks up by name for some models (Phi-3's <unk> and <|endoftext|>)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = ["<pad>", "<s>", "</s>", "<unk>", "<|endoftext|>", "ab"]
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update((c, len(special) + i) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    d = tmp_path_factory.mktemp("oracle_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(d))


def _registered():
    from test_gguf_out import _registered

    return _registered()


@pytest.mark.parametrize("model_type", _registered())
def test_every_familys_gguf_runs_in_llama_cpp(model_type, tmp_path_factory, tmp_path, oracle_tokenizer):
    """What autolm convert writes of each family's checkpoints (F32) runs in llama.cpp with the model's logits,
    within llama.cpp's float16 cache; test_gguf_out checks the same files against the converter's."""
    import subprocess
    import sys

    import numpy as np
    from test_gguf_out import IDS, _families

    from autolm.gguf_writer import save_gguf

    if model_type in _OTHER_ROUTING:
        pytest.skip(f"llama.cpp routes {model_type} its own way")
    if model_type in _FIRST_ROW_ONLY:
        pytest.skip(f"llama.cpp suppresses {model_type}'s image tokens in its first output row only")
    families, _ = _families()[model_type]
    for i, family in enumerate(families if isinstance(families, tuple) else (families,)):
        directory, _ = family.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        path = save_gguf(model, oracle_tokenizer, str(tmp_path / f"m{i}.gguf"), "f32")
        ids = ",".join(str(t) for t in IDS[0].tolist())
        flash = "1" if model_type in _FLASH_ONLY else "0"
        run = subprocess.run([sys.executable, "-c", _CHILD, path, ids, path + ".npy", flash], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, (model_type, i, run.stderr[-2000:])
        with torch.no_grad():
            ours = model(IDS).logits[0]
        theirs = torch.from_numpy(np.load(path + ".npy"))
        assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max(), (model_type, i)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), (model_type, i)


SPM_TEXTS = [
    "hello world",
    "Unicode: \u00e9 \u2713 \u6f22\u5b57 and\ttabs\n\nnewlines   x",
    "def f(x):\n    return x  # ok",
]


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_sentencepiece_vocabulary_goes_out_as_llama_cpp_reads_it(tmp_path, style):
    """A Llama 2 / Mistral style vocabulary (the prefix space by Metaspace) and a Phi-3 style one (by a normalizer),
    written by autolm convert as llama.cpp's "llama" tokenizer (scores, no merges): llama.cpp's tokens for a text
    are autolm's, and its logits the model's."""
    from spm_tokenizer import write_spm_checkpoint

    from autolm.convert import convert_to_gguf

    write_spm_checkpoint(str(tmp_path), style)
    path = convert_to_gguf(str(tmp_path), str(tmp_path / "m.gguf"), "f32")
    tok = autolm.AutoTokenizer.from_pretrained(tmp_path)
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_threads=2, verbose=False, vocab_only=True)
    # SentencePiece and llama.cpp put the prefix space before a text that starts with one too; transformers'
    # Metaspace does not, so such texts are only the same with the normalizer
    texts = SPM_TEXTS + ([" x", "  two spaces"] if style == "prepend" else [])
    with open(TEXT) as f:
        texts.append(f.read()[:1500])
    for text in texts:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    # llama.cpp keeps its attention cache in f16: the logits of an F32 file agree to its rounding
    torch.testing.assert_close(
        llamacpp_logits(path, ids), ours, rtol=1e-2, atol=1e-2 * ours.abs().max().item()
    )


def test_gemmas_vocabulary_goes_out_as_llama_cpp_wrote_it(gemma3_270m, tmp_path):
    """Gemma 3's real vocabulary (262k pieces, blanks, no prefix space), read from llama.cpp's file and written
    again by autolm under a tiny Gemma 3: llama.cpp tokenizes with it as with its own file, autolm the same, and
    autolm reads it back as the same tokenizer."""
    import transformers

    from autolm.gguf_writer import save_gguf

    directory, name = gemma3_270m
    tok = autolm.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    cfg = transformers.Gemma3TextConfig(vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                        query_pre_attn_scalar=16)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    path = save_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    ours = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(model_path=os.path.join(directory, name), vocab_only=True, verbose=False)
    chat = "<start_of_turn>user\nThe capital of France?  Answer\n\n  in one word.<end_of_turn>\n<start_of_turn>model\n"
    texts = [*SPM_TEXTS, " x", "  two spaces", chat]
    with open(TEXT) as f:
        texts.append(f.read()[:2000])
    for text in texts:
        ids = ours.tokenize(text.encode(), add_bos=True, special=True)
        assert ids == theirs.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text
    back = autolm.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert all(back.encode(text) == tok.encode(text) for text in texts)


def test_the_bench_times_steps_after_a_long_prompt_in_both_libraries(smol_gguf):
    """`python -m autolm.bench.gguf --context N`: both children time one-token steps after a prompt of N tokens
    (autolm's eager step where its compiled one is not asked for)."""
    from autolm.bench import Case, run_child

    folder, file = smol_gguf
    path = os.path.join(folder, file)
    case = Case("smol", folder, "float32", "gguf", compile=False, aot=False, gguf=path, context=40)
    for lib in ("autolm", "llama.cpp"):
        assert run_child(lib, case, threads=1, prefill=16, decode=4)["decode_context"] > 0
