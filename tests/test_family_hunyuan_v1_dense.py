"""Hunyuan dense (Tencent) against transformers and peft: Llama's layer with per-head q/k RMSNorms applied after
RoPE (query_layernorm / key_layernorm), biases on q/k/v/o, a head size of its own, GQA, and NTK-alpha RoPE ("dynamic"
with an alpha, the released configs' scaling); a variant with plain dynamic NTK scaling past a short context and a
tied head. The standard battery, config.json in transformers' keys, GGUF as llama.cpp's converter writes
"hunyuan-dense" (in and out), a chat template through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch
from family_checks import Family
from gguf_llamacpp import CONVERTERS, check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import HunYuanDenseV1Config
from autolm.models.base import LLAMA_TP

# the released configs' RoPE: NTK-alpha (a fixed, larger base), factor 1
ALPHA = {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0}
# every quirk on: q/k/v/o biases, per-head q/k norms after RoPE, NTK-alpha RoPE, head_dim 32 over 64 / 4 heads, GQA
HUNYUAN = Family(
    "HunYuanDenseV1Config",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=32, max_position_embeddings=64, attention_bias=True, rope_parameters=ALPHA),
    lora_targets=["q_proj", "v_proj", "o_proj", "down_proj"],  # peft has no default for hunyuan_v1_dense
)  # fmt: skip
# what llama.cpp's converter takes: NTK-alpha on base 10000 with a 256k context, no biases
GGUF_FAMILY = Family(
    "HunYuanDenseV1Config",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         head_dim=16, max_position_embeddings=262144, rope_parameters={**ALPHA, "alpha": 50.0}),
)  # fmt: skip
# dynamic NTK scaling without an alpha (the base grows past 16 positions), a tied head, no biases
DYNAMIC = Family(
    "HunYuanDenseV1Config",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
         head_dim=16, max_position_embeddings=16, tie_word_embeddings=True,
         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
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


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    HUNYUAN.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (query_layernorm / key_layernorm, no MLP biases); config.json
    round-trips with transformers' keys only; Llama's tensor-parallel plan (transformers gives none)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert "model.layers.0.self_attn.query_layernorm.weight" in model.state_dict()
    assert ("model.layers.0.self_attn.o_proj.bias" in model.state_dict()) == (name == "hunyuan")
    assert hf.config.base_model_tp_plan is None and type(model).tp_patterns == LLAMA_TP
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "dynamic") and ("lm_head" in model.tp_plan()) == (not tied)


@pytest.mark.parametrize("name", FAMILIES)
def test_rope_is_transformers(tmp_path_factory, name):
    """The inverse frequencies transformers' Hunyuan rotary embedding computes (NTK-alpha: base * alpha **
    (d / (d - 2)), fixed; dynamic: growing past max_position_embeddings), at the start and at 40 positions."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    rotary = hf.model.rotary_emb
    x = torch.zeros(1)
    for length in (8, 40):
        pos = torch.arange(length)[None]
        with torch.no_grad():
            cos, sin = rotary(x, pos)
        ours = model.model.rotary.tables(pos, torch.float32)["default"]
        torch.testing.assert_close(ours[0][:, 0], cos, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours[1][:, 0], sin, atol=1e-6, rtol=1e-6)
    if name != "dynamic":
        d, rope = hf.config.head_dim, hf.config.rope_parameters
        base = rope["rope_theta"] * rope["alpha"] ** (d / (d - 2))
        want = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
        torch.testing.assert_close(model.model.rotary.tables(torch.tensor([[1]]), torch.float32)["default"][1][
            0, 0, 0, : d // 2], torch.sin(want))  # fmt: skip


def test_default_config_and_errors():
    """HunYuanDenseV1Config() holds transformers' defaults (initializer_range, kept only where config.json has it,
    aside; head_dim, null in transformers' default, is hidden_size / num_attention_heads); bad values raise
    ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.HunYuanDenseV1Config().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert theirs.pop("head_dim") is None
    ours = HunYuanDenseV1Config().to_dict()
    assert ours.pop("head_dim") == 4096 // 32
    assert ours == theirs
    for change, key in ((dict(attention_bias=1), "attention_bias"), (dict(eod_token_id=-1), "eod_token_id"),
                        (dict(rope_parameters={**ALPHA, "alpha": 0}), "alpha"),
                        (dict(rope_parameters={**ALPHA, "alpha": "big"}), "alpha"),
                        (dict(rope_parameters={"rope_type": "dynamic", "alpha": 4.0, "rope_theta": 1e4}), "factor"),
                        (dict(rope_parameters={**ALPHA, "rope_theta": -1}), "rope_theta"),
                        (dict(head_dim=2, rope_parameters=ALPHA), "head_dim"),
                        (dict(rms_norm_eps=0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            HunYuanDenseV1Config(hidden_size=64, num_attention_heads=4, **change)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes hunyuan-dense --------------------------------------------


def _hunyuan_metadata(w, c) -> None:
    """HunYuanModel.set_gguf_parameters (conversion/hunyuan.py): TextModel's keys (the head size as key/value
    length), and for dynamic RoPE the NTK-alpha base (alpha 50 where none is given), scaling type none, factor 1
    and 256k as both context lengths (it asserts rope_theta 10000 and a context of 32k or 256k). No q/k
    permutation: llama.cpp runs hunyuan-dense with NeoX RoPE."""
    import gguf

    rope = c.rope_parameters
    dynamic = rope.get("rope_type") == "dynamic"
    base, d = rope["rope_theta"], c.head_dim
    if dynamic:
        assert base == 10000.0 and c.max_position_embeddings in (32 * 1024, 256 * 1024)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(256 * 1024 if dynamic else c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(base * rope.get("alpha", 50) ** (d / (d - 2)) if dynamic else base)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(d)
    w.add_value_length(d)
    if dynamic:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1)
        w.add_rope_scaling_orig_ctx_len(256 * 1024)


CONVERTERS.setdefault("hunyuan_v1_dense", ("hunyuan-dense", _hunyuan_metadata, False))


def write_hunyuan_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Hunyuan dense `hf` (F32)."""
    write_gguf(hf, path)


def test_gguf(tmp_path_factory, tmp_path):
    """NTK-alpha RoPE as a plain base, the per-head norms (attn_q_norm / attn_k_norm), GQA read back:
    transformers' logits."""
    model, _ = check_gguf(GGUF_FAMILY, tmp_path_factory, tmp_path)
    c = model.config
    assert type(model).__name__ == "HunYuanDenseV1ForCausalLM"
    assert c.rope_parameters["rope_type"] == "default" and c.max_position_embeddings == 256 * 1024
    assert c.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 50.0 ** (16 / 14), rel=1e-6)
    assert c.num_key_value_heads == 2 and c.head_dim == 16 and not c.attention_bias


@pytest.mark.parametrize(
    "name, key",
    [("hunyuan", "attention_bias"), ("dynamic", "RoPE")],
    ids=["biases", "dynamic"],
)
def test_gguf_out_refuses_what_the_file_cannot_say(tmp_path_factory, tmp_path, smol_gguf, name, key):
    """Refused by name, no file written: attention biases (llama.cpp's hunyuan-dense reads none); dynamic RoPE
    without an alpha (the converter writes alpha 50's fixed base, not a base that grows with the length)."""
    from autolm.gguf_writer import save_gguf

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    tok = autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])
    with pytest.raises(ConfigError, match=key):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


def test_gguf_out_of_a_32k_model(tmp_path_factory, tmp_path, smol_gguf):
    """Hunyuan-7B's 32k context (the converter writes 256k whatever the config says): the file holds the model's
    own length and loads back with its config and logits."""
    from autolm.gguf_writer import save_gguf

    family = Family("HunYuanDenseV1Config", {**GGUF_FAMILY.kwargs, "max_position_embeddings": 32768})
    model = autolm.AutoModelForCausalLM.from_pretrained(family.checkpoint(tmp_path_factory)[0])
    tok = autolm.AutoTokenizer.from_pretrained(smol_gguf[0], gguf_file=smol_gguf[1])
    save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="out.gguf")
    assert back.config.max_position_embeddings == 32768
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


# ---- the command line (Hunyuan's own template is not in tests/data: ChatML's stands in) -------------------------


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("HunYuanDenseV1Config", {**HUNYUAN.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path,
              "HunYuanDenseV1ForCausalLM (hunyuan_v1_dense)")  # fmt: skip
