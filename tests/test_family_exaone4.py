"""EXAONE 4 against transformers: post-sublayer norms, per-head q/k norms, GQA, head_dim != hidden / heads; a
1.2B-like checkpoint (every layer global with RoPE, no window, tied head) and a 32B-like one (local and global
layers alternating, a 5-slot window shorter than the prompts, the global layers without RoPE, untied head). The
standard battery, GGUF as llama.cpp writes it (in and out) of variants llama.cpp's exaone4 runs (head_dim * heads ==
hidden; the window at 64 layers, the only depth it slides at; the others refused), and the CLI."""

from __future__ import annotations

import pytest
from chat_checks import check_cli
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, head_dim=32)  # fmt: skip
# EXAONE-4.0-1.2B's shape: no sliding window, every layer global (and rotated), tied embeddings
EXAONE4_1B = Family("Exaone4Config", dict(SMALL, num_hidden_layers=2, sliding_window=None, tie_word_embeddings=True,
                                          layer_types=["full_attention"] * 2))  # fmt: skip
# EXAONE-4.0-32B's shape: local / global layers, global NoPE; the window (5) is shorter than the prompts
EXAONE4_32B = Family(
    "Exaone4Config",
    dict(SMALL, num_hidden_layers=4, sliding_window=5, sliding_window_pattern=2),
    lora_targets=["q_proj", "v_proj", "down_proj"],
)
# what llama.cpp's exaone4 runs: head_dim * heads == hidden_size (its attention output is hidden_size wide), and a
# window (with global NoPE layers) only at EXAONE-4.0-32B's depth, 64 layers (every 4th global, as the 32B's)
GGUF_SMALL = dict(SMALL, head_dim=16)
EXAONE4_1B_GGUF = Family("Exaone4Config", dict(EXAONE4_1B.kwargs, head_dim=16))
EXAONE4_32B_GGUF = Family("Exaone4Config", dict(GGUF_SMALL, num_hidden_layers=64, sliding_window=5))
# a window at another depth: llama.cpp's exaone4 runs every layer global with RoPE
SHALLOW = Family("Exaone4Config", dict(EXAONE4_32B.kwargs, head_dim=16))
BOTH = pytest.mark.parametrize("family", [EXAONE4_1B, EXAONE4_32B], ids=["1.2b", "32b"])


def _exaone4(w, c) -> None:
    """Exaone4Model.set_gguf_parameters (conversion/exaone.py): TextModel's keys (the head size where config.json
    gives one), the vocabulary size, and where the config has a window: it, and the local layers as flags."""
    add_text_model(w, c)
    if getattr(c, "head_dim", None) is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])


CONVERTERS.setdefault("exaone4", ("exaone4", _exaone4, False))  # q/k rows not permuted (NeoX RoPE)


def write_exaone4_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' EXAONE 4 model `hf`."""
    write_gguf(hf, path)


@BOTH
def test_logits(family, tmp_path_factory):
    family.check_logits(tmp_path_factory)


@BOTH
def test_generate(family, tmp_path_factory):
    family.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    EXAONE4_32B.check_bf16(tmp_path_factory)


@BOTH
def test_one_token_step(family, tmp_path_factory):
    family.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    EXAONE4_32B.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    EXAONE4_32B.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    EXAONE4_32B.check_quantized(tmp_path_factory, bits)


@BOTH
def test_save(family, tmp_path_factory, tmp_path):
    family.check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    EXAONE4_32B.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("family", [EXAONE4_1B_GGUF, EXAONE4_32B_GGUF], ids=["1.2b", "32b"])
def test_gguf(family, tmp_path_factory, tmp_path):
    model, _ = check_gguf(family, tmp_path_factory, tmp_path)
    assert model.config.layer_types == family.checkpoint(tmp_path_factory)[1].config.layer_types


def test_gguf_reads_a_window_as_llama_cpp(tmp_path_factory, tmp_path):
    """The converter's file of a windowed model of other than 64 layers loads as llama.cpp runs it: every layer
    global, with RoPE (the window and flags in the file unused)."""
    import gguf

    _, hf = SHALLOW.checkpoint(tmp_path_factory)
    write_exaone4_gguf(hf, str(tmp_path / "model.gguf"))
    assert (
        gguf.GGUFReader(str(tmp_path / "model.gguf")).get_field("exaone4.attention.sliding_window").contents()
        == 5
    )
    c = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").config
    assert c.sliding_window is None and c.layer_types == ["full_attention"] * 4
    assert [c.layer_rope(i) for i in range(4)] == ["default"] * 4


@pytest.mark.parametrize(
    ("family", "field"), [(EXAONE4_1B, "head_dim"), (SHALLOW, "layer RoPE")], ids=["head_dim", "window"]
)
def test_gguf_out_refuses(family, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A head size but hidden_size / heads (llama.cpp's attention output is hidden_size wide), a window at another
    depth than 64 layers (llama.cpp slides only there, and rotates the global layers the model leaves unrotated): a
    ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match=f"'exaone4' model.*{field}"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_cli(tmp_path_factory, tmp_path):
    check_cli(
        EXAONE4_32B, "olmo-2-1124-instruct.jinja", tmp_path_factory, tmp_path, "Exaone4ForCausalLM (exaone4)"
    )


def test_config_derivations_and_errors(tmp_path_factory):
    """layer_types as transformers derives them (pattern 4 by default); global layers skip RoPE only where a window
    is configured; the saved config.json holds only transformers' keys; a bad pattern names the key."""
    import transformers

    for kw in (
        dict(num_hidden_layers=8),
        dict(num_hidden_layers=6, sliding_window=16, sliding_window_pattern=3),
    ):
        assert _config(kw).layer_types == transformers.Exaone4Config(**kw).layer_types
    nope = _config(dict(num_hidden_layers=4, layer_types=["full_attention"] * 4))  # window 4096 by default
    assert [nope.layer_rope(i) for i in range(4)] == [None] * 4
    rope = _config(dict(num_hidden_layers=2, sliding_window=None))
    assert rope.layer_types == ["full_attention"] * 2 and rope.layer_rope(1) == "default"
    directory, hf = EXAONE4_32B.checkpoint(tmp_path_factory)
    saved = set(autolm.AutoConfig.from_pretrained(directory).to_dict())
    assert saved <= set(hf.config.to_dict()) | {"head_dim"}
    with pytest.raises(autolm.ConfigError, match="sliding_window_pattern"):
        _config(dict(num_hidden_layers=4, sliding_window_pattern=0))
    with pytest.raises(autolm.ConfigError, match="sliding_window_pattern"):
        _config(dict(num_hidden_layers=4, sliding_window_pattern="LLLG"))


def _config(d: dict):
    from autolm.models.exaone4 import Exaone4Config

    return Exaone4Config.from_dict(d)
