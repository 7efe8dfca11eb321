"""Falcon against transformers and peft: Falcon-7B's shape (multi_query: one key/value head, the parallel layer
with one LayerNorm, no biases, a tied head), Falcon-40B's (new_decoder_architecture: 2 KV groups of 2 heads in
the fused query_key_value, ln_attn and ln_mlp) and the sequential layer with biases (every head its own k/v, an
untied head, another activation, epsilon, RoPE base and ffn_hidden_size); Falcon2-11B's (the new architecture with
one LayerNorm) for logits, the one-token step and GGUF; the standard battery; config.json's
names and the configurations transformers' Falcon cannot run refused naming the key; Falcon-RW (ALiBi, its
biases rounded as transformers rounds them) over long generations, and out of GGUF; GGUF as llama.cpp's
FalconModel converter writes it (q/k/v rows regrouped), in and out; the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
FALCON_7B = Family("FalconConfig", SMALL)
FALCON_40B = Family("FalconConfig", dict(SMALL, new_decoder_architecture=True, num_kv_heads=2))
SEQUENTIAL = Family(
    "FalconConfig",
    dict(SMALL, parallel_attn=False, multi_query=False, bias=True, tie_word_embeddings=False, ffn_hidden_size=96,
         activation="gelu_new", layer_norm_epsilon=1e-3, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
# Falcon-RW's shape: ALiBi (16 heads: slopes powers of 2^-1/2, which bfloat16 rounds), sequential, biases
RW = Family(
    "FalconConfig",
    dict(SMALL, num_attention_heads=16, alibi=True, parallel_attn=False, multi_query=False, bias=True),
    hf_attention="sdpa",  # transformers' default; its eager path adds ALiBi's bias twice (to the scores and mask)
)
FAMILIES = {"7b": FALCON_7B, "40b": FALCON_40B, "sequential": SEQUENTIAL, "rw": RW}
# Falcon2-11B's shape: the new decoder architecture with one LayerNorm (num_ln_in_parallel_attn 1)
FALCON_11B = Family(
    "FalconConfig", dict(SMALL, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)
)
LAYOUTS = {**FAMILIES, "11b": FALCON_11B}


@pytest.mark.parametrize("name", LAYOUTS)
def test_logits(tmp_path_factory, name):
    LAYOUTS[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    FALCON_40B.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", LAYOUTS)
def test_one_token_step(tmp_path_factory, name):
    LAYOUTS[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", ["7b", "40b", "rw"])
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default target for falcon, query_key_value: adapters made by peft and by autolm agree."""
    FALCON_40B.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["query_key_value"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FALCON_40B.check_quantized(tmp_path_factory, bits)


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
    assert ("lm_head.weight" in names) is (name == "sequential")
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] == keys[0]


def test_disk_offload(tmp_path_factory, tmp_path):
    FALCON_40B.check_disk_offload(tmp_path_factory, tmp_path)


def test_names_and_config_are_transformers(tmp_path_factory, tmp_path):
    """transformers' module names (`transformer.word_embeddings`, `h`, `ln_f`, `self_attention`), which autolm's
    names reach too; the KV groups of each layout; config.json round-trips."""
    for name, kv in (("7b", 1), ("40b", 2), ("sequential", 4)):
        directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
        model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        assert (
            model.model is model.transformer
            and model.get_input_embeddings() is model.transformer.word_embeddings
        )
        assert model.model.layers is model.transformer.h and model.model.norm is model.transformer.ln_f
        assert model.config.num_key_value_heads == model.attention_shapes()[0][0] == kv
        model.config.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        assert written == json.load(open(os.path.join(directory, "config.json"))), name
    assert model.config.layer_norm_epsilon == 1e-3 and model.config.ffn_hidden_size == 96


def test_config_as_transformers_and_errors_name_the_key(tmp_path):
    """FalconConfig takes transformers' arguments and defaults; a value transformers' Falcon cannot run, or ALiBi,
    is a ConfigError naming config.json's key."""
    from autolm.models.falcon import FalconConfig

    c = FalconConfig(n_embed=128, num_attention_heads=4, layer_norm_epsilon=1e-3, activation="gelu_new")
    assert (c.hidden_size, c.ffn_hidden_size, c.intermediate_size, c.head_dim) == (128, 512, 512, 32)
    assert (c.rms_norm_eps, c.hidden_act, c.num_kv_heads, c.num_key_value_heads) == (1e-3, "gelu_new", 4, 1)
    d = FalconConfig()
    assert (d.vocab_size, d.bos_token_id, d.tie_word_embeddings, d.multi_query, d.num_attention_heads) == (
        65024, 11, True, True, 71)  # fmt: skip
    assert FalconConfig(new_decoder_architecture=True, num_attention_heads=4, hidden_size=64,
                        num_kv_heads=2).num_ln_in_parallel_attn == 2  # fmt: skip
    base = dict(
        model_type="falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    for change, key in ((dict(num_ln_in_parallel_attn=3), "num_ln_in_parallel_attn"),
                        (dict(num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn"),
                        (dict(new_decoder_architecture=True, parallel_attn=False), "parallel_attn"),
                        (dict(multi_query=False, num_kv_heads=2), "num_kv_heads"),
                        (dict(new_decoder_architecture=True, num_kv_heads=3), "num_kv_heads"),
                        (dict(num_kv_heads=0), "num_kv_heads"), (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
                        (dict(activation="swiglu"), "activation"), (dict(bias="yes"), "bias"),
                        (dict(ffn_hidden_size=-1), "ffn_hidden_size")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes falcon ---------------------------------------------------


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


def write_falcon_gguf(directory: str, hf, path: str, kind: str = "F32") -> None:
    """The checkpoint in `directory` (transformers' model `hf`) as llama.cpp's FalconModel converter writes it:
    its set_gguf_parameters' keys (context 2048, the "jploski" layout tag, 4 * hidden as the FFN, head_count_kv
    from num_kv_heads as the Hub's config.json files give it: absent for Falcon-7B, so 1), gguf-py's names for
    FALCON, query_key_value's rows regrouped from per KV group to all q | all k | all v, no output tensor for a
    tied head, a plain vocabulary; the layers' matrices in `kind`."""
    import gguf

    c = hf.config
    n_head, n_head_kv = c.num_attention_heads, c.num_kv_heads if c.new_decoder_architecture else 1
    w = gguf.GGUFWriter(path, "falcon")
    w.add_context_length(2048)
    w.add_tensor_data_layout("jploski")
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(4 * c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.FALCON, c.num_hidden_layers)
    head_dim = c.hidden_size // n_head
    for name, t in load_file(os.path.join(directory, "model.safetensors")).items():
        if "query_key_value" in name:  # FalconModel.modify_tensors
            qkv = t.reshape(n_head_kv, n_head // n_head_kv + 2, head_dim, -1)
            q = qkv[:, :-2].reshape(n_head * head_dim, -1)
            k = qkv[:, [-2]].reshape(n_head_kv * head_dim, -1)
            v = qkv[:, [-1]].reshape(n_head_kv * head_dim, -1)
            t = torch.cat((q, k, v)).reshape_as(t)
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.float().numpy()
        if kind != "F32" and data.ndim == 2 and new.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["7b", "40b", "11b"])
def test_gguf(tmp_path_factory, tmp_path, name):
    """The converter's file loads as FalconForCausalLM with the attention layout read back (from head_count_kv and
    the attn_norm_2 tensors) and transformers' logits; Q8_0 kept in its blocks (the regrouped rows copied back in
    order): close."""
    directory, hf = LAYOUTS[name].checkpoint(tmp_path_factory)
    write_falcon_gguf(directory, hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "FalconForCausalLM"
    for key in (
        "new_decoder_architecture",
        "num_ln_in_parallel_attn",
        "tie_word_embeddings",
        "layer_norm_epsilon",
    ):
        assert getattr(model.config, key) == pytest.approx(getattr(hf.config, key)), key
    assert model.config.num_key_value_heads == (1 if name == "7b" else 2)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
        write_falcon_gguf(directory, hf, str(tmp_path / "q.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask).logits[real].float()
    assert (got - want).abs().mean() <= 0.03 * want.abs().mean()


@pytest.mark.parametrize("name", ["sequential", "rw"])
def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, byte_tokenizer, name):
    """llama.cpp's falcon graph is parallel, has no biases and no ALiBi: the sequential model with biases (and
    Falcon-RW) is refused, naming each."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FAMILIES[name].checkpoint(tmp_path_factory)[0])
    keys = "(?s)(?=.*bias)(?=.*parallel_attn)" + ("(?=.*alibi)" if name == "rw" else "")
    with pytest.raises(ConfigError, match=keys):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()


def test_falcon_rw_long_generation_and_steps(tmp_path_factory):
    """Falcon-RW: 40 greedy tokens of a left-padded batch (rows 14 and 5 tokens long: ALiBi's products reach
    positions where bfloat16 rounds them, and the rows' padding shifts their slots) give transformers' tokens from
    the general forward and from the one-token step; each generated sequence, fed whole, gives transformers'
    logits at every real position. A kernel that skipped the rounding or counted positions from the slot would
    differ (checked: up to 1e-2 in these logits)."""
    directory, hf = RW.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert model.transformer.h[0].self_attention.rope is None
    ids, mask = padded_batch(seed=3, lengths=(14, 5))
    kw = dict(attention_mask=mask, max_new_tokens=40, do_sample=False)
    theirs = hf.generate(ids, **kw)
    for mode in ("forward", "eager"):
        model.decode_mode = mode
        assert torch.equal(model.generate(ids, **kw), theirs), mode
    full = torch.cat([mask, torch.ones(2, 40, dtype=mask.dtype)], 1)
    real = full.bool()
    with torch.no_grad():
        want = hf(theirs, attention_mask=full).logits[real]
        torch.testing.assert_close(
            model(theirs, attention_mask=full).logits[real], want, atol=1e-4, rtol=1e-4
        )


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate --chat` answers with transformers' greedy tokens. No Falcon chat template is in
    tests/data/chat_templates: OLMo 2's stands in."""
    check_cli(
        FALCON_7B, "olmo-2-1124-instruct.jinja", tmp_path_factory, tmp_path, "FalconForCausalLM (falcon)"
    )
