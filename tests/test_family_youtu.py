"""Youtu-LLM against transformers and peft: DeepSeek-V3's Multi-head Latent Attention (the low-rank query, the
compressed KV latent with the shared rotary key, RoPE over interleaved pairs, v narrower than q/k) in Llama's layer
with Qwen 3's gated MLP in every layer and a tied head; and a variant with a plain q_proj, rotate-half RoPE,
attention biases, v wider than q/k, YaRN with mscale_all_dim, an untied head. The standard battery, config.json as
transformers writes it (its initializer ranges kept), GGUF as llama.cpp's DeepseekV2Model converter writes it (in,
and out refused where llama.cpp's deepseek2 would run another model; out in tests/test_gguf_out.py, run by llama.cpp
in tests/test_gguf_llamacpp.py).

transformers' Youtu zeroes the embedding row of pad_token_id whenever it loads a checkpoint (its _init_weights runs
on the loaded embedding): the checkpoints here hold that row zero, as transformers initialises it, so that both
libraries run the same weights."""

from __future__ import annotations

import json

import family_checks
import gguf
import numpy as np
import pytest
import torch
from conftest import padded_batch, positions, randomize
from family_checks import Family
from gguf_mimic import add_mla_lengths
from gguf_moe import mla_pieces
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_glm4_moe import byte_tokenizer  # noqa: F401

import autolm


def randomize_keeping_pad(model: torch.nn.Module, seed: int = 0) -> None:
    """conftest's randomize, then the pad token's embedding row zero again, as transformers' Youtu keeps it."""
    randomize(model, seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[model.config.pad_token_id].zero_()


class YoutuFamily(Family):
    def checkpoint(self, tmp_path_factory, dtype=None):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(family_checks, "randomize", randomize_keeping_pad)
            return super().checkpoint(tmp_path_factory, dtype)


SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=64,
)
# peft has no default target modules for youtu
TARGETS = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "down_proj"]
YOUTU = YoutuFamily("YoutuConfig", SIZES, lora_targets=TARGETS)
PLAIN_Q = YoutuFamily(
    "YoutuConfig",
    dict(SIZES, q_lora_rank=None, rope_interleave=False, attention_bias=True, v_head_dim=32, tie_word_embeddings=False,
         max_position_embeddings=256,
         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.8,
                              beta_fast=32, beta_slow=1, original_max_position_embeddings=64)),
    lora_targets=TARGETS,
)  # fmt: skip
FAMILIES = {"youtu": YOUTU, "plain_q": PLAIN_Q}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    YOUTU.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    YOUTU.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_lora(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    YOUTU.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers' names and shapes (no lm_head in the tied checkpoint's file), config.json's keys and values
    (qk_head_dim and the initializer ranges as transformers writes them, none of DeepSeek-V3's expert keys)."""
    _, saved = FAMILIES[name].check_saved_files(tmp_path_factory, tmp_path)
    assert ("lm_head.weight" in saved) == (name == "plain_q")


def test_attention_shape_and_scale(tmp_path_factory):
    """The KV cache holds every head at max(qk_head_dim, v_head_dim); the score scale is transformers' (YaRN's
    mscale_all_dim squared on qk_head_dim ** -0.5 in the YaRN checkpoint); every layer's MLP is a plain gated MLP."""
    for name, want in (("youtu", (4, 24)), ("plain_q", (4, 32))):
        directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert model.attention_shapes()[0] == want
        ours, theirs = model.model.layers[1].self_attn.scaling, hf.model.layers[1].self_attn.scaling
        assert ours == pytest.approx(theirs, rel=1e-12)
        assert (ours != pytest.approx(24**-0.5)) == (name == "plain_q")
        assert {type(layer.mlp).__name__ for layer in model.model.layers} == {"GatedMLP"}


def test_default_config_is_transformers():
    """YoutuConfig() holds transformers' defaults (Youtu-LLM-2B's sizes, head_dim = qk_rope_head_dim, qk_head_dim
    written, no expert keys); the initializer ranges transformers derives, kept only where given, aside."""
    import transformers

    from autolm.models.youtu import YoutuConfig

    theirs = json.loads(transformers.YoutuConfig().to_json_string())
    for key in ("transformers_version", "initializer_range", "embedding_initializer_range"):
        theirs.pop(key)
    assert YoutuConfig().to_dict() == theirs


def test_config_errors_name_the_key():
    from autolm.models.youtu import YoutuConfig

    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    YoutuConfig(**small)
    for key, bad in (("q_lora_rank", 0), ("kv_lora_rank", None), ("qk_rope_head_dim", 7), ("v_head_dim", -1),
                     ("num_key_value_heads", 2), ("rope_interleave", "yes"), ("attention_bias", 1)):  # fmt: skip
        with pytest.raises(autolm.ConfigError, match=key):
            YoutuConfig.from_dict({**small, key: bad})


# ---- GGUF: llama.cpp's DeepseekV2Model converter, emulated ------------------------------------------------------


def write_youtu_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (DeepseekV2Model, --outtype f32) makes of transformers' Youtu `hf`, from the
    checkpoint files as it reads them: TextModel's metadata with num_key_value_heads 1 (MLA as MQA), the key / value
    lengths of the latent; every layer dense (leading_dense_block_count = block_count, no expert count, no shared
    experts, intermediate_size as expert_feed_forward_length); kv_b_proj split per head into attn_k_b
    (transposed) and attn_v_b, the tied head not written, the rest by gguf-py's name map; a vocabulary of vocab_size
    tokens."""
    from safetensors.torch import load_file

    c = json.load(open(f"{hf.name_or_path}/config.json"))
    rope, n = c["rope_parameters"], c["num_hidden_layers"]
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(n)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_leading_dense_block_count(n)
    w.add_vocab_size(c["vocab_size"])
    if c["q_lora_rank"] is not None:
        w.add_q_lora_rank(c["q_lora_rank"])
    add_mla_lengths(w, c)
    w.add_expert_feed_forward_length(c["intermediate_size"])
    w.add_expert_shared_count(0)
    w.add_rope_dimension_count(c["qk_rope_head_dim"])
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, c["vocab_size"]))])
    w.add_token_scores([0.0] * c["vocab_size"])
    w.add_token_types([3, 3, 3] + [1] * (c["vocab_size"] - 3))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, n)
    heads, nope = c["num_attention_heads"], c["qk_nope_head_dim"]
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        for piece, value in mla_pieces(name, t, heads, nope):
            base, kind = piece.rsplit(".", 1)
            w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(value.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as Youtu (not DeepSeek-V2 or V3, which share "deepseek2") with transformers'
    logits, its config holding none of DeepSeek-V3's expert keys; int8 from it too."""
    _, hf = YOUTU.checkpoint(tmp_path_factory)
    write_youtu_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "YoutuForCausalLM"
    assert model.config.tie_word_embeddings and model.config.extra == {}
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(
            model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real],
            want,
            atol=1e-4,
            rtol=1e-4,
        )
        quant = autolm.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="model.gguf", quantization="int8"
        )
        got = quant(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()


@pytest.mark.parametrize(
    ("name", "change", "refused"),
    [
        ("plain_q", {}, "rope_interleave"),  # llama.cpp's deepseek2 turns interleaved pairs only
        ("youtu", {"attention_bias": True}, "attention_bias"),  # and has no attention biases
        ("youtu", {"q_lora_rank": None}, "q_lora_rank"),  # which it reads for all but its 'lite' layer counts
    ],
)
def test_gguf_out_refused(tmp_path_factory, tmp_path, byte_tokenizer, name, change, refused):  # noqa: F811
    """What llama.cpp's deepseek2 would run otherwise is refused, naming it, and no file is written (the config
    changed on the loaded model: what GGUF out reads)."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FAMILIES[name].checkpoint(tmp_path_factory)[0])
    for key, value in change.items():
        setattr(model.config, key, value)
    with pytest.raises(autolm.ConfigError, match=refused):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
