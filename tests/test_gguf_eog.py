"""The tokens that end a generation from a GGUF file (autolm.sources.gguf_eog), as llama.cpp's vocabulary marks
them end-of-generation: on the real files (SmolLM2's Q4_1, whose <reponame> llama.cpp takes as a fill-in-the-middle
token; Gemma 3 270M's, whose <end_of_turn> the file names nowhere) and on vocabularies with llama.cpp's exceptions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import autolm
from autolm.sources.gguf import GGUFFile
from autolm.sources.gguf_eog import KEEP, end_of_generation

_CHILD = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], vocab_only=True, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
print([i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)])
"""


def llama_cpp_ends(path: str) -> list[int]:
    """llama.cpp's end-of-generation tokens of the file's vocabulary (llama-cpp-python, in a child)."""
    pytest.importorskip("llama_cpp")
    run = subprocess.run([sys.executable, "-c", _CHILD, path], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return eval(run.stdout.strip().splitlines()[-1])  # a list of ints printed by the child


def test_smollm2_ends_at_llama_cpps_tokens(smol_gguf):
    """The model's generation config ends where llama.cpp does: <|im_end|> (the file's eos), <reponame> (a
    fill-in-the-middle repo token by its text) and <|endoftext|>; the model's read keeps only those strings, the
    same ids as the whole vocabulary's read."""
    directory, name = smol_gguf
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, progress=False)
    assert model.generation_config.eos_token_id == [2, 4, 0]
    path = os.path.join(directory, name)
    assert end_of_generation(GGUFFile(path, strings=False, keep=KEEP).metadata) == [2, 4, 0]
    assert end_of_generation(GGUFFile(path).metadata) == [2, 4, 0]
    if _has_llama_cpp():
        assert sorted(model.generation_config.eos_token_id) == llama_cpp_ends(path)


def test_gemma3_ends_at_end_of_turn_as_llama_cpp(gemma3_270m):
    """Gemma 3's file names <eos> its end of sequence; llama.cpp also ends at <end_of_turn> and </s>, by their
    text: autolm ends at the same tokens."""
    directory, name = gemma3_270m
    path = os.path.join(directory, name)
    ends = end_of_generation(GGUFFile(path, strings=False, keep=KEEP).metadata)
    assert ends[0] == 1 and 106 in ends  # <eos>, <end_of_turn>
    if _has_llama_cpp():
        assert sorted(ends) == llama_cpp_ends(path)


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _vocab(*tokens: str, **ids: int) -> dict:
    return {
        "tokenizer.ggml.tokens": ["a", *tokens],
        **{f"tokenizer.ggml.{k}_token_id": v for k, v in ids.items()},
    }


def test_llama_cpps_rules_on_small_vocabularies():
    """eos first, then the end-of-turn / end-of-message keys, the fill-in-the-middle keys (else their texts), the
    markers by text; <|end|> is no end beside harmony's <|return|> and <|call|>, </s> none beside <|tool_response>."""
    assert end_of_generation(_vocab("<|im_end|>", "<|endoftext|>", eos=2)) == [2, 1]
    assert end_of_generation(_vocab("<end_of_turn>", "<eos>", eos=2, eot=1)) == [2, 1]
    assert end_of_generation(_vocab("<|end|>", "<|return|>", "<|call|>", eos=2)) == [2, 3]
    assert end_of_generation(_vocab("<|end|>", "<|return|>", eos=2)) == [2, 1]
    assert end_of_generation(_vocab("</s>", "<|tool_response>", eos=9)) == [9, 2]
    assert end_of_generation(_vocab("<|fim_pad|>", "<|file_sep|>", "<pad>", eos=3, fim_pad=3)) == [3, 2]
    assert end_of_generation(_vocab("x", eos=1)) == [1]
