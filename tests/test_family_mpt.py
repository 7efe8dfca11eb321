"""MPT against transformers and peft: ALiBi (MPT's slopes, the non-power-of-two head order included) over left-padded
batches and generations long enough for the bias to matter (fp32 and bf16), the fused Wqkv clamped by clip_qkv,
attn_config.softmax_scale, LayerNorm without bias, the tied head; the standard battery, config.json as transformers
writes it (attn_config nested) and the settings transformers' MPT does not compute refused naming the key, no
tensor-parallel plan, GGUF as llama.cpp's MPTModel converter writes it (in, and out of autolm), and the CLI (with
ChatML's template, which MPT-7B-Chat and MPT-30B-Chat follow: Qwen's ChatML file stands in)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions, randomize
from family_checks import _CACHE, Family
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError


class MptFamily(Family):
    """Family's checkpoint with MPT's LayerNorm weights (norm_1, norm_2, norm_f, which conftest.randomize does not
    take for norms) drawn around 1: the attention's q.k then weighs as much as the ALiBi bias."""

    def checkpoint(self, tmp_path_factory, dtype=None):
        import transformers

        key = ("mpt", self.config_cls, repr(sorted(self.kwargs.items())), str(dtype))
        if key not in _CACHE:
            cfg = transformers.MptConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                         **self.kwargs)  # fmt: skip
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg)
            randomize(model)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if re.search(r"norm_(1|2|f)\.weight$", name):
                        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            if dtype is not None:
                model = model.to(dtype)
            d = str(tmp_path_factory.mktemp("mptconfig"))
            model.save_pretrained(d)
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype="auto", attn_implementation="eager"
            )
            _CACHE[key] = (d, ref.eval())
        return _CACHE[key]


# 4 heads (slopes 2^-2 .. 2^-8), Wqkv clamped (clip_qkv 1.0 cuts about a third of the tiny model's q/k/v), the
# scale given, another LayerNorm epsilon
MAIN = MptFamily("MptConfig", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=96, layer_norm_epsilon=1e-3,
                                   attn_config=dict(clip_qkv=1.0, softmax_scale=0.3)))  # fmt: skip
# 6 heads: MPT's slopes for a head count that is no power of two (the odd ones of 8 first); what llama.cpp runs
SIX = MptFamily("MptConfig", dict(d_model=48, n_heads=6, n_layers=2, max_seq_len=96))
FAMILIES = {"main": MAIN, "six": SIX}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    MAIN.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    SIX.check_compiled_step(tmp_path_factory, home)


def test_long_left_padded_generation_fp32(tmp_path_factory):
    """28 greedy tokens of a left-padded batch (the cache's slots, padding included, span 40 positions: the steepest
    slope adds up to 10 to a score) are transformers' tokens, by the one-token step and by the general forward."""
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=3, lengths=(12, 7, 3))
    kwargs = dict(attention_mask=mask, max_new_tokens=28, do_sample=False, eos_token_id=None)
    theirs = hf.generate(ids, **kwargs)
    assert theirs.shape[1] == 12 + 28
    assert torch.equal(model.generate(ids, **kwargs), theirs)
    model.decode_mode = "forward"
    assert torch.equal(model.generate(ids, **kwargs), theirs)
    for block in model.transformer.blocks:  # without ALiBi: other tokens (the test sees the bias)
        block.attn.alibi = None
    assert not torch.equal(model.generate(ids, **kwargs), theirs)


def test_long_left_padded_generation_bf16(tmp_path_factory):
    """In bf16 the scores of 28 greedy tokens of a left-padded batch (the one-token step, ALiBi over the cache) are
    no further from transformers' fp32 logits of the same sequences than transformers' bf16 ones are."""
    import transformers

    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    ids, mask = padded_batch(seed=3, lengths=(12, 7, 3))
    T, n = ids.shape[1], 28
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    seq = out.sequences
    full = torch.cat([mask, torch.ones(len(ids), n, dtype=mask.dtype)], 1)
    half = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                             attn_implementation="eager")  # fmt: skip
    with torch.no_grad():
        truth = hf(seq, attention_mask=full).logits[:, T - 1 : -1]
        theirs = half(seq, attention_mask=full).logits[:, T - 1 : -1].float()
    ours = torch.stack(out.scores, 1).float()
    ours_err, theirs_err = (ours - truth).abs().mean(), (theirs - truth).abs().mean()
    assert ours_err <= 1.5 * theirs_err + 1e-3, (ours_err, theirs_err)


def test_long_left_padded_prompt_bf16(tmp_path_factory):
    """bf16 logits of a left-padded batch of prompts up to 300 tokens (the general forward) are no further from
    transformers' fp32 logits than transformers' bf16 ones are."""
    import transformers

    directory, hf = MptFamily("MptConfig", dict(SIX.kwargs, max_seq_len=512)).checkpoint(tmp_path_factory)
    ids, mask = padded_batch(seed=1, lengths=(300, 200, 40))
    real = mask.bool()
    half = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                             attn_implementation="eager")  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    with torch.no_grad():
        truth = hf(ids, attention_mask=mask).logits[real]
        theirs = half(ids, attention_mask=mask).logits[real].float()
        ours = model(ids, attention_mask=mask).logits[real].float()
    ours_err, theirs_err = (ours - truth).abs().mean(), (theirs - truth).abs().mean()
    assert ours_err <= 1.5 * theirs_err + 1e-3, (ours_err, theirs_err)


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 12, 32, 48, 56])
def test_alibi_slopes_are_transformers(heads):
    """The slopes MPT's attention layers get are transformers' build_mpt_alibi_tensor's, head by head (its last
    key's row holds the slope times -1)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from autolm.models.mpt import MptAttention, MptConfig

    c = MptConfig(d_model=heads * 8, n_heads=heads, n_layers=1)
    want = -build_mpt_alibi_tensor(heads, 2)[:, 0, 0]
    assert torch.equal(torch.tensor(c.alibi_slopes), want)
    layer = MptAttention(c, 0)
    assert layer.alibi == tuple(want.tolist()) and layer.rope is None


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default target for mpt, Wqkv: adapters made by peft and by autolm agree."""
    MAIN.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["Wqkv"]


def test_lora_default_targets_are_peft_s():
    """A LoraConfig naming no target_modules adapts what peft's does for mpt (Wqkv)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    from autolm.lora.config import default_targets

    assert default_targets("mpt") == PEFT["mpt"] == ["Wqkv"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MAIN.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers loads what autolm saves; the state dict, the saved tensors (no lm_head: tied) and config keys
    are transformers'."""
    MAIN.check_save(tmp_path_factory, tmp_path)
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert list(model.state_dict()) == list(hf.state_dict())
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))
    assert "lm_head.weight" not in names and "transformer.blocks.1.norm_2.weight" in names
    keys = [set(json.load(open(f"{d}/config.json"))) for d in (directory, tmp_path / "saved")]
    assert keys[1] == keys[0]


def test_disk_offload(tmp_path_factory, tmp_path):
    MAIN.check_disk_offload(tmp_path_factory, tmp_path)


def test_names_and_config_are_transformers(tmp_path_factory, tmp_path):
    """transformers' module names (`transformer.wte`, `blocks`, `norm_f`), which autolm's names reach too; clip_qkv
    clamps; config.json round-trips with attn_config nested."""
    directory, hf = MAIN.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.model is model.transformer and model.get_input_embeddings() is model.transformer.wte
    assert model.model.layers is model.transformer.blocks and model.model.norm is model.transformer.norm_f
    assert model.lm_head.weight is model.transformer.wte.weight
    c = model.config
    assert (c.d_model, c.n_heads, c.n_layers, c.max_seq_len, c.layer_norm_epsilon) == (64, 4, 2, 96, 1e-3)
    assert (c.clip_qkv, c.softmax_scale, c.alibi_bias_max, c.intermediate_size) == (1.0, 0.3, 8, 256)
    block = hf.transformer.blocks[0]
    with torch.no_grad():
        qkv = block.attn.Wqkv(block.norm_1(hf.transformer.wte(padded_batch()[0])))
    assert (qkv.abs() > 1.0).float().mean() > 0.2  # the clamp changes the tiny model
    c.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == json.load(open(f"{directory}/config.json"))


def test_config_as_transformers_and_errors_name_the_key(tmp_path):
    """MptConfig takes transformers' arguments and defaults; a value transformers' MPT does not compute (or cannot
    hold) is a ConfigError naming config.json's key."""
    from autolm.models.mpt import MptConfig

    c = MptConfig(d_model=128, n_heads=4, attn_config={"clip_qkv": 6.0})
    assert (c.hidden_size, c.head_dim, c.intermediate_size, c.clip_qkv, c.softmax_scale) == (
        128,
        32,
        512,
        6.0,
        None,
    )
    d = MptConfig()
    assert (d.vocab_size, d.d_model, d.n_layers, d.max_seq_len, d.tie_word_embeddings, d.use_cache) == (
        50368, 2048, 24, 2048, True, False)  # fmt: skip
    assert d.to_dict()["attn_config"] == {"clip_qkv": None, "softmax_scale": None, "alibi_bias_max": 8}
    base = dict(model_type="mpt", d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB)
    for change, key in ((dict(attn_config={"alibi": False}), "attn_config.alibi"),
                        (dict(attn_config={"qk_ln": True}), "attn_config.qk_ln"),
                        (dict(attn_config={"attn_type": "multiquery_attention"}), "attn_config.attn_type"),
                        (dict(attn_config={"prefix_lm": True}), "attn_config.prefix_lm"),
                        (dict(attn_config={"sliding_window_size": 64}), "attn_config.sliding_window_size"),
                        (dict(attn_config={"rope": True}), "attn_config.rope"),
                        (dict(attn_config={"attn_uses_sequence_id": True}), "attn_config.attn_uses_sequence_id"),
                        (dict(attn_config={"alibi_bias_max": 16}), "attn_config.alibi_bias_max"),
                        (dict(attn_config={"clip_qkv": -1}), "attn_config.clip_qkv"),
                        (dict(attn_config={"softmax_scale": "x"}), "attn_config.softmax_scale"),
                        (dict(attn_config=[1]), "attn_config"), (dict(expansion_ratio=2), "expansion_ratio"),
                        (dict(no_bias=False), "no_bias"), (dict(logit_scale=0.5), "logit_scale"),
                        (dict(norm_type="rmsnorm"), "norm_type"), (dict(ffn_config={"ffn_type": "mptglu"}), "ffn_config"),
                        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"), (dict(n_heads=5), "n_heads"),
                        (dict(max_seq_len=0), "max_seq_len")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=re.escape(key)):
            autolm.AutoConfig.from_pretrained(tmp_path)


def test_mosaicml_config_json(tmp_path):
    """MPT-7B's config.json as MosaicML published it (init_config abridged; remote code's keys: tokenizer_name, verbose; no
    transformers-only keys) reads as transformers reads it, and is written back as it was."""
    mpt_7b = {"architectures": ["MPTForCausalLM"], "attn_config": {"alibi": True, "alibi_bias_max": 8,
              "attn_impl": "torch", "attn_pdrop": 0, "attn_type": "multihead_attention", "attn_uses_sequence_id": False,
              "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None}, "d_model": 4096,
              "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4, "init_config": {"init_std": 0.02},
              "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048,
              "model_type": "mpt", "n_heads": 32, "n_layers": 32, "no_bias": True, "norm_type": "low_precision_layernorm",
              "resid_pdrop": 0, "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
              "transformers_version": "4.28.1", "use_cache": False, "verbose": 0, "vocab_size": 50432}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(mpt_7b))
    c = autolm.AutoConfig.from_pretrained(tmp_path)
    assert type(c).__name__ == "MptConfig" and (c.d_model, c.head_dim, c.intermediate_size) == (
        4096,
        128,
        16384,
    )
    assert (c.max_seq_len, c.bos_token_id, c.eos_token_id, c.use_cache) == (2048, None, None, False)
    slopes = c.alibi_slopes
    assert len(slopes) == 32 and (slopes[0], slopes[-1]) == (pytest.approx(2**-0.25), 2**-8)
    out = c.to_dict()  # the file's keys as they were, plus transformers' defaults of the others
    assert out.pop("dtype") == "bfloat16" and {k: out[k] for k in mpt_7b if k != "torch_dtype"} == {
        k: v for k, v in mpt_7b.items() if k != "torch_dtype"
    }
    assert out["layer_norm_epsilon"] == 1e-5 and out["tie_word_embeddings"] is True


def test_tensor_parallel_is_a_clear_error(tmp_path_factory):
    """No tensor-parallel plan (transformers has none for MPT): tp_plan='auto' says so before anything runs."""
    directory, _ = SIX.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate --chat` answers with transformers' greedy tokens (a longer max_seq_len: transformers' MPT
    cannot run past it, and the chat prompt is longer than the battery's)."""
    long = MptFamily(MAIN.config_cls, dict(MAIN.kwargs, max_seq_len=2048))
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "MptForCausalLM (mpt)")


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes mpt ------------------------------------------------------


def write_mpt_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (MPTModel, --outtype f32) makes of transformers' MPT `hf`: its
    set_gguf_parameters' keys (context length max_seq_len, embedding length, block count, feed_forward_length
    4 * d_model, head count, LayerNorm epsilon 1e-5 whatever the config says, clamp_kqv where clip_qkv is set,
    max_alibi_bias), the tensors by gguf-py's name map for MPT as they are (Wqkv fused as attn_qkv), no output
    tensor for the tied head; a plain vocabulary."""
    import gguf

    c, attn = hf.config, hf.config.attn_config
    w = gguf.GGUFWriter(path, "mpt")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(4 * c.d_model)
    w.add_head_count(c.n_heads)
    w.add_layer_norm_eps(1e-5)
    if attn.clip_qkv is not None:
        w.add_clamp_kqv(attn.clip_qkv)
    w.add_max_alibi_bias(attn.alibi_bias_max if attn.alibi else 0.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MPT, c.n_layers)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        w.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(t.float().numpy())
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as MptForCausalLM (6 heads, the ALiBi bias max and sizes read back) with
    transformers' logits over a left-padded batch."""
    _, hf = SIX.checkpoint(tmp_path_factory)
    write_mpt_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "MptForCausalLM" and model.config.tie_word_embeddings
    c = model.config
    assert (c.n_heads, c.d_model, c.alibi_bias_max, c.clip_qkv, c.expansion_ratio) == (6, 48, 8, None, 4)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)


def test_gguf_out_writes_clamp_kqv(tmp_path_factory, tmp_path):
    """A model with clip_qkv writes it as llama.cpp's clamp_kqv (tests/test_gguf_out.py checks the rest of the
    file against the converter's)."""
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, _ = SIX.checkpoint(tmp_path_factory)
    clipped = autolm.AutoModelForCausalLM.from_pretrained(directory, attn_config={"clip_qkv": 2.5})
    assert clipped.config.clip_qkv == 2.5
    save_gguf(clipped, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "clip.gguf"), "f32")
    assert GGUFFile(str(tmp_path / "clip.gguf")).metadata["mpt.attention.clamp_kqv"] == 2.5


def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path):
    """llama.cpp's mpt scales scores by 1/sqrt(head_dim) always: a model with attn_config.softmax_scale is refused,
    naming it, and nothing is written."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(MAIN.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="softmax_scale"):
        save_gguf(model, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "no.gguf"), "f32")
    assert not (tmp_path / "no.gguf").exists()
