"""GPT-2 (transformers' GPT2LMHeadModel) against transformers and peft: learned positions under left padding,
LayerNorm with bias, the GELU MLP, Conv1D weights stored (in, out) and the fused c_attn, the attention scale
options, old checkpoints (no `transformer.` prefix, attention-mask buffers), config.json in GPT-2's names,
LoRA on Conv1D (peft's fan_in_fan_out), int8/int4, GGUF as llama.cpp writes gpt2, no chat template, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import VOCAB, padded_batch, positions, write_char_tokenizer
from family_checks import Family
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError, TokenizerError

# tied head, gelu_new, the default scale: the battery's main checkpoint (widths divide int4's groups of 32)
GPT2 = Family("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64))
# untied head, n_inner not 4 * n_embd, exact GELU, the scale divided by layer_idx + 1, reorder_and_upcast_attn
# (precision only), a larger LayerNorm epsilon
VARIANT = Family(
    "GPT2Config",
    dict(n_embd=64, n_layer=3, n_head=8, n_inner=96, n_positions=48, activation_function="gelu",
         scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, layer_norm_epsilon=1e-3,
         tie_word_embeddings=False),
)  # fmt: skip
# no 1/sqrt(head_dim) at all, ReLU
UNSCALED = Family(
    "GPT2Config",
    dict(
        n_embd=32, n_layer=2, n_head=2, n_positions=32, activation_function="relu", scale_attn_weights=False
    ),
)
FAMILIES = {"gpt2": GPT2, "variant": VARIANT, "unscaled": UNSCALED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_greedy_and_beam(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


@pytest.mark.parametrize("name", ["gpt2", "variant"])
def test_bf16(tmp_path_factory, name):
    FAMILIES[name].check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", ["gpt2", "variant"])
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GPT2.check_compiled_step(tmp_path_factory, home)


@pytest.mark.parametrize("name,dora", [("gpt2", False), ("variant", False), ("gpt2", True)])
def test_lora_on_conv1d_both_ways(tmp_path_factory, tmp_path, name, dora):
    FAMILIES[name].check_lora(tmp_path_factory, tmp_path, dora)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["c_attn"] and saved["fan_in_fan_out"] is True  # as peft writes them
    assert saved["use_dora"] is dora


def test_lora_defaults_and_layer_choice_follow_peft(tmp_path_factory):
    """LoraConfig() on GPT-2 targets c_attn (peft's default for the type); layers_to_transform counts GPT-2's
    `h.N` layers as peft does."""
    import peft

    directory, hf = GPT2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    for kwargs in (dict(r=2), dict(r=2, target_modules=["c_attn", "c_fc"], layers_to_transform=[1])):
        ours = autolm.get_peft_model(model, autolm.LoraConfig(**kwargs))
        theirs = peft.get_peft_model(hf, peft.LoraConfig(**kwargs))
        names = {n for n, _ in ours.named_parameters() if ".lora_" in n}
        assert names and names == {n for n, _ in theirs.named_parameters() if ".lora_" in n}
        assert (
            ours.peft_config["default"].fan_in_fan_out is theirs.peft_config["default"].fan_in_fan_out is True
        )
        ours.unload(), theirs.unload()


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GPT2.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantize_in_place(tmp_path_factory, bits):
    """quant.quantize on a loaded model reads each Conv1D weight as the (out, in) matrix it stands for."""
    from autolm.quant import quantize

    directory, _ = GPT2.checkpoint(tmp_path_factory)
    full = autolm.AutoModelForCausalLM.from_pretrained(directory)
    model = quantize(autolm.AutoModelForCausalLM.from_pretrained(directory), bits)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == f"Int{bits[3]}Linear"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        truth, got = full(ids, attention_mask=mask).logits[real], model(ids, attention_mask=mask).logits[real]
    assert (got - truth).abs().mean() <= (0.08 if bits == "int8" else 0.25) * truth.abs().mean()


@pytest.mark.parametrize("name", ["gpt2", "variant"])
def test_save_loads_in_transformers(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    GPT2.check_disk_offload(tmp_path_factory, tmp_path)


def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path):
    """Module and parameter names and shapes are transformers' (Conv1D (in, out)); config.json keeps GPT-2's
    names and round-trips; the body answers to autolm's names too."""
    directory, hf = VARIANT.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert model.model is model.transformer and model.model.layers is model.transformer.h
    assert model.get_input_embeddings() is model.transformer.wte
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in original.items() if k != "transformers_version"
    }
    assert model.config.n_embd == 64 and model.config.n_inner == 96 and model.config.intermediate_size == 96


def test_old_checkpoint_without_prefix_and_with_mask_buffers(tmp_path_factory, tmp_path):
    """openai-community/gpt2's layout: `h.0.attn.c_attn.weight`, `wte.weight`, plus attn.bias / attn.masked_bias
    buffers; loads with transformers' logits and saves as transformers saves."""
    directory, hf = GPT2.checkpoint(tmp_path_factory)
    n = hf.config.n_positions
    old = {
        k.removeprefix("transformer."): v
        for k, v in load_file(os.path.join(directory, "model.safetensors")).items()
    }
    for i in range(hf.config.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "h.0.attn.c_attn.weight" in old and "wte.weight" in old
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file(old, legacy / "model.safetensors", metadata={"format": "pt"})
    with open(legacy / "config.json", "w") as f:
        json.dump(json.load(open(os.path.join(directory, "config.json"))), f)
    model = autolm.AutoModelForCausalLM.from_pretrained(legacy)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "resaved")
    names = set(load_file(tmp_path / "resaved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))


def test_token_type_ids_as_transformers(tmp_path_factory):
    """GPT-2's segment ids are embedded by wte and added to the inputs, as transformers does."""
    directory, hf = GPT2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    types = torch.randint(0, 4, ids.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask), token_type_ids=types).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), token_type_ids=types).logits
        plain = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[real], plain[real])


def test_positions_follow_the_padding_and_stop_at_n_positions(tmp_path_factory):
    """Left padding shifts the learned positions (a padded row gives the unpadded row's logits); a position past
    n_positions is a clear error."""
    UNSCALED.check_learned_positions(tmp_path_factory)


def test_config_errors_name_gpt2_keys(tmp_path):
    base = dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)
    for change, key in ((dict(n_head=5), "n_head"), (dict(n_inner=-1), "n_inner"),
                        (dict(activation_function="swiglu"), "activation_function"),
                        (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
                        (dict(add_cross_attention=True), "add_cross_attention")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


def test_tensor_parallel_is_a_clear_error(tmp_path_factory):
    """transformers has no tensor-parallel plan for GPT-2 (c_attn packs every head's q, k and v): neither has
    autolm, and tp_plan='auto' says so before anything is launched."""
    directory, _ = GPT2.checkpoint(tmp_path_factory)
    with pytest.raises(ConfigError, match="no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto")


def test_chat_template_is_absent_as_in_transformers(tmp_path):
    """GPT-2 ships no chat template: apply_chat_template is autolm's clear error where transformers raises."""
    import transformers

    write_char_tokenizer(str(tmp_path))
    chat = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="chat_template is not set"):
        transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(chat)
    with pytest.raises(TokenizerError, match="no chat template"):
        autolm.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(chat)


def test_config_takes_gpt2_names_and_resizing_keeps_the_tie(tmp_path_factory):
    """GPT2Config(n_embd=...) as in transformers; resize_token_embeddings replaces wte (the head stays tied)."""
    config = autolm.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=VOCAB)
    assert (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings) == (32, 1, 16)
    directory, _ = GPT2.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    old = model.transformer.wte.weight.detach().clone()
    model.resize_token_embeddings(VOCAB + 8)
    assert model.transformer.wte.weight.shape == (VOCAB + 8, 64) and "embed_tokens" not in dict(
        model.transformer.named_children()
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight[:VOCAB], old)
    assert model(torch.tensor([[VOCAB + 3, 5]])).logits.shape == (1, 2, VOCAB + 8)


def test_cli_generate(tmp_path_factory, tmp_path):
    """`autolm generate <gpt2 dir> "Hello"` prints the model's greedy continuation."""
    import shutil

    directory, hf = GPT2.checkpoint(tmp_path_factory)
    model_dir = tmp_path / "gpt2"
    shutil.copytree(directory, model_dir)
    write_char_tokenizer(str(model_dir))
    env = dict(os.environ, AUTOLM_HOME=str(tmp_path / "home"), AUTOLM_EAGER="1")
    p = subprocess.run(
        [sys.executable, "-m", "autolm.cli", "generate", str(model_dir), "Hello", "--max-new-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    tok = autolm.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    want = tok.decode(new, skip_special_tokens=True)  # the command prints the text without special tokens
    assert want and want in p.stdout
    chat = subprocess.run([sys.executable, "-m", "autolm.cli", "chat", str(model_dir), "--prompt", "Hi"],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert chat.returncode != 0 and "no chat template" in chat.stderr and "--chat-template" in chat.stderr
    # --chat-template gives one (the template itself, or a file): this one renders the message as it is, so the
    # reply is the plain continuation
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for cmd in (
        ["chat", str(model_dir), "--prompt", "Hello", "--chat-template", template],
        ["generate", str(model_dir), "Hello", "--chat", "--chat-template", str(tmp_path / "t.jinja")],
    ):
        given = subprocess.run([sys.executable, "-m", "autolm.cli", *cmd, "--max-new-tokens", "8"],
                               capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert given.returncode == 0, given.stderr
        assert want in given.stdout


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes gpt2 -------------------------------------------------

_TRANSPOSED = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")  # the converter's modify_tensors


def write_gpt2_gguf(directory: str, path: str, kind: str = "F32") -> None:
    """The HF checkpoint as llama.cpp's converter writes it: gpt2.* metadata (feed_forward_length 4 * n_embd,
    layer_norm_epsilon), tensor names from gguf-py's map for GPT2 (token_embd, position_embd, blk.N.attn_qkv, ...)
    with the Conv1D weights transposed, no output.weight for a tied head, a token list giving the vocabulary;
    the layers' matrices in `kind` (F32, Q8_0, Q4_0)."""
    import gguf

    cfg = json.load(open(os.path.join(directory, "config.json")))
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(4 * cfg["n_embd"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[kind])  # llama.cpp's LlamaFileType
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg["n_layer"])  # the converter's name map
    for name, t in load_file(os.path.join(directory, "model.safetensors")).items():
        if name.endswith(_TRANSPOSED):
            t = t.t()
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = t.contiguous().numpy().astype(np.float32)
        if kind != "F32" and data.ndim == 2 and new.startswith("blk."):
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_as_llama_cpp_writes_gpt2(tmp_path_factory, tmp_path):
    """F32: transformers' logits exactly; Q8_0 (the Conv1D weights dequantized, then transposed): close; int8
    while loading the GGUF; the config read from gpt2.* metadata."""
    directory, hf = GPT2.checkpoint(tmp_path_factory)
    write_gpt2_gguf(directory, str(tmp_path / "m.gguf"))
    write_gpt2_gguf(directory, str(tmp_path / "q.gguf"), "Q8_0")
    write_gpt2_gguf(directory, str(tmp_path / "q4.gguf"), "Q4_0")
    model = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.tie_word_embeddings
    assert (model.config.n_positions, model.config.n_inner, model.config.intermediate_size) == (64, None, 256)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        ours = model(ids, attention_mask=mask).logits[real]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        q8 = autolm.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf")(
            ids, attention_mask=mask
        )
        assert (q8.logits[real] - theirs).abs().mean() <= 0.02 * theirs.abs().mean()
        int8 = autolm.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="q.gguf", quantization="int8"
        )
        got = int8(ids, attention_mask=mask).logits[real].float()
        assert (got - theirs).abs().mean() <= 0.08 * theirs.abs().mean()
        # int4 from Q4_0: the transposed weights are not taken as blocks (they are (out, in) in the file)
        int4 = autolm.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="q4.gguf", quantization="int4"
        )
        assert type(int4.transformer.h[0].attn.c_attn).__name__ == "Int4Linear"
        got = int4(ids, attention_mask=mask).logits[real].float()
        assert (got - theirs).abs().mean() <= 0.2 * theirs.abs().mean()
