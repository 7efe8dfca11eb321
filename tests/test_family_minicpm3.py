"""MiniCPM3 against transformers and peft: DeepSeek-V2's Multi-head Latent Attention with rotate-half RoPE (with
and without the low-rank query, v wider than q/k), LongRoPE (short and long factors, an attention factor where
max_position_embeddings passes the original length), the muP multipliers (scale_emb, scale_depth, dim_model_base),
attention and MLP biases, tied and untied heads. The standard battery, config.json as transformers writes it, GGUF
as llama.cpp's MiniCPM3Model converter writes it (in, out, Q8_0), what llama.cpp's minicpm3 cannot run refused,
the config values refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from gguf_mimic import add_toy_vocab
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm

SIZES = dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
             q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, max_position_embeddings=64)  # fmt: skip
_LONG = [1.0, 1.5, 2.0, 3.0]
_SHORT = [1.1, 1.2, 1.3, 1.4]
# peft has no default target modules for minicpm3
_TARGETS = [
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
# MiniCPM3-4B's shape: the low-rank query, LongRoPE (past the original length here: the long factors and an attention
# factor), the multipliers (not the real ones), a tied head
LONGROPE = Family(
    "MiniCPM3Config",
    dict(SIZES, scale_emb=3.0, scale_depth=2.0, dim_model_base=16,
         rope_scaling=dict(type="longrope", long_factor=_LONG, short_factor=_SHORT, original_max_position_embeddings=8)),
    lora_targets=_TARGETS,
)  # fmt: skip
# a plain q_proj, biases on q_a / kv_a / o and the MLP, v wider than q/k (32 > 24: q, k padded), an untied head, the
# null multipliers (no scaling), another RoPE base
PLAIN = Family(
    "MiniCPM3Config",
    dict(SIZES, q_lora_rank=None, attention_bias=True, mlp_bias=True, v_head_dim=32, tie_word_embeddings=False,
         scale_depth=None, dim_model_base=None, scale_emb=0.5, rope_theta=500.0),
    lora_targets=["q_proj", "kv_b_proj", "o_proj"],
)  # fmt: skip
FAMILIES = {"longrope": LONGROPE, "plain": PLAIN}
# what llama.cpp's minicpm3 runs: its multipliers (12, 1.4, 256), a low-rank query, v of hidden / heads, RoPE base
# 10000, LongRoPE's original length the context length (512: llama.cpp switches to the long factors once the
# context it allocates, 256 at least, passes it); rows of whole Q8_0 blocks (32 columns)
_GGUF_SIZES = dict(SIZES, intermediate_size=64, kv_lora_rank=32)
GGUF_FAMILIES = {
    "longrope": Family(
        "MiniCPM3Config",
        dict(_GGUF_SIZES, rope_scaling=dict(type="longrope", long_factor=_LONG, short_factor=_SHORT,
                                      original_max_position_embeddings=512), max_position_embeddings=512),
    ),
    "untied": Family("MiniCPM3Config", dict(_GGUF_SIZES, tie_word_embeddings=False, rms_norm_eps=1e-6)),
}  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    LONGROPE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LONGROPE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes in the state dict; the checkpoint's tensors and transformers' config.json
    (keys and values) in the files autolm saves."""
    model, _ = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert type(model).__name__ == "MiniCPM3ForCausalLM"


def test_disk_offload(tmp_path_factory, tmp_path):
    LONGROPE.check_disk_offload(tmp_path_factory, tmp_path)


def test_the_multipliers_and_the_long_factors_matter(tmp_path_factory):
    """Past the original length (the long factors, the attention factor) autolm's logits are transformers'; each
    multiplier and the long factors change them (so the checks compare them)."""
    directory, hf = LONGROPE.checkpoint(tmp_path_factory)
    ids = torch.arange(3, 23).view(1, 20)  # past original_max_position_embeddings (8)
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(autolm.AutoModelForCausalLM.from_pretrained(directory)(ids).logits, want,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    rope = dict(hf.config.rope_parameters, long_factor=_SHORT)
    rope.pop("type", None)
    for key, value in (
        ("scale_emb", 1.0),
        ("scale_depth", 1.0),
        ("dim_model_base", 64),
        ("rope_parameters", rope),
    ):
        model = autolm.AutoModelForCausalLM.from_pretrained(directory, **{key: value})
        assert getattr(model.config, key) == value
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, want, atol=1e-3), key


def test_inputs_embeds_are_not_scaled_as_transformers(tmp_path_factory):
    """scale_emb is the embedding's own (transformers' scaled embedding): inputs_embeds given go in unscaled."""
    directory, hf = LONGROPE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    embeds = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours, model(inputs_embeds=embeds * 3.0).logits, atol=1e-3)


# ---- GGUF: llama.cpp's MiniCPM3Model converter, emulated ------------------------------------------------------


def write_minicpm3_gguf(hf, path: str, qtype: str | None = None, q_lora_rank: bool = True) -> None:
    """The GGUF llama.cpp's converter (MiniCPM3Model, --outtype f32, or q8_0 with qtype "Q8_0": the weights of
    two dimensions quantized) makes of transformers' MiniCPM3 `hf`: its own set_gguf_parameters (no RoPE base, no
    value length, the whole q/k head as key_length, the rope part as rope.dimension_count), LongRoPE's factors as
    rope_factors_long / rope_factors_short, the tensors renamed one to one (kv_b_proj whole as attn_kv_b, no output
    tensor where the head is tied), a SentencePiece-style vocabulary. `q_lora_rank` False leaves its key out."""
    import gguf
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope = c["rope_parameters"]
    w = gguf.GGUFWriter(path, "minicpm3")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype else gguf.LlamaFileType.ALL_F32)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(c["vocab_size"])
    if c.get("q_lora_rank") is not None and q_lora_rank:
        w.add_q_lora_rank(c["q_lora_rank"])
    w.add_kv_lora_rank(c["kv_lora_rank"])
    w.add_key_length(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    add_toy_vocab(w)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope.get("long_factor") or rope.get("short_factor"):
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MINICPM3, c["num_hidden_layers"])
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
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


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return _byte_tokenizer(tmp_path_factory.mktemp("minicpm3") / "tokenizer")


def _logits(model, hf=None) -> torch.Tensor:
    ids, mask = padded_batch()
    with torch.no_grad():
        return (hf or model)(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


@pytest.mark.parametrize("name", GGUF_FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as MiniCPM3ForCausalLM with transformers' logits (the head sizes, LongRoPE, the
    tied head read back); its Q8_0 version, kept in its blocks, close to them."""
    _, hf = GGUF_FAMILIES[name].checkpoint(tmp_path_factory)
    write_minicpm3_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    c, want = model.config, hf.config
    assert type(model).__name__ == "MiniCPM3ForCausalLM"
    for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_lora_rank",
                "tie_word_embeddings", "scale_emb", "scale_depth", "dim_model_base"):  # fmt: skip
        assert getattr(c, key) == getattr(want, key), key
    assert c.rope_parameters["rope_type"] == want.rope_parameters["rope_type"]
    torch.testing.assert_close(_logits(model), _logits(None, hf), atol=1e-4, rtol=1e-4)
    write_minicpm3_gguf(hf, str(tmp_path / "q8.gguf"), "Q8_0")
    q8 = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", quantization="gguf")
    theirs = _logits(None, hf)
    assert (_logits(q8) - theirs).abs().max() < 0.05 * theirs.abs().max()


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"scale_emb": 3.0}, "scale_emb"),
        ({"scale_depth": 2.0}, "scale_depth"),
        ({"dim_model_base": 16}, "dim_model_base"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"v_head_dim": 32}, "v_head_dim"),
        ({"rope_theta": 500.0}, "RoPE"),
        ({"rope_type": "yarn"}, "rope_type"),
        ({"original_max_position_embeddings": 8}, "original_max_position_embeddings"),
        ({"attention_factor": 1.2}, "RoPE"),
        ({"mscale_all_dim": 1.0, "factor": 2.0}, "attention scale"),
    ],
)
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, change, refused):
    """What llama.cpp's minicpm3 cannot run is refused, naming it: multipliers other than its built-in 12, 1.4 and
    256, biases, a plain q projection, a value head other than hidden / heads, a RoPE base other than 10000 (the
    converter writes none), RoPE scaling but LongRoPE's factors, LongRoPE switching or scaling otherwise than
    llama.cpp does."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(
        GGUF_FAMILIES["longrope"].checkpoint(tmp_path_factory)[0]
    )
    rope = model.config.rope_parameters
    for key, value in change.items():
        if key == "rope_type":
            rope.update(rope_type="yarn", factor=2.0)
        elif key in rope or key in ("rope_theta", "attention_factor", "mscale_all_dim", "factor"):
            rope[key] = value
        else:
            setattr(model.config, key, value)
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")


def test_gguf_without_q_lora_rank_is_refused(tmp_path_factory, tmp_path):
    """A file without attention.q_lora_rank (llama.cpp's minicpm3 requires it) is refused, naming it."""
    _, hf = GGUF_FAMILIES["untied"].checkpoint(tmp_path_factory)
    write_minicpm3_gguf(hf, str(tmp_path / "model.gguf"), q_lora_rank=False)
    with pytest.raises(autolm.ConfigError, match="q_lora_rank"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")


# ---- config ------------------------------------------------------------------------------------------------------


def test_default_config_is_transformers():
    """MiniCPM3Config() holds transformers' defaults; initializer_range and pretraining_tp, kept only where given,
    aside."""
    import transformers

    from autolm.models.minicpm3 import MiniCPM3Config

    check_config_defaults(MiniCPM3Config)
    theirs = json.loads(transformers.MiniCPM3Config().to_json_string())
    for key in ("transformers_version", "initializer_range", "pretraining_tp"):
        theirs.pop(key)
    assert MiniCPM3Config().to_dict() == theirs


def test_null_fields_resolve_as_transformers():
    import transformers

    from autolm.models.minicpm3 import MiniCPM3Config

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, v_head_dim=None, scale_depth=None,
              dim_model_base=None, rope_scaling=dict(type="longrope", long_factor=[1.0] * 16, short_factor=[1.0] * 16))  # fmt: skip
    ours, theirs = MiniCPM3Config.from_dict(kw), transformers.MiniCPM3Config(**kw)
    for key in ("v_head_dim", "scale_depth", "dim_model_base", "head_dim", "qk_head_dim", "logits_scaling"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_parameters["original_max_position_embeddings"] == 32768
    assert theirs.rope_parameters["original_max_position_embeddings"] == 32768


def test_cli(tmp_path_factory, tmp_path):
    """MiniCPM3's ChatML (<|im_start|> / <|im_end|>) through the test templates' ChatML one."""
    long = Family(LONGROPE.config_cls, dict(SIZES, max_position_embeddings=2048), lora_targets=["q_b_proj"])
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "MiniCPM3ForCausalLM (minicpm3)")


def test_config_errors_name_the_key():
    from autolm.models.minicpm3 import MiniCPM3Config

    small = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, qk_rope_head_dim=8
    )
    MiniCPM3Config.from_dict(small)
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 1e4,
        "short_factor": [1.0] * 4,
        "long_factor": [1.0] * 4,
    }
    MiniCPM3Config.from_dict({**small, "rope_parameters": longrope})
    for key, bad in (
        ("q_lora_rank", 0),
        ("kv_lora_rank", None),
        ("qk_rope_head_dim", 7),
        ("qk_nope_head_dim", "16"),
        ("v_head_dim", -1),
        ("num_key_value_heads", 2),
        ("scale_emb", "12"),
        ("scale_depth", float("inf")),
        ("dim_model_base", 0.5),
        ("attention_bias", "no"),
        ("mlp_bias", 1),
        ("hidden_size", 66),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            MiniCPM3Config.from_dict({**small, key: bad})
    for name, bad in (
        ("short_factor", [1.0] * 3),
        ("long_factor", None),
        ("long_factor", [1.0, 1.0, 0.0, 1.0]),
    ):
        with pytest.raises(autolm.ConfigError, match=name):
            MiniCPM3Config.from_dict({**small, "rope_parameters": {**longrope, name: bad}})
