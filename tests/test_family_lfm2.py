"""LFM2 against transformers: short-convolution layers (with conv_bias, so in_proj, the depthwise conv and
out_proj all carry biases) around an attention layer with per-head q/k norms and GQA; the feed-forward width
adjusted by block_auto_adjust_ff_dim with a multiplier and block_multiple_of; the checkpoint as transformers writes
it; the standard battery, the recurrent checks (state through the cache in pieces, the serving engine) and a long
greedy generation (a 30-token prompt, 40 new tokens) against transformers'; the CLI with LFM2's chat template."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    block_multiple_of=16,
    block_ffn_dim_multiplier=1.5,
    layer_types=["conv", "full_attention", "conv"],
)
TARGETS = ["q_proj", "v_proj", "in_proj", "out_proj", "w1", "w2", "w3"]  # peft has no default for lfm2
LFM2 = Family("Lfm2Config", dict(SIZES, conv_bias=True), lora_targets=TARGETS)
# attention layers given by full_attn_idxs (no layer_types), no biases, a 4-tap convolution, no adjustment of
# the feed-forward width, an untied head
IDXS = Family(
    "Lfm2Config",
    dict(
        SIZES,
        layer_types=None,
        full_attn_idxs=[0, 2],
        conv_L_cache=4,
        block_auto_adjust_ff_dim=False,
        tie_word_embeddings=False,
    ),
    lora_targets=TARGETS,
)

# what llama.cpp's lfm2 runs: no biases (the width adjusted from intermediate_size, the head tied)
PLAIN = Family("Lfm2Config", SIZES, lora_targets=TARGETS)


def test_logits(tmp_path_factory):
    LFM2.check_logits(tmp_path_factory)
    IDXS.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    LFM2.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens, each new token one step of the convolution from its state: transformers'
    greedy tokens (both checkpoints)."""
    for fam in (LFM2, IDXS):
        fam.check_long_generation(tmp_path_factory, new=40, seed=7, exact_length=True)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without conv_bias: with it, padding's inputs are zeroed before in_proj, whose bias then reaches the
    convolution (as in transformers), so a left-padded row's state is not its unpadded one."""
    IDXS.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    LFM2.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    LFM2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LFM2.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names (the conv weight (h, 1, L)) in the state dict and the saved file; only transformers' config
    keys in the saved config."""
    from safetensors import safe_open

    for fam, out in ((LFM2, tmp_path / "a"), (IDXS, tmp_path / "b")):
        fam.check_save(tmp_path_factory, out)
        directory, hf = fam.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert type(model).__name__ == "Lfm2ForCausalLM"
        ours, theirs = model.state_dict(), hf.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        with (
            safe_open(f"{directory}/model.safetensors", "pt") as a,
            safe_open(out / "saved" / "model.safetensors", "pt") as b,
        ):
            assert set(a.keys()) == set(b.keys())
        keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, out / "saved")]
        assert keys[1] - {"transformers_version"} == keys[0] - {"transformers_version"}
    model = autolm.AutoModelForCausalLM.from_pretrained(LFM2.checkpoint(tmp_path_factory)[0])
    assert model.model.layers[0].conv.conv.weight.shape == (64, 1, 3)
    assert model.model.layers[0].feed_forward.w1.weight.shape == (96, 64)


def test_disk_offload(tmp_path_factory, tmp_path):
    LFM2.check_disk_offload(tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's LFM2Model converter, emulated --------------------------------------------------------------


def write_lfm2_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter makes of transformers' LFM2 `hf` (--outtype f32, or `kind`'s blocks for the
    layers' matrices whose rows it can hold): TextModel's metadata with head_count_kv per layer (0 on the
    convolution layers), feed_forward_length the adjusted width, the vocabulary size, shortconv.l_cache; the
    convolution weight squeezed to (h, L) (kept F32); the rest by gguf-py's name map (embedding_norm ->
    token_embd_norm); a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    kv = [c.num_key_value_heads if t == "full_attention" else 0 for t in c.layer_types]
    ff = int(hf.model.layers[0].feed_forward.w1.weight.shape[0])
    w = gguf.GGUFWriter(path, "lfm2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(ff)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_vocab_size(c.vocab_size)
    w.add_shortconv_l_cache(c.conv_L_cache)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2, c.num_hidden_layers)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if "conv.conv" in name:
            t = t.squeeze(1)  # LFM2Model.modify_tensors: "conv op requires 2d tensor"
        base, suffix = name.rsplit(".", 1)
        new, data = f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(t.float().numpy())
        if kind != "F32" and data.ndim == 2 and new.startswith("blk.") and data.shape[1] % 32 == 0:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()].float()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's files (attention layers from layer_types and from full_attn_idxs, the width adjusted or
    not, the head tied or not) load as Lfm2ForCausalLM with the layer kinds, widths and transformers' logits; Q8_0
    with quantization="gguf": close."""
    ids, mask = padded_batch()
    for i, fam in enumerate((PLAIN, IDXS)):
        _, hf = fam.checkpoint(tmp_path_factory)
        write_lfm2_gguf(hf, str(tmp_path / f"m{i}.gguf"))
        model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m{i}.gguf")
        assert type(model).__name__ == "Lfm2ForCausalLM"
        assert model.config.layer_types == hf.config.layer_types
        assert (model.config.ff_dim, model.config.conv_L_cache) == (
            hf.model.layers[0].feed_forward.w1.weight.shape[0],
            hf.config.conv_L_cache,
        )
        assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
        want = _logits(hf, ids, mask)
        torch.testing.assert_close(_logits(model, ids, mask), want, atol=1e-4, rtol=1e-4)
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    write_lfm2_gguf(hf, str(tmp_path / "q.gguf"), "Q8_0")
    q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
    assert type(q.model.layers[0].conv.in_proj).__name__ == "GGMLLinear"  # the file's Q8_0 blocks
    got, want = _logits(q, ids, mask), _logits(hf, ids, mask)
    # the tiny random model's gated products amplify Q8_0's rounding: 3% dequantized, 5% with the blocks
    assert (got - want).abs().mean() <= 0.08 * want.abs().mean()


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """test_gguf_out's byte-level tokenizer (imported here, not at the top: that module imports every family)."""
    from test_gguf_out import byte_tokenizer

    return byte_tokenizer.__wrapped__(tmp_path_factory)


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer):
    """llama.cpp's short convolution has no biases: a model with conv_bias is refused, naming it."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(LFM2.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.ConfigError, match="conv_bias"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_cli(tmp_path_factory, tmp_path):
    """LFM2's ChatML chat template (with its <|startoftext|> BOS)."""
    long = Family(LFM2.config_cls, dict(LFM2.kwargs, max_position_embeddings=2048), lora_targets=TARGETS)
    check_cli(long, "lfm2.jinja", tmp_path_factory, tmp_path, "Lfm2ForCausalLM (lfm2)")


def test_config_reads_the_original_names(tmp_path):
    """block_ff_dim, tie_embedding and norm_eps as transformers reads them; RoPE base 1e6 where none is given;
    layer_types from full_attn_idxs (all layers attention by default)."""
    from autolm.models.lfm2 import Lfm2Config

    d = {"block_ff_dim": 300, "tie_embedding": False, "norm_eps": 1e-6, "num_hidden_layers": 3,
         "full_attn_idxs": [2], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    c = Lfm2Config.from_dict(d)
    assert (c.intermediate_size, c.tie_word_embeddings, c.rms_norm_eps, c.norm_eps) == (
        300,
        False,
        1e-6,
        1e-6,
    )
    assert c.layer_types == ["conv", "conv", "full_attention"]
    assert c.rope_theta == 1e6
    out = c.to_dict()
    assert "block_ff_dim" not in out and out["norm_eps"] == 1e-6 and "rms_norm_eps" not in out
    assert Lfm2Config(num_hidden_layers=2).layer_types == ["full_attention"] * 2
    assert Lfm2Config(intermediate_size=300, block_multiple_of=16).ff_dim == 208  # 200 rounded up to 16s


def test_config_errors_name_the_key():
    from autolm.models.lfm2 import Lfm2Config

    with pytest.raises(autolm.ConfigError, match="layer_types"):
        Lfm2Config(num_hidden_layers=2, layer_types=["conv", "sliding_attention"])
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        Lfm2Config(num_hidden_layers=2, layer_types=["conv"])
    with pytest.raises(autolm.ConfigError, match="full_attn_idxs"):
        Lfm2Config(num_hidden_layers=2, full_attn_idxs="0")
    with pytest.raises(autolm.ConfigError, match="conv_L_cache"):
        Lfm2Config(conv_L_cache=0)
    with pytest.raises(autolm.ConfigError, match="conv_bias"):
        Lfm2Config(conv_bias="no")
    with pytest.raises(autolm.ConfigError, match="block_multiple_of"):
        Lfm2Config(block_multiple_of=1.5)
    with pytest.raises(autolm.ConfigError, match="block_ffn_dim_multiplier"):
        Lfm2Config(block_ffn_dim_multiplier=-1)
    with pytest.raises(autolm.ConfigError, match="intermediate_size"):
        Lfm2Config(intermediate_size=1, block_ffn_dim_multiplier=None)
