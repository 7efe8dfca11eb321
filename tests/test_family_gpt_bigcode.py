"""GPTBigCode (StarCoder, SantaCoder, Granite code 20B) against transformers and peft: multi-query attention (c_attn
packing all heads' q, then one k and one v head), the multi-head layout (q/k/v per head), Linear weights stored
(out, in), learned positions under left padding, LayerNorm with bias, the activations, the attention scale off,
the softmax-precision switches, config.json in GPT-2's names; the standard battery, LoRA on peft's default
c_attn, GGUF as llama.cpp's converter writes starcoder (in, and out of autolm), the tensor-parallel refusal,
Granite code's chat template and the CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from chat_checks import check_chat_template, check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from safetensors.torch import load_file
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm
from autolm.errors import ConfigError, GenerationError

# multi-query attention (StarCoder's), the tanh GELU, tied head: the battery's main checkpoint
MQA = Family("GPTBigCodeConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64))
# multi-head attention (q/k/v per head in c_attn), n_inner not 4 * n_embd, exact GELU, untied head, a larger
# LayerNorm epsilon, the softmax-precision switches off (precision only)
MHA = Family(
    "GPTBigCodeConfig",
    dict(n_embd=64, n_layer=3, n_head=8, n_inner=96, n_positions=48, multi_query=False, activation_function="gelu",
         layer_norm_epsilon=1e-3, tie_word_embeddings=False, attention_softmax_in_fp32=False,
         scale_attention_softmax_in_fp32=False),
)  # fmt: skip
# multi-query, no 1/sqrt(head_dim), ReLU, n_inner given as 4 * n_embd (as released checkpoints give it)
UNSCALED = Family(
    "GPTBigCodeConfig",
    dict(n_embd=32, n_layer=2, n_head=2, n_inner=128, n_positions=32, activation_function="relu",
         scale_attn_weights=False),
)  # fmt: skip
FAMILIES = {"mqa": MQA, "mha": MHA, "unscaled": UNSCALED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_greedy_and_beam(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["mqa", "mha"])
def test_bf16(tmp_path_factory, name):
    FAMILIES[name].check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["mqa", "mha"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


@pytest.mark.parametrize("name", ["mqa", "mha"])
def test_compiled_step(tmp_path_factory, home, name):  # noqa: F811
    FAMILIES[name].check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name,dora", [("mqa", False), ("mha", False), ("mqa", True)])
def test_lora_on_peft_default_target(tmp_path_factory, tmp_path, name, dora):
    """peft's default target for gpt_bigcode is c_attn, an nn.Linear (no fan_in_fan_out, unlike GPT-2's)."""
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, dora)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["c_attn"] and saved["fan_in_fan_out"] is False
    assert saved["use_dora"] is dora


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    MQA.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", ["mqa", "mha"])
def test_save_loads_in_transformers(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    MQA.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_saved_files_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """Parameter names and shapes are transformers' (c_attn (h + 2 * kv * hd, h)); save_pretrained writes the
    checkpoint's tensor names and config.json's keys and values (num_key_value_heads included, n_inner null
    where it was null)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()
    }
    c = hf.config
    kv = 1 if c.multi_query else c.n_head
    assert model.transformer.h[0].attn.c_attn.weight.shape == (
        c.n_embd + 2 * kv * c.n_embd // c.n_head,
        c.n_embd,
    )
    assert model.config.num_key_value_heads == kv and model.model.layers is model.transformer.h
    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "model.safetensors")) == set(load_file(f"{directory}/model.safetensors"))
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    drop = ("transformers_version", "architectures", "dtype")
    assert {k: v for k, v in written.items() if k not in drop} == {
        k: v for k, v in original.items() if k not in drop
    }


def test_gpt2_only_keys_are_kept_and_ignored(tmp_path_factory, tmp_path):
    """scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are GPT-2's: a GPTBigCode config.json holding
    them computes as transformers does (which ignores them) and keeps them when saved."""
    import shutil

    directory, hf = MQA.checkpoint(tmp_path_factory)
    shutil.copytree(directory, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[mask.bool()]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    saved = model.config.to_dict()
    assert saved["scale_attn_by_inverse_layer_idx"] is True and saved["reorder_and_upcast_attn"] is True


def test_positions_stop_at_n_positions(tmp_path_factory):
    directory, _ = UNSCALED.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    n = model.config.n_positions
    with pytest.raises(GenerationError, match="n_positions") as e:
        model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    assert "GPT-2" not in str(e.value)


def test_config_errors_name_the_key(tmp_path):
    base = dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    for change, key in ((dict(n_head=5), "n_head"), (dict(n_inner=-1), "n_inner"),
                        (dict(activation_function="swiglu"), "activation_function"),
                        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
                        (dict(multi_query="yes"), "multi_query"),
                        (dict(attention_softmax_in_fp32=1), "attention_softmax_in_fp32"),
                        (dict(scale_attn_weights=None), "scale_attn_weights"),
                        (dict(add_cross_attention=True), "add_cross_attention")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)
    config = autolm.AutoConfig.from_pretrained(tmp_path, add_cross_attention=False)
    assert type(config).__name__ == "GPTBigCodeConfig" and config.num_key_value_heads == 1


def test_tensor_parallel_is_a_clear_error(tmp_path_factory):
    """No tensor-parallel plan (transformers has none): multi-query's single k/v head in c_attn cannot be cut by
    rank; tp_plan='auto' says so before anything is launched."""
    directory, _ = MQA.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_chat_template(tmp_path):
    """Granite-20B-Code-Instruct's template (Question / Answer / System) renders as in transformers."""
    check_chat_template(tmp_path, "granite-20b-code-instruct.jinja")


def test_cli(tmp_path_factory, tmp_path):
    check_cli(MQA, "granite-20b-code-instruct.jinja", tmp_path_factory, tmp_path,
              "GPTBigCodeForCausalLM (gpt_bigcode)")  # fmt: skip


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes starcoder -------------------------------------------------


def write_starcoder_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter (StarCoderModel, --outtype f32) makes of transformers' GPTBigCode `hf`:
    starcoder.* metadata (context_length n_positions, feed_forward_length 4 * n_embd, head_count_kv 1, the
    LayerNorm epsilon), the tensors by gguf-py's name map for STARCODER as they are (Linear weights, no transposes;
    c_attn stays fused as attn_qkv), no output.weight for a tied head; a plain vocabulary."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "starcoder")
    w.add_context_length(c.n_positions)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(4 * c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(1)
    w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.STARCODER, c.n_layer)
    for name, t in load_file(f"{hf.name_or_path}/model.safetensors").items():
        w.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(t.float().numpy())
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_as_llama_cpp_writes_starcoder(tmp_path_factory, tmp_path):
    """The converter's file loads as GPTBigCodeForCausalLM (multi-query, n_inner from feed_forward_length) with
    transformers' logits; int8 while loading it."""
    _, hf = MQA.checkpoint(tmp_path_factory)
    write_starcoder_gguf(hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "GPTBigCodeForCausalLM" and model.config.tie_word_embeddings
    assert (model.config.multi_query, model.config.num_key_value_heads, model.config.n_inner) == (
        True,
        1,
        256,
    )
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], theirs, atol=1e-4, rtol=1e-4)
        int8 = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", quantization="int8")
        assert type(int8.transformer.h[0].attn.c_attn).__name__ == "Int8Linear"
        got = int8(ids, attention_mask=mask).logits[real].float()
        assert (got - theirs).abs().mean() <= 0.08 * theirs.abs().mean()


def test_gguf_out_with_n_inner_given(tmp_path_factory, tmp_path):
    """With n_inner given as 4 * n_embd (test_gguf_out checks it null), save_gguf writes the converter's metadata
    (keys, values, types) and tensors (names, shapes, F32 bytes), and the file loads back with the model's logits."""
    n_inner = 256
    from autolm.gguf_writer import save_gguf
    from autolm.sources.gguf import GGUFFile

    directory, hf = MQA.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, n_inner=n_inner)
    assert model.config.to_dict()["n_inner"] == n_inner
    save_gguf(model, _byte_tokenizer(tmp_path / "tokenizer"), str(tmp_path / "out.gguf"), "f32")
    write_starcoder_gguf(hf, str(tmp_path / "ref.gguf"))
    ours, ref = GGUFFile(str(tmp_path / "out.gguf")), GGUFFile(str(tmp_path / "ref.gguf"))
    assert ours.architecture == ref.architecture == "starcoder"
    got, want = ({k: v for k, v in f.metadata.items() if k.startswith("starcoder.")} for f in (ours, ref))
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in want.items()}
    assert got == pytest.approx(want) and got["starcoder.attention.head_count_kv"] == 1
    theirs = {t.name: t for t in ref.tensors}
    assert {t.name: t.shape for t in ours.tensors} == {n: t.shape for n, t in theirs.items()}
    assert all(np.array_equal(t.data, theirs[t.name].data) for t in ours.tensors)
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="out.gguf")
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            back(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )


@pytest.mark.parametrize("name,fields", [("mha", "multi_query"), ("unscaled", "scale_attn_weights")])
def test_gguf_out_refuses_what_llama_cpp_cannot_run(tmp_path_factory, tmp_path, name, fields):
    """llama.cpp's starcoder runs multi-query attention with the 1/sqrt(head_dim) scale and the tanh GELU only: a
    multi-head or unscaled model is a ConfigError naming the field, and no file."""
    from autolm.gguf_writer import save_gguf

    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    tok = _byte_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(ConfigError, match=f"'gpt_bigcode' model.*{fields}"):
        save_gguf(model, tok, str(tmp_path / "m.gguf"), "f32")
    assert not (tmp_path / "m.gguf").exists()
