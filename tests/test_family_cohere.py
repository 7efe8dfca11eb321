"""Cohere (Command-R, Command-R+, Aya 23) against transformers and peft: one mean-subtracted LayerNorm (weight
only, fp32) feeding attention and the SwiGLU MLP in parallel, RoPE over interleaved pairs, logits times
logit_scale (never 1 here), tied embeddings, GQA; per-head q/k LayerNorms with a weight row per head
(use_qk_norm, Command-R+); q/k/v/o biases with an untied head. The standard battery, config.json as transformers
writes it (and command-r-v01's transformers 4 spelling), GGUF as llama.cpp's converter writes command-r (in and
out), and the CLI (no chat template: Command-R's is not among the test data)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)  # fmt: skip
_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]  # peft has no default
# Command-R's shape: GQA, tied embeddings, no biases, a logit scale away from 1, a small RoPE base
COHERE = Family("CohereConfig", dict(_SHAPE, num_key_value_heads=2, logit_scale=0.5, rope_theta=1000.0),
                lora_targets=_TARGETS)  # fmt: skip
# Command-R+'s: per-head q/k LayerNorms ((heads, head_dim) weights) with GQA; transformers' default RoPE base
QK = Family("CohereConfig", dict(_SHAPE, num_key_value_heads=2, use_qk_norm=True, logit_scale=0.8333),
            lora_targets=["q_proj", "v_proj"])  # fmt: skip
# what no released checkpoint has but the config allows: q/k/v/o biases, an untied head
BIAS = Family("CohereConfig", dict(_SHAPE, attention_bias=True, tie_word_embeddings=False, logit_scale=1.7,
                                   rope_theta=1000.0))  # fmt: skip
FAMILIES = {"command_r": COHERE, "qk_norm": QK, "bias_untied": BIAS}
# Command-R+'s depth: llama.cpp's command-r reads the q/k norms only in models of 64 or more layers
QK64 = Family("CohereConfig", dict(QK.kwargs, num_hidden_layers=64))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", ["command_r", "qk_norm"])
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    QK.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["command_r", "qk_norm"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    QK.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["command_r", "qk_norm"])
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    COHERE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", ["qk_norm", "bias_untied"])
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    COHERE.check_disk_offload(tmp_path_factory, tmp_path)


def test_interleaved_rope_is_transformers():
    """nn.rope's interleaved rotation (the rotate-half tables' first halves) is transformers' Cohere rotation
    (repeat_interleaved tables, fp32 arithmetic) bit for bit, in fp32 and bf16; rotate-half stays the default."""
    from transformers.models.cohere import modeling_cohere as mc

    from autolm.nn.rope import apply_rotary, cos_sin, inv_freq_and_scale

    g = torch.Generator().manual_seed(0)
    pos = torch.arange(11)[None]
    inv_freq, _ = inv_freq_and_scale({"rope_theta": 100.0}, 16, 64)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 3, 11, 16, generator=g).to(dtype)
        cos, sin = cos_sin(pos, inv_freq, 1.0, dtype)
        emb = torch.repeat_interleave(pos[..., None].float() * inv_freq, 2, dim=-1)
        want, _ = mc.apply_rotary_pos_emb(q, q, emb.cos().to(dtype), emb.sin().to(dtype))
        got = apply_rotary(q, cos[:, None], sin[:, None], interleaved=True)
        assert torch.equal(got, want), dtype
        assert not torch.equal(apply_rotary(q, cos[:, None], sin[:, None]), want)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (the (heads, head_dim) q/k norms, no lm_head of its
    own when tied); the saved config.json has transformers' keys and values, no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """CohereConfig() holds transformers' defaults (RoPE base 500000, logit_scale 0.0625, tied, ...);
    initializer_range, which autolm keeps only where config.json has it, aside."""
    import transformers

    from autolm.models import CohereConfig

    theirs = json.loads(transformers.CohereConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert CohereConfig().to_dict() == theirs


def test_command_r_v01_config_spelling(tmp_path_factory, tmp_path):
    """command-r-v01's config.json as shipped: rope_theta at the top level (8e6 there), rope_scaling null; read as
    transformers reads it and saved back in that spelling; with no RoPE base at all, transformers' 500000."""
    src, _ = COHERE.checkpoint(tmp_path_factory)
    shutil.copytree(src, tmp_path / "v4")
    path = tmp_path / "v4" / "config.json"
    d = json.loads(path.read_text())
    d.pop("rope_parameters")
    path.write_text(json.dumps({**d, "rope_theta": 8000000.0, "rope_scaling": None}))
    config = autolm.AutoConfig.from_pretrained(tmp_path / "v4")
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 8000000.0}
    saved = config.to_dict()
    assert "rope_parameters" not in saved and (saved["rope_theta"], saved["rope_scaling"]) == (
        8000000.0,
        None,
    )
    path.write_text(json.dumps(d))
    assert autolm.AutoConfig.from_pretrained(tmp_path / "v4").rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(logit_scale=None), "logit_scale"),
        (dict(logit_scale="0.0625"), "logit_scale"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(use_qk_norm="yes"), "use_qk_norm"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="cohere", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes command-r ----------------------------------------------


def _command_r(w, c) -> None:
    """CommandR2Model.set_gguf_parameters (conversion/command_r.py): TextModel's keys (for Cohere's config: sizes,
    head counts, the RoPE base, the LayerNorm epsilon; no RMS epsilon, head size or vocabulary size), then
    logit_scale and RoPE scaling type "none". Its context length is config.json's model_max_length where given
    (command-r-v01 has one); these checkpoints have none."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_logit_scale(c.logit_scale)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


# q/k not permuted: llama.cpp's command-r rotates interleaved pairs, as transformers' Cohere does
CONVERTERS.setdefault("cohere", ("command-r", _command_r, False))


def write_cohere_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter writes of transformers' Cohere model `hf` (tied: no output tensor; tensors
    renamed one to one by gguf-py's map, the q/k norms as (head_dim, heads) ggml tensors)."""
    write_gguf(hf, path)


@pytest.mark.parametrize("name", ["command_r", "qk_norm"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as CohereForCausalLM with transformers' logits (logit_scale, the LayerNorm
    epsilon, the q/k norms read off their tensors)."""
    family = {"command_r": COHERE, "qk_norm": QK64}[name]
    model, hf = check_gguf(family, tmp_path_factory, tmp_path)
    c, want = model.config, hf.config
    assert c.model_type == "cohere" and c.tie_word_embeddings and c.use_qk_norm == want.use_qk_norm
    assert (c.logit_scale, c.layer_norm_eps) == pytest.approx((want.logit_scale, want.layer_norm_eps))
    assert (c.num_key_value_heads, c.rope_parameters["rope_theta"]) == (2, want.rope_parameters["rope_theta"])


def test_q_k_norms_in_fewer_than_64_layers_are_refused(tmp_path_factory, tmp_path):
    """llama.cpp's command-r loads no q/k norms below 64 layers (and fails on a file holding them): GGUF out of
    such a model is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(QK.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="64 or more layers.*use_qk_norm"):
        save_gguf(model, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "out" / "m.gguf"), "f32")
    assert not (tmp_path / "out").exists()


def test_gguf_out_refuses_an_untied_head(tmp_path_factory, tmp_path):
    """llama.cpp's command-r reads the embedding as the head: an untied head is refused by name (test_gguf_out
    checks the F32 files of the tied checkpoints against the converter's)."""
    from autolm.gguf_writer import save_gguf

    untied = autolm.AutoModelForCausalLM.from_pretrained(BIAS.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        save_gguf(untied, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "untied.gguf"), "f32")


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; `autolm inspect` names the class and type; with
    no chat template `autolm chat` says so."""
    check_cli_without_template(COHERE, tmp_path_factory, tmp_path, "CohereForCausalLM (cohere)")
