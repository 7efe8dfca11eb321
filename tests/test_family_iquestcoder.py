"""IQuest-Coder-V1 against transformers (which runs it as Llama over IQuestCoderConfig): its defaults (head_dim 128
whatever hidden_size / num_attention_heads says: 128 here over a hidden size of 64, GQA, RMSNorm epsilon 1e-5); the
standard battery, config.json as transformers writes it (no pretraining_tp), the remote code's clip_qkv and
use_sliding_window refused by name, GGUF as llama.cpp's converter writes it ("llama", with the head size as
key_length; read back as Llama) in and out of autolm; test_gguf_llamacpp runs autolm's file in llama.cpp."""

from __future__ import annotations

import pytest
import torch
from family_checks import Family, check_config_defaults
from gguf_llamacpp import CONVERTERS, _llama, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

# the default head_dim (128) over hidden_size 64 and 4 heads: wider heads than hidden / heads, as transformers builds
IQUEST = Family(
    "IQuestCoderConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for iquestcoder
)  # fmt: skip


def _iquestcoder(w, c) -> None:
    """LlamaModel.set_gguf_parameters (conversion/llama.py, which registers IQuestCoderForCausalLM): Llama's, and
    TextModel's head size (attention.key_length / value_length), which config.json always gives here."""
    _llama(w, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)


CONVERTERS.setdefault("iquestcoder", ("llama", _iquestcoder, True))  # q/k rows permuted, as LlamaModel's


def write_iquestcoder_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' IQuestCoder model `hf`."""
    write_gguf(hf, path)


def test_logits(tmp_path_factory):
    IQUEST.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    IQUEST.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    IQUEST.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    IQUEST.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    IQUEST.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    IQUEST.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    IQUEST.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers loads autolm's save with equal logits; the files hold transformers' tensor names and config.json
    the checkpoint's keys and values (head_dim, no pretraining_tp), no others."""
    model, _ = IQUEST.check_saved_files(tmp_path_factory, tmp_path)
    assert type(model).__name__ == "IQuestCoderForCausalLM" and model.config.head_dim == 128
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 128, 64)


def test_disk_offload(tmp_path_factory, tmp_path):
    IQUEST.check_disk_offload(tmp_path_factory, tmp_path)


def test_gguf_in(tmp_path_factory, tmp_path):
    """The converter's "llama" file (q/k rows permuted, the head size as key_length) loads as Llama with
    transformers' logits."""
    model, hf = check_gguf(IQUEST, tmp_path_factory, tmp_path)
    assert type(model).__name__ == type(hf).__name__ == "LlamaForCausalLM"
    assert model.config.head_dim == 128


def test_gguf_out(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """autolm's GGUF of the checkpoint is the converter's file (its "llama.*" keys and values, the tensors' names,
    shapes and F32 bytes) and reads back as Llama with the same logits."""
    from test_gguf_out import IDS, _same_file

    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = IQUEST.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    write_iquestcoder_gguf(hf, str(tmp_path / "ref.gguf"))
    _same_file(GGUFFile(path), GGUFFile(str(tmp_path / "ref.gguf")))
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_defaults_are_transformers():
    """Every key autolm's config writes holds transformers' default (the 40B model's sizes, head_dim 128, epsilon
    1e-5); neither writes Llama's pretraining_tp."""
    import transformers

    check_config_defaults(autolm.IQuestCoderConfig)
    ours, theirs = autolm.IQuestCoderConfig().to_dict(), transformers.IQuestCoderConfig().to_dict()
    assert "pretraining_tp" not in ours and "pretraining_tp" not in theirs
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "tie_word_embeddings", "attention_bias", "mlp_bias", "rope_parameters"):  # fmt: skip
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("change, key", [(dict(clip_qkv=8.0), "clip_qkv"),
                                         (dict(use_sliding_window=True), "use_sliding_window")])  # fmt: skip
def test_remote_code_options_are_refused(change, key):
    """The original code's options no released checkpoint enables: transformers refuses them, and so does autolm,
    naming the key."""
    import transformers
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match=key):
        transformers.IQuestCoderConfig(**change)
    with pytest.raises(autolm.ConfigError, match=key):
        autolm.IQuestCoderConfig.from_dict({"model_type": "iquestcoder", **change})
