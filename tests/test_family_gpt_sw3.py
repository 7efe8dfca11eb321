"""GPT-SW3 (model_type "gpt-sw3": transformers' GPT2Config and GPT2LMHeadModel) against transformers and peft: a
GPT-2 checkpoint whose config.json says "gpt-sw3" loads as GPT2LMHeadModel with equal logits, generation, LoRA
(peft's GPT-2 default targets), int8, the one-token step; autolm's save keeps "gpt-sw3" and transformers loads it;
config defaults are GPT2Config's; GGUF out is llama.cpp's gpt2 (read back as gpt2; run by llama.cpp where
llama_cpp is importable; exact GELU refused, llama.cpp's gpt2 runs the tanh one); a tokenizer folder with only GPTSw3Tokenizer's spiece.model is refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family

import autolm
from autolm.errors import TokenizerError

_CACHE: dict = {}


class GptSw3(Family):
    """A tiny GPT-2 checkpoint that transformers writes, its config.json's model_type then set to "gpt-sw3" (as
    transformers' AutoConfig maps it: GPT2Config); the reference is transformers' model loaded from it."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        import transformers

        if dtype not in _CACHE:
            source, _ = super().checkpoint(tmp_path_factory, dtype)
            directory = tmp_path_factory.mktemp("gpt_sw3")
            shutil.copytree(source, directory, dirs_exist_ok=True)
            config = json.loads((directory / "config.json").read_text())
            (directory / "config.json").write_text(json.dumps({**config, "model_type": "gpt-sw3"}, indent=2))
            ref = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
            _CACHE[dtype] = (str(directory), ref.eval())
        return _CACHE[dtype]


# GPT2Config's defaults (gelu_new, a tied head) at a tiny size
SW3 = GptSw3("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=48))


def test_loads_as_gpt2_with_its_own_model_type(tmp_path_factory):
    """transformers builds GPT2LMHeadModel over a GPT2Config that keeps "gpt-sw3" (its save writes "gpt2");
    autolm's config class for the type is GPTSw3Config, a GPT2Config, and its save keeps "gpt-sw3"."""
    import transformers

    directory, hf = SW3.checkpoint(tmp_path_factory)
    assert type(hf) is transformers.GPT2LMHeadModel and type(hf.config) is transformers.GPT2Config
    assert hf.config.model_type == "gpt-sw3"
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert type(model) is autolm.GPT2LMHeadModel and type(model.config) is autolm.GPTSw3Config
    assert model.config.model_type == "gpt-sw3" and isinstance(model.config, autolm.GPT2Config)
    assert type(autolm.AutoConfig.from_pretrained(directory)) is autolm.GPTSw3Config


def test_logits(tmp_path_factory):
    SW3.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    SW3.check_generate(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    SW3.check_one_token_step(tmp_path_factory)


def test_lora_with_peft_defaults(tmp_path_factory, tmp_path):
    """peft reads the type as gpt2 (transformers' GPT2Config): c_attn; autolm's default for gpt-sw3 is the same."""
    SW3.check_lora(tmp_path_factory, tmp_path)
    from autolm.lora.config import default_targets

    assert default_targets("gpt-sw3") == default_targets("gpt2") == ["c_attn"]


def test_quantized(tmp_path_factory):
    SW3.check_quantized(tmp_path_factory, "int8")


def test_save_keeps_gpt_sw3_and_loads_in_transformers(tmp_path_factory, tmp_path):
    """Equal logits in transformers, the same tensor names, config.json as read (model_type "gpt-sw3")."""
    SW3.check_saved_files(tmp_path_factory, tmp_path)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "gpt-sw3"


def test_default_config_is_gpt2config():
    """transformers' config for "gpt-sw3" is GPT2Config: every field autolm writes holds its default."""
    import transformers

    assert type(transformers.AutoConfig.for_model("gpt-sw3")) is transformers.GPT2Config
    ours, theirs = autolm.GPTSw3Config(), transformers.GPT2Config()
    written = ours.to_dict()
    assert written.pop("model_type") == "gpt-sw3"
    for key, value in written.items():
        assert getattr(theirs, key) == value, key
    assert autolm.GPTSw3Config(n_embd=32, n_head=4).hidden_size == 32


def _oracle_tokenizer(directory):
    """A byte-level vocabulary with one merge (llama.cpp refuses a BPE vocabulary without)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "ab"])}
    vocab.update((c, 4 + i) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(directory))


def test_gguf_is_llama_cpps_gpt2(tmp_path_factory, tmp_path):
    """save_gguf writes llama.cpp's gpt2 (the converter's tensors and gpt2.* metadata, as for a gpt2 file); it
    reads back as gpt2 (GGUF keeps no "gpt-sw3") with transformers' logits; llama.cpp runs it with close logits."""
    from test_family_gpt2 import write_gpt2_gguf
    from test_gguf_out import _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = SW3.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    path = save_gguf(model, _oracle_tokenizer(tmp_path / "tok"), str(tmp_path / "m.gguf"), "f32")
    write_gpt2_gguf(directory, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert type(back).__name__ == "GPT2LMHeadModel" and back.config.model_type == "gpt2"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits[real], theirs[real], atol=1e-4, rtol=1e-4
        )
    pytest.importorskip("llama_cpp")
    from test_gguf_llamacpp import _CHILD

    row = ids[0].tolist()
    run = subprocess.run([sys.executable, "-c", _CHILD, path, ",".join(map(str, row)), path + ".npy", "0"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got, want = torch.from_numpy(np.load(path + ".npy")), theirs[0]
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_gguf_refuses_exact_gelu(tmp_path_factory, tmp_path):
    """llama.cpp's gpt2 runs the tanh GELU (gelu_new): a model with exact GELU is refused by name, no file left."""
    SW3.check_gguf_refused(
        tmp_path_factory, tmp_path, "hidden_act", lambda c: setattr(c, "hidden_act", "gelu")
    )


def test_tokenizer_with_only_spiece_model_is_refused_by_name(tmp_path):
    """GPTSw3Tokenizer is a sentencepiece model (spiece.model): autolm reads tokenizer.json only, and says so."""
    (tmp_path / "spiece.model").write_bytes(b"\x0a\x00")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPTSw3Tokenizer"}))
    with pytest.raises(
        TokenizerError, match=r"no tokenizer\.json, only the sentencepiece model spiece\.model"
    ):
        autolm.AutoTokenizer.from_pretrained(tmp_path)
