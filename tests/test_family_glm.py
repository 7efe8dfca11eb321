"""GLM (GLM-4-9B-Chat-HF, GLM-Edge) against transformers and peft: two RMSNorms per layer, q/k/v biases, a packed
gate_up_proj, partial RoPE over interleaved pairs (half of each head by default), GQA, an untied head (and a tied
one, and a head_dim other than hidden / heads, which the config allows). The standard battery, config.json as
transformers writes it and as glm-4-9b-chat-hf ships it (v4 spelling, partial_rotary_factor at the top level),
GGUF as llama.cpp's converter writes GlmForCausalLM ("chatglm": in, out, Q8_0), GLM-4-9B-Chat's chat template
and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError

_SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
# peft has no default target modules for glm (its "chatglm" entry names the remote-code query_key_value)
_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
# GLM-4-9B's shape: biases, untied head, head_dim hidden / heads (16), half of it rotary; the RMS epsilon and RoPE
# base the converter writes for every GlmForCausalLM (1e-5, 10000), so that its file computes as the checkpoint
GLM = Family("GlmConfig", dict(_SHAPE, head_dim=16, rms_norm_eps=1e-5,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5}),
             lora_targets=_TARGETS)  # fmt: skip
# no biases, tied embeddings, a quarter of each head rotary
TIED = Family("GlmConfig", dict(_SHAPE, head_dim=16, attention_bias=False, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.25}),
              lora_targets=["q_proj", "gate_up_proj"])  # fmt: skip
# what the config allows besides (llama.cpp's chatglm does not): head_dim 32, twice hidden / heads
WIDE = Family("GlmConfig", dict(_SHAPE, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                                      "partial_rotary_factor": 0.5}),
              lora_targets=_TARGETS)  # fmt: skip
FAMILIES = {"glm": GLM, "tied_nobias": TIED, "wide_head": WIDE}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GLM.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GLM.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GLM.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", ["glm", "tied_nobias"])
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GLM.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    GLM.check_disk_offload(tmp_path_factory, tmp_path)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Module and parameter names and shapes are transformers' (two norms, gate_up_proj, no o_proj bias); the saved
    config.json has transformers' keys and values, no others."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert type(model).__name__ == "GlmForCausalLM"


def test_default_config_is_transformers():
    """GlmConfig() holds transformers' defaults (head_dim 128, 2 KV heads, partial_rotary_factor 0.5 in the RoPE
    parameters, three EOS ids, rms_norm_eps 1.5625e-7, ...); initializer_range, kept only where given, aside."""
    import transformers

    from autolm.models.glm import GlmConfig

    theirs = json.loads(transformers.GlmConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert GlmConfig().to_dict() == theirs


def test_glm_4_9b_chat_hf_config_spelling(tmp_path_factory, tmp_path):
    """glm-4-9b-chat-hf's config.json as shipped: rope_theta and partial_rotary_factor at the top level, no RoPE
    parameters: the same model, saved back in that spelling, which transformers loads with equal logits."""
    config = GLM.check_top_level_rope(
        tmp_path_factory, tmp_path, {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    )
    assert config.rope_parameters == GLM.checkpoint(tmp_path_factory)[1].config.rope_parameters


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(partial_rotary_factor=0), "partial_rotary_factor"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(head_dim=16, partial_rotary_factor=0.3125), "partial_rotary_factor 0.3125 gives 5"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(
        model_type="glm", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes GlmForCausalLM ("chatglm") -----------------------------


def _chatglm_metadata(w, c) -> None:
    """ChatGLMModel.set_gguf_parameters (conversion/chatglm.py) for a GlmForCausalLM config.json: the context length
    from seq_length, else the hidden size (a GLM config.json has no seq_length), the RMS epsilon from
    layernorm_epsilon, else 1e-5 (none either), the rotary dimensions int(hidden / heads * factor) (no
    attention_dim), the RoPE base 10000 * rope_ratio (none: 10000); no head size, no vocabulary size; no BOS."""
    w.add_context_length(c.hidden_size)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(
        int(c.hidden_size // c.num_attention_heads * c.rope_parameters.get("partial_rotary_factor", 0.5))
    )
    w.add_add_bos_token(False)
    w.add_rope_freq_base(10000)


def write_glm_gguf(hf, path: str, qtype: str | None = None) -> None:
    """The GGUF llama.cpp's converter makes of transformers' GLM `hf` (--outtype f32, or q8_0 with qtype "Q8_0": the
    weights of two dimensions quantized): tensors renamed one to one by gguf-py's chatglm map (q/k/v separate and
    not permuted, gate_up_proj whole as ffn_up, no output tensor where the head is tied), a plain vocabulary."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "chatglm")
    _chatglm_metadata(w, c)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype else gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, c.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, kind = name.rsplit(".", 1)
        out, data = f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy())
        if qtype is not None and data.ndim == 2:
            ggml = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(out, gguf.quants.quantize(data, ggml), raw_dtype=ggml)
        else:
            w.add_tensor(out, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """tests/test_gguf_out.py's byte-level tokenizer (no merges): what save_gguf of a tiny checkpoint writes fast."""
    return _byte_tokenizer(tmp_path_factory.mktemp("glm_tok") / "tok")


@pytest.mark.parametrize("name", ["glm", "tied_nobias"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as GlmForCausalLM with transformers' logits: the head size hidden / heads, the
    rotary share from rope.dimension_count, biases and the tied head from the tensors present; its Q8_0 version,
    kept in its blocks, close to them."""
    _, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_glm_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, hf.config
    assert type(model).__name__ == "GlmForCausalLM" and c.model_type == "glm"
    assert (c.head_dim, c.num_key_value_heads, c.intermediate_size) == (16, 2, 96)
    assert (c.attention_bias, c.tie_word_embeddings) == (want.attention_bias, want.tie_word_embeddings)
    rope = c.rope_parameters
    assert (rope["rope_theta"], rope["partial_rotary_factor"], c.rms_norm_eps) == pytest.approx(
        (10000.0, want.rope_parameters["partial_rotary_factor"], 1e-5)
    )
    ids, mask = padded_batch()
    theirs = _logits(hf, ids, mask)
    torch.testing.assert_close(_logits(model, ids, mask), theirs, atol=1e-4, rtol=1e-4)
    write_glm_gguf(hf, str(tmp_path / "q8.gguf"), "Q8_0")
    kept = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", quantization="gguf")
    assert any(type(m).__name__.startswith("GGML") for m in kept.modules())
    got = _logits(kept, ids, mask)
    assert (got - theirs).abs().mean() < 0.05 * theirs.abs().mean()


def test_gguf_out_keeps_the_models_epsilon_base_and_context(tmp_path_factory, tmp_path, byte_tokenizer):
    """Where the model's RMS epsilon, RoPE base and context length are not the ones the converter writes whatever
    the config says (1e-5, 10000, the hidden size), save_gguf writes the model's, which llama.cpp honours: the file
    loads back as the same model."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = GLM.checkpoint(tmp_path_factory)
    rope = {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}
    config = autolm.AutoConfig.from_pretrained(directory, rms_norm_eps=1.5625e-7, rope_parameters=rope,
                                               max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = autolm.AutoModelForCausalLM.from_config(config)
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    meta = GGUFFile(path).metadata
    assert meta["chatglm.attention.layer_norm_rms_epsilon"] == pytest.approx(1.5625e-7)
    assert (meta["chatglm.rope.freq_base"], meta["chatglm.context_length"]) == (500.0, 256)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    ids = torch.tensor([[5, 17, 33, 2, 98, 140, 7, 61]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(head_dim=32), "head_dim"),
        (
            dict(
                rope_parameters={
                    "rope_type": "dynamic",
                    "factor": 2.0,
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            ),
            "RoPE",
        ),
    ],
)
def test_gguf_out_refuses_what_llama_cpp_cannot_run(
    tmp_path_factory, tmp_path, byte_tokenizer, change, field
):
    """llama.cpp's chatglm takes the head size as hidden / heads (its o_proj (hidden, hidden)) and llama.cpp
    has no dynamic RoPE: another head_dim or dynamic RoPE scaling is refused by name, and no file is written."""
    from autolm.gguf_writer import save_gguf

    directory, _ = GLM.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_config(autolm.AutoConfig.from_pretrained(directory, **change))
    with pytest.raises(ConfigError, match=field):
        save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    assert not os.path.exists(tmp_path / "m.gguf")


# ---- chat template, the command line ---------------------------------------------------------------------------


def test_chat_template(tmp_path):
    """GLM-4-9B-Chat's template ([gMASK]<sop>, <|role|> markers, the tools system prompt): conversations and tools
    render as in transformers."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip
    with_tools = [{"role": "system", "content": "Be brief.", "tools": tools},
                  {"role": "user", "content": "Weather in Paris?"}]  # fmt: skip
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a prime."},
        ],
        with_tools,
    ]
    check_chat_template(tmp_path, "glm-4-9b-chat.jinja", conversations=conversations)


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate --chat` gives transformers' tokens with GLM-4-9B-Chat's template; `autolm inspect` names the
    class and type."""
    check_cli(GLM, "glm-4-9b-chat.jinja", tmp_path_factory, tmp_path, "GlmForCausalLM (glm)")
