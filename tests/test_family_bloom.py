"""BLOOM against transformers and peft: bloom-560m's shape (4 heads: power-of-two ALiBi slopes, the tied head) and
one with every quirk on (6 heads: the extra odd-power slopes; apply_residual_connection_post_layernorm, an untied
head, another LayerNorm epsilon, pretraining_tp 2, which alone changes nothing); the standard
battery; ALiBi over long greedy generations of a left-padded batch (fp32 and bf16; the general forward, the eager
and the compiled one-token step); config.json's names and bad values refused naming the key; the tensor-parallel
refusal; GGUF as llama.cpp's BloomModel converter writes it (q/k/v rows regrouped), in and out; the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import _same_file, byte_tokenizer  # noqa: F401

import autolm
from autolm.errors import ConfigError

MAIN = Family("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4))
QUIRKS = Family(
    "BloomConfig",
    dict(hidden_size=72, n_layer=3, n_head=6, apply_residual_connection_post_layernorm=True,
         tie_word_embeddings=False, layer_norm_epsilon=1e-3, pretraining_tp=2),
)  # fmt: skip
FAMILIES = {"main": MAIN, "quirks": QUIRKS}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16(tmp_path_factory, name):
    FAMILIES[name].check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name", FAMILIES)
def test_long_generation_under_alibi(tmp_path_factory, name):
    """28 greedy tokens of a left-padded batch (rows 14 and 5 tokens long, so ALiBi's biases reach 40 positions and
    the rows' padding shifts their slots): transformers' tokens in fp32 from the general forward and from the
    one-token step; and each generated sequence, fed whole, gives transformers' logits at every real position."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids, mask = padded_batch(seed=3, lengths=(14, 5))
    kw = dict(attention_mask=mask, max_new_tokens=28, do_sample=False)
    theirs = hf.generate(ids, **kw)
    for mode in ("forward", "eager"):
        model.decode_mode = mode
        assert torch.equal(model.generate(ids, **kw), theirs), mode
    full = torch.cat([mask, torch.ones(2, 28, dtype=mask.dtype)], 1)
    real = full.bool()
    with torch.no_grad():
        want = hf(theirs, attention_mask=full).logits[real]
        torch.testing.assert_close(
            model(theirs, attention_mask=full).logits[real], want, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("name", FAMILIES)
def test_long_sequences_in_bf16(tmp_path_factory, name):
    """bf16 over long sequences (transformers' fp32 greedy continuations), where ALiBi's biases grow: autolm's
    logits are no further from fp32's than transformers' bf16 logits, for a left-padded batch through the general
    forward (47 tokens; ALiBi's bias rounded to bf16 as transformers rounds it) and for one row through the eager
    one-token step (37 tokens, fed one at a time; its attention in fp32)."""
    import transformers
    from test_decode_steps import greedy_steps

    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    half = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.bfloat16, attn_implementation="eager"
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    ids, mask = padded_batch(seed=3, lengths=(14, 5))
    seq = hf.generate(ids, attention_mask=mask, max_new_tokens=33, do_sample=False)
    full = torch.cat([mask, torch.ones(2, 33, dtype=mask.dtype)], 1)
    real = full.bool()
    row = hf.generate(ids[:1], max_new_tokens=30, do_sample=False)  # 14 + 30 tokens, no padding
    with torch.no_grad():
        truth = hf(seq, attention_mask=full).logits[real]
        theirs = (half(seq, attention_mask=full).logits[real].float() - truth).abs().mean()
        ours = (model(seq, attention_mask=full).logits[real].float() - truth).abs().mean()
        assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)
        truth, theirs = hf(row).logits[0, 14:], half(row).logits[0, 14:].float()
    _, stepped = greedy_steps(model, row[:, :14], 30, "eager", forced=row[0, 14:].tolist())
    ours, theirs = (stepped - truth).abs().mean(), (theirs - truth).abs().mean()
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default target for bloom, query_key_value: adapters made by peft and by autolm agree."""
    QUIRKS.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["query_key_value"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MAIN.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the state dict, the saved tensors and config keys are transformers'."""
    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert list(model.state_dict()) == list(hf.state_dict())
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))
    assert ("lm_head.weight" in names) is (name == "quirks")
    keys = [json.load(open(f"{d}/config.json")) for d in (directory, tmp_path / "saved")]
    assert set(keys[1]) == set(keys[0])
    assert keys[1]["pretraining_tp"] == (2 if name == "quirks" else 1)


def test_disk_offload(tmp_path_factory, tmp_path):
    QUIRKS.check_disk_offload(tmp_path_factory, tmp_path)


def test_names_and_config_are_transformers(tmp_path_factory, tmp_path):
    """transformers' module names (`transformer.word_embeddings`, `word_embeddings_layernorm`, `h`, `ln_f`,
    `self_attention`), which autolm's names reach too; the ALiBi slopes; config.json round-trips."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for name, family in FAMILIES.items():
        directory, _ = family.checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        body = model.transformer
        assert model.model is body and model.get_input_embeddings() is body.word_embeddings
        assert body.layers is body.h and body.norm is body.ln_f
        assert [n for n, _ in body.named_children()][:4] == ["word_embeddings", "word_embeddings_layernorm", "h",
                                                             "ln_f"]  # fmt: skip
        attn = body.h[0].self_attention
        assert attn.alibi == tuple(_get_alibi_slopes(attn.num_heads, "cpu").tolist())
        model.config.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        assert written == json.load(open(os.path.join(directory, "config.json"))), name
    c = model.config
    assert (c.n_layer, c.n_head, c.layer_norm_epsilon, c.intermediate_size) == (3, 6, 1e-3, 288)
    assert c.apply_residual_connection_post_layernorm and c.pretraining_tp == 2


def test_config_as_transformers_and_errors_name_the_key(tmp_path):
    """BloomConfig takes transformers' arguments and defaults; a bad value is a ConfigError naming config.json's
    key."""
    from autolm.models.bloom import BloomConfig

    c = BloomConfig(n_embed=128, n_layer=3, n_head=4, layer_norm_epsilon=1e-3, pretraining_tp=4)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.intermediate_size) == (128, 3, 32, 512)
    assert (c.rms_norm_eps, c.pretraining_tp, c.max_position_embeddings) == (1e-3, 4, 2048)
    assert BloomConfig(slow_but_exact=True).slow_but_exact  # inert with pretraining_tp 1: accepted
    d = BloomConfig()
    assert (d.vocab_size, d.hidden_size, d.n_layer, d.n_head, d.bos_token_id, d.tie_word_embeddings) == (
        250880, 64, 2, 8, 1, True)  # fmt: skip
    base = dict(model_type="bloom", hidden_size=64, n_head=4, n_layer=2, vocab_size=VOCAB)
    (tmp_path / "config.json").write_text(json.dumps({**base, "seq_length": 4096}))
    assert autolm.AutoConfig.from_pretrained(tmp_path).max_position_embeddings == 4096
    for change, key in ((dict(n_head=3), "n_head"), (dict(n_layer=0), "n_layer"),
                        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"), (dict(pretraining_tp=0), "pretraining_tp"),
                        (dict(slow_but_exact="yes"), "slow_but_exact"), (dict(hidden_dropout=2), "hidden_dropout"),
                        (dict(apply_residual_connection_post_layernorm=1), "apply_residual_connection_post_layernorm"),
                        (dict(pretraining_tp=4, slow_but_exact=True), "slow_but_exact"),
                        (dict(seq_length=-1), "seq_length")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_refused(tmp_path_factory):
    """transformers has no tensor-parallel plan for BLOOM (ALiBi's slopes are per head): tp_plan='auto' says so
    before anything is launched."""
    directory, _ = MAIN.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="'bloom' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes bloom ----------------------------------------------------


def write_bloom_gguf(hf, path: str) -> None:
    """transformers' BLOOM `hf` (its checkpoint files) as llama.cpp's BloomModel converter writes it (--outtype
    f32): set_gguf_parameters' keys (context length config.json's seq_length, else the hidden size; 4 * hidden as
    the FFN; head_count_kv = head_count; the LayerNorm epsilon), "transformer." dropped from the names, then
    gguf-py's names for BLOOM, query_key_value's rows (weight and bias) regrouped from per head to all q | all k |
    all v, no output tensor for a tied head; a plain vocabulary."""
    import gguf

    d = json.load(open(os.path.join(hf.name_or_path, "config.json")))
    n_embed, n_head = d["hidden_size"], d["n_head"]
    w = gguf.GGUFWriter(path, "bloom")
    w.add_context_length(d.get("seq_length", n_embed))
    w.add_embedding_length(n_embed)
    w.add_feed_forward_length(4 * n_embed)
    w.add_block_count(d["n_layer"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(d["layer_norm_epsilon"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM, d["n_layer"])
    for name, t in load_file(os.path.join(hf.name_or_path, "model.safetensors")).items():
        name = name.replace("transformer.", "")
        if "query_key_value" in name:  # BloomModel.modify_tensors
            qkv = t.reshape(n_head, 3, n_embed // n_head, *t.shape[1:])
            t = torch.cat([qkv[:, i].reshape(-1, *t.shape[1:]) for i in range(3)])
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(new, np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as BloomForCausalLM with transformers' logits (a left-padded batch); the quirky
    checkpoint's post-norm residuals, which llama.cpp's graph does not run, come back off (the file cannot say):
    its logits then differ."""
    _, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_bloom_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "BloomForCausalLM"
    c = model.config
    assert (c.n_head, c.n_layer, c.tie_word_embeddings) == (
        hf.config.n_head,
        hf.config.n_layer,
        name == "main",
    )
    assert c.layer_norm_epsilon == pytest.approx(hf.config.layer_norm_epsilon)
    assert c.max_position_embeddings == 2048 and "seq_length" not in c.extra  # the hidden size is no context
    ids, mask = padded_batch()
    if name == "main":
        torch.testing.assert_close(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-4, rtol=1e-4)
    else:
        assert not c.apply_residual_connection_post_layernorm
        assert not torch.allclose(_logits(model, ids, mask), _logits(hf, ids, mask), atol=1e-2)


def test_gguf_out_keeps_seq_length_and_refuses_post_norm_residuals(
    tmp_path_factory,
    tmp_path,
    byte_tokenizer,  # noqa: F811
):
    """config.json's seq_length goes out as context_length (as the converter writes it) and comes back; the post-norm
    residuals llama.cpp's bloom graph cannot run are refused, naming the field, with no file."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.extra["seq_length"] = model.config.max_position_embeddings = 4096  # as config.json's would
    path = save_gguf(model, byte_tokenizer, str(tmp_path / "long.gguf"), "f32")
    assert GGUFFile(path).metadata["bloom.context_length"] == 4096
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="long.gguf")
    assert back.config.seq_length == back.config.max_position_embeddings == 4096
    quirky = autolm.AutoModelForCausalLM.from_pretrained(QUIRKS.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="'bloom' model.*apply_residual_connection_post_layernorm"):
        save_gguf(quirky, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_cli(tmp_path_factory, tmp_path):
    """BLOOM and BLOOMZ ship no chat template: `autolm generate` continues as transformers does, `autolm chat` says
    there is no template."""
    check_cli_without_template(MAIN, tmp_path_factory, tmp_path, "BloomForCausalLM (bloom)")
