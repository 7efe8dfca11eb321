"""StableLM (stablelm-2-1_6b, stablelm-2-zephyr-1_6b, stablelm-3b-4e1t, stable-code-3b) against transformers and
peft: LayerNorm with bias, partial rotary embeddings (a quarter of each head by default), q/k/v biases
(use_qkv_bias, StableLM 2), a LayerNorm of its own for each query and key head (qk_layernorm:
`q_layernorm.norms.<head>`), the parallel residual without post_attention_layernorm, a SiLU-gated MLP, an untied
head; the standard battery, config.json in both RoPE spellings, GGUF as llama.cpp's converter writes "stablelm"
(the per-head norms stacked into one tensor per layer) in and out, and the CLI
(the checkpoints here ship no chat template; stablelm-2-zephyr's is not pinned). Tensor parallelism:
test_distributed's `stablelm_qk_norm`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli_without_template
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)  # fmt: skip
# stablelm-2-1_6b's shape: q/k/v biases, the sequential residual, a quarter of each head rotated (4 of 16)
STABLELM2 = Family("StableLmConfig", dict(SMALL, num_key_value_heads=4, use_qkv_bias=True))
# StableLM 2 12B's options: per-head q/k LayerNorms, the parallel residual; GQA, half of each head rotated, another
# epsilon, no biases
QK = Family(
    "StableLmConfig",
    dict(SMALL, num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True, partial_rotary_factor=0.5,
         layer_norm_eps=1e-4),
)  # fmt: skip
FAMILIES = {"stablelm2": STABLELM2, "qk_layernorm": QK}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    QK.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    QK.check_compiled_step(tmp_path_factory, home)


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default targets for stablelm (q_proj, v_proj): adapters made by peft and by autolm agree."""
    STABLELM2.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    STABLELM2.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves; the file holds the checkpoint's tensor names, no others."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))


def test_disk_offload(tmp_path_factory, tmp_path):
    QK.check_disk_offload(tmp_path_factory, tmp_path)


def test_per_head_norms_are_transformers():
    """StableLmLayerNormPerHead (all heads in one call, heads on dim 2) gives transformers' per-head LayerNorms
    (one call per head, heads on dim 1), each head with its own weights."""
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead as Theirs

    from autolm.models.stablelm import StableLmLayerNormPerHead

    theirs, ours = Theirs(16, 4, eps=1e-5), StableLmLayerNormPerHead(16, 4, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in theirs.norms:
            norm.weight.copy_(1 + 0.5 * torch.randn(16, generator=g))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 5, 16, generator=g) * 3 + 1  # (B, heads, T, hd)
    want = theirs(x)
    torch.testing.assert_close(ours(x.transpose(1, 2)).transpose(1, 2), want)
    half = ours(x.transpose(1, 2).bfloat16()).transpose(1, 2)
    torch.testing.assert_close(half, theirs.to(torch.bfloat16)(x.bfloat16()), atol=0.02, rtol=0.02)


# ---- config.json ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (q_layernorm.norms.<head>, no post_attention_layernorm with
    the parallel residual); the saved config.json has transformers' keys and values, no others."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    """StableLmConfig() holds transformers' defaults (partial_rotary_factor 0.25, layer_norm_eps 1e-5, bos and eos
    0, ...); initializer_range, which autolm keeps only where config.json has it, aside. Keyword arguments as in
    transformers."""
    import transformers

    from autolm.models import StableLmConfig

    theirs = json.loads(transformers.StableLmConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert StableLmConfig().to_dict() == theirs
    kwargs = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                  rope_theta=500.0)  # fmt: skip
    assert StableLmConfig(**kwargs).rope_parameters == transformers.StableLmConfig(**kwargs).rope_parameters


def test_stablelm2_config_spelling(tmp_path_factory, tmp_path):
    """StableLM 2's config.json as shipped (transformers 4's spelling): partial_rotary_factor and rope_theta at the
    top level, no rope_parameters. The same model, saved back in that spelling, which transformers loads with
    equal logits."""
    config = STABLELM2.check_top_level_rope(
        tmp_path_factory, tmp_path, {"partial_rotary_factor": 0.25, "rope_theta": 10000.0}
    )
    assert config.rope_parameters["partial_rotary_factor"] == 0.25


@pytest.mark.parametrize(
    "bad,match",
    [
        # 0.3 of a 32-dimension head is 9.6, 9 rotary dimensions: odd
        (
            dict(partial_rotary_factor=0.3, num_attention_heads=2, num_key_value_heads=2),
            "partial_rotary_factor",
        ),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(qk_layernorm="yes"), "qk_layernorm"),
        (dict(use_qkv_bias=1), "use_qkv_bias"),
        (dict(use_parallel_residual=None), "use_parallel_residual"),
        (dict(hidden_dropout=2.0), "hidden_dropout"),
        (dict(head_dim=32), "head_dim"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="swiglu"), "hidden_act"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="stablelm", hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, vocab_size=VOCAB)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes stablelm ----------------------------------------------


def _stablelm_metadata(w, c) -> None:
    """StableLMModel.set_gguf_parameters: sizes, the rotary dimensions int(factor * (hidden // heads)), head
    counts, the residual's form, the LayerNorm epsilon; no RoPE base, no vocabulary size, no head size."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    factor = c.rope_parameters["partial_rotary_factor"]
    w.add_rope_dimension_count(int(factor * (c.hidden_size // c.num_attention_heads)))
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_parallel_residual(c.use_parallel_residual)
    w.add_layer_norm_eps(c.layer_norm_eps)


def _converted_tensors(hf):
    """(checkpoint name, tensor) as StableLMModel.modify_tensors gives them to gguf-py's name map: each layer's
    per-head q/k norms `...q_layernorm.norms.<i>.weight` stacked, once the last head came, into one (heads,
    head_dim) tensor `...q_layernorm.weight`; no head tensor where the embeddings are tied."""
    c, pending = hf.config, {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if ".norms." not in name:
            yield name, t
            continue
        stem, i = name.rsplit(".norms.", 1)
        got = pending.setdefault(stem, {})
        got[int(i.split(".")[0])] = t
        n = c.num_attention_heads if stem.endswith("q_layernorm") else c.num_key_value_heads
        if len(got) == n:
            del pending[stem]
            yield f"{stem}.weight", torch.stack([got[j] for j in range(n)])
    assert not pending, f"unprocessed norms: {list(pending)}"  # as the converter's prepare_tensors checks


def write_stablelm_gguf(hf, path: str, kind: str = "F32") -> None:
    """The GGUF llama.cpp's converter writes of transformers' StableLM model `hf`: StableLMModel's keys, gguf-py's
    tensor names for STABLELM (q/k not permuted), the per-head norms stacked (in F32, as every `*_norm.weight`),
    a plain vocabulary; the layers' matrices in `kind`."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "stablelm")
    _stablelm_metadata(w, c)
    w.add_file_type({"F32": 0, "Q8_0": 7}[kind])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STABLELM, c.num_hidden_layers)
    for name, t in _converted_tensors(hf):
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.float().numpy()
        if kind != "F32" and data.ndim == 2 and new.startswith("blk.") and not new.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_gguf(tmp_path_factory, tmp_path, name):
    """F32: transformers' logits, the config read back from stablelm.* metadata and the tensors present (rotary
    fraction, residual, biases, q/k norms, epsilon); Q8_0 kept in its blocks: close."""
    _, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_stablelm_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "StableLmForCausalLM"
    ours, theirs = model.config, hf.config
    for key in ("use_parallel_residual", "use_qkv_bias", "qk_layernorm", "tie_word_embeddings",
                "num_key_value_heads", "intermediate_size"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.layer_norm_eps == pytest.approx(theirs.layer_norm_eps)
    assert ours.rope_parameters["partial_rotary_factor"] == theirs.rope_parameters["partial_rotary_factor"]
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
        write_stablelm_gguf(hf, str(tmp_path / "q8.gguf"), "Q8_0")
        q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", quantization="gguf")
        got = q(ids, attention_mask=mask).logits[real].float()
    assert (got - want).abs().mean() <= 0.03 * want.abs().mean(), (got - want).abs().mean()


def _byte_tokenizer(directory):
    """A byte-level BPE tokenizer without merges (what GGUF out writes fast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(directory))


def test_gguf_out_keeps_the_stacked_norms_f32(tmp_path_factory, tmp_path):
    """In Q8_0 the per-head norms stacked into one tensor per layer stay F32, as the converter keeps every
    `*_norm.weight` (test_gguf_out checks the F32 file against the converter's)."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    model = autolm.AutoModelForCausalLM.from_pretrained(QK.checkpoint(tmp_path_factory)[0])
    tok = _byte_tokenizer(tmp_path / "tokenizer")
    q8 = GGUFFile(save_gguf(model, tok, str(tmp_path / "q8.gguf"), "q8_0"))
    kinds = {t.name: t.tensor_type for t in q8.tensors}
    assert kinds["blk.0.attn_q_norm.weight"] == kinds["blk.1.attn_k_norm.weight"] == 0  # F32


# ---- the command line -------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; `autolm inspect` names the class and type; with
    no chat template `autolm chat` says so."""
    check_cli_without_template(STABLELM2, tmp_path_factory, tmp_path, "StableLmForCausalLM (stablelm)")
