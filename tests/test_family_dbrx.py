"""DBRX against transformers and peft: the nested attn_config / ffn_config, GQA in the fused Wqkv clamped by
clip_qkv (small enough to clamp the tiny model's
norm_1 outputs), LayerNorm without bias, 4 experts of which each token uses 2 weighted by the
top-k softmax divided by its p-norm (p = 2 here), the experts stored as (E * I, h) matrices w1 / v1 / w2; the
standard battery, config.json as transformers writes it and as the original files give RoPE's base (in
attn_config only), GGUF as llama.cpp's DbrxModel converter writes it (in, and out of autolm), and the CLI (with
ChatML's template, which DBRX Instruct's follows)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

ROPE = {"rope_type": "default", "rope_theta": 5e5}


def _dbrx(clip: float | None = 0.1, p: float | None = 2.0, **kwargs) -> dict:
    """A tiny DBRX: attn_config's rope_theta equal to the top-level one (transformers 5 reads the latter only)."""
    return dict(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=64,
        rope_parameters=ROPE,
        attn_config=dict(kv_n_heads=2, clip_qkv=clip, rope_theta=ROPE["rope_theta"]),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=p),
        **kwargs,
    )


# peft has no default target modules for dbrx
DBRX = Family("DbrxConfig", _dbrx(), lora_targets=["Wqkv", "out_proj"])
# what llama.cpp's dbrx computes: the top k renormalised to sum 1 (p = 1); it clamps as transformers does
PLAIN = Family("DbrxConfig", _dbrx(p=1.0))


def test_logits(tmp_path_factory):
    DBRX.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    DBRX.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DBRX.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    DBRX.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    DBRX.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    DBRX.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DBRX.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DBRX.check_disk_offload(tmp_path_factory, tmp_path)


def test_clamp_and_p_norm_change_the_logits(tmp_path_factory):
    """The tiny checkpoint exercises both quirks: without the clamp, or with the weights renormalised to sum 1,
    the logits move well beyond test_logits' tolerance."""
    directory, _ = DBRX.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        for block in model.transformer.blocks:
            block.norm_attn_norm.attn.clip_qkv = None
        unclamped = model(ids, attention_mask=mask).logits
        for block in model.transformer.blocks:
            block.norm_attn_norm.attn.clip_qkv = 0.1
            block.ffn.router.p = 1.0
        summed = model(ids, attention_mask=mask).logits
    assert (unclamped - base).abs().max() > 1e-2 and (summed - base).abs().max() > 1e-3  # test_logits: 1e-4


def test_save_and_names(tmp_path_factory, tmp_path):
    """transformers loads what autolm saves; the model's names are transformers' (`transformer.wte`, `blocks`,
    `norm_attn_norm.attn.Wqkv`, `ffn.router.layer`, `norm_f`) but for the experts, held stacked; the saved files
    hold the checkpoint's (E * I, h) w1 / v1 / w2 with its bytes, and config.json as transformers wrote it."""
    DBRX.check_save(tmp_path_factory, tmp_path)
    directory, hf = DBRX.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.model is model.transformer and model.get_input_embeddings() is model.transformer.wte
    stacked = {"w1": "gate_up_proj", "v1": "gate_up_proj", "w2": "down_proj"}
    theirs = {re.sub(r"mlp\.(w1|v1|w2)$", lambda m: stacked[m[1]], k) for k in hf.state_dict()}
    assert set(model.state_dict()) == theirs and "transformer.blocks.1.ffn.router.layer.weight" in theirs
    theirs, ours = (load_file(f"{d}/model.safetensors") for d in (directory, tmp_path / "saved"))
    assert ours.keys() == theirs.keys() and all(torch.equal(t, ours[k]) for k, t in theirs.items())
    base = autolm.AutoModel.from_pretrained(
        directory
    )  # transformers' DbrxModel: names without `transformer.`
    base.save_pretrained(tmp_path / "base")
    assert set(load_file(tmp_path / "base" / "model.safetensors")) == {k.removeprefix("transformer.") for k in theirs
                                                                        if k.startswith("transformer.")}  # fmt: skip
    saved, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    assert saved.pop("transformers_version", None) == original.pop("transformers_version")
    assert saved == original


def test_config_round_trips_and_reads_the_original_rope(tmp_path):
    """config.json as transformers writes it comes back unchanged; DBRX's original files give RoPE's base only in
    attn_config (read there, as transformers 4 and llama.cpp do); a top-level one wins (as transformers 5)."""
    from autolm.models.dbrx import DbrxConfig

    c = DbrxConfig(**_dbrx(clip=8.0, p=None))
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert (c.intermediate_size, c.num_local_experts, c.num_experts_per_tok) == (32, 4, 2)
    assert (c.clip_qkv, c.moe_normalize_expert_weights, c.rope_theta) == (8.0, None, 5e5)
    d = DbrxConfig()
    assert (d.num_key_value_heads, d.num_experts_per_tok, d.num_local_experts, d.intermediate_size) == (
        1,
        1,
        4,
        3584,
    )
    assert (d.clip_qkv, d.moe_normalize_expert_weights, d.bos_token_id, d.hidden_act) == (
        None,
        1.0,
        None,
        "silu",
    )
    original = dict(model_type="dbrx", d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB,
                    attn_config={"kv_n_heads": 2, "clip_qkv": 8, "rope_theta": 500000},
                    ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2,
                                "ffn_act_fn": {"name": "silu"}, "moe_jitter_eps": 0.01})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(original))
    c = autolm.AutoConfig.from_pretrained(tmp_path)
    assert (c.rope_theta, c.clip_qkv, c.moe_jitter_eps, c.max_position_embeddings) == (5e5, 8, 0.01, 2048)
    (tmp_path / "config.json").write_text(json.dumps({**original, "rope_theta": 1e4}))
    assert autolm.AutoConfig.from_pretrained(tmp_path).rope_theta == 1e4


def test_config_errors_name_the_key(tmp_path):
    base = _dbrx()
    base.pop("rope_parameters")
    base = dict(base, model_type="dbrx", vocab_size=VOCAB)
    attn, ffn = base["attn_config"], base["ffn_config"]
    for change, key in (
        (dict(ffn_config={**ffn, "moe_top_k": 5}), "ffn_config.moe_top_k"),
        (dict(ffn_config={**ffn, "moe_top_k": "2"}), "ffn_config.moe_top_k"),
        (dict(ffn_config={**ffn, "moe_num_experts": 0}), "ffn_config.moe_num_experts"),
        (
            dict(ffn_config={**ffn, "moe_normalize_expert_weights": -1}),
            "ffn_config.moe_normalize_expert_weights",
        ),
        (dict(ffn_config={**ffn, "moe_jitter_eps": 2}), "ffn_config.moe_jitter_eps"),
        (dict(ffn_config={**ffn, "ffn_hidden_size": 0}), "ffn_config.ffn_hidden_size"),
        (dict(ffn_config={**ffn, "ffn_act_fn": {"name": "swiglu"}}), "ffn_config.ffn_act_fn"),
        (dict(ffn_config={**ffn, "ffn_act_fn": "silu"}), "ffn_config.ffn_act_fn"),
        (dict(attn_config={**attn, "clip_qkv": 0}), "attn_config.clip_qkv"),
        (dict(attn_config={**attn, "kv_n_heads": 3}), "attn_config.kv_n_heads"),
        (dict(attn_config=[1]), "attn_config"),
        (dict(ffn_config="x"), "ffn_config"),
        (dict(d_model=-1), "d_model"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(
            ConfigError, match=rf"(?<![.\w]){re.escape(key)}\b"
        ):  # named once, as in config.json
            autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF: llama.cpp's DbrxModel converter, emulated ------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level BPE vocabulary without merges (test_gguf_out's; not imported from there, whose collection
    imports every registered family): what a save_gguf of a tiny checkpoint writes fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    d = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(d))


def write_dbrx_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' DBRX `hf` (--outtype f32), from the checkpoint files as
    the converter reads them: DbrxModel.set_gguf_parameters' keys only (RoPE's base from attn_config, clamp_kqv,
    the LayerNorm epsilon as 1e-5, no vocabulary size or head size); each expert matrix viewed (E, I, h), w2's
    transposed to (E, h, I), named with ".weight" added; the rest by gguf-py's name map; a plain vocabulary."""
    import gguf

    c = hf.config
    ffn, attn = c.ffn_config, c.attn_config
    w = gguf.GGUFWriter(path, "dbrx")
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(ffn.ffn_hidden_size)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(attn.kv_n_heads)
    w.add_rope_freq_base(attn.rope_theta)
    w.add_clamp_kqv(attn.clip_qkv)
    w.add_expert_count(ffn.moe_num_experts)
    w.add_expert_used_count(ffn.moe_top_k)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DBRX, c.n_layers)
    E, inner = ffn.moe_num_experts, ffn.ffn_hidden_size
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        if ".ffn.experts.mlp." in name:
            t = t.view(E, inner, c.d_model)
            if name.endswith(".w2"):
                t = t.permute(0, 2, 1)
            name += ".weight"
        new = names.get_name(name, try_suffixes=(".weight",))
        w.add_tensor(new, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as DbrxForCausalLM with transformers' logits (the clamp read from clamp_kqv);
    int8 from it quantizes the experts."""
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    write_dbrx_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "DbrxForCausalLM"
    assert (model.config.clip_qkv, model.config.num_key_value_heads, model.config.rope_theta) == (
        pytest.approx(0.1),
        2,
        5e5,
    )
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].ffn.experts).__name__ == "Int8Experts"


def test_gguf_out_without_clamp_and_refusals(tmp_path_factory, tmp_path, byte_tokenizer):
    """A model without clip_qkv is written with clamp_kqv 0 (llama.cpp's "no clamp"; the converter itself needs a
    clamp) and reads back without one; the p-norm llama.cpp cannot run (p = 2) is refused, naming the field."""
    from autolm.gguf_writer import save_gguf

    unclamped = Family("DbrxConfig", _dbrx(clip=None, p=1.0))
    directory, _ = unclamped.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    save_gguf(model, byte_tokenizer, str(tmp_path / "m.gguf"), "f32")
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back.config.clip_qkv is None
    ids, mask = padded_batch()  # (transformers' DbrxAttention fails without a clamp: torch.clamp(None, None))
    torch.testing.assert_close(_logits(back, ids, mask), _logits(model, ids, mask), atol=1e-5, rtol=1e-5)
    p2 = autolm.AutoModelForCausalLM.from_pretrained(DBRX.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="'dbrx' model.*moe_normalize_expert_weights"):
        save_gguf(p2, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not os.path.exists(tmp_path / "no.gguf")


# ---- CLI ---------------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """DBRX Instruct's template is ChatML's (<|im_start|> turns, with a long default system prompt); Qwen MoE's
    ChatML template stands in."""
    long = Family(DBRX.config_cls, dict(DBRX.kwargs, max_seq_len=2048), lora_targets=DBRX.lora_targets)
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "DbrxForCausalLM (dbrx)")
