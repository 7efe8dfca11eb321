"""GPT-NeoX (Pythia, GPT-NeoX-20B) against transformers and peft: the fused query_key_value laid out per head,
partial rotary embeddings, LayerNorm with bias, the parallel residual (Pythia's) and the sequential one, no
attention biases, a tied head; transformers' names in the model (`gpt_neox.*`, `lm_head`) and on disk
(`embed_out`); Pythia's config.json (rotary_pct, rotary_emb_base) and old files' mask buffers; the standard
battery; GGUF as llama.cpp's converter writes "gptneox" (q/k/v rows regrouped), and GGUF out; no chat template, the
CLI."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from chat_checks import run_cli
from conftest import VOCAB, padded_batch, positions, write_char_tokenizer
from family_checks import Family
from safetensors.torch import load_file, save_file
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# Pythia's shape: parallel residual, a quarter of each head rotated (4 of 16 dimensions), biases, untied head
NEOX = Family("GPTNeoXConfig", SMALL)
# the sequential residual, half of each head rotated with another base, no attention biases, a tied head, the
# tanh GELU and a larger epsilon
SEQUENTIAL = Family(
    "GPTNeoXConfig",
    dict(SMALL, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
         hidden_act="gelu_fast", layer_norm_eps=1e-3,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}),
)  # fmt: skip
FAMILIES = {"parallel": NEOX, "sequential": SEQUENTIAL}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    NEOX.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    NEOX.check_compiled_step(tmp_path_factory, home)


def test_lora_default_targets(tmp_path_factory, tmp_path):
    """peft's default target for gpt_neox, query_key_value: adapters made by peft and by autolm agree."""
    NEOX.check_lora(tmp_path_factory, tmp_path)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["query_key_value"]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    NEOX.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves, and the file holds transformers' names (the head as embed_out)."""
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)
    directory, _ = FAMILIES[name].checkpoint(tmp_path_factory)
    names = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert names == set(load_file(os.path.join(directory, "model.safetensors")))
    assert ("embed_out.weight" in names) is (name == "parallel")


def test_disk_offload(tmp_path_factory, tmp_path):
    NEOX.check_disk_offload(tmp_path_factory, tmp_path)


def test_names_and_config_are_transformers(tmp_path_factory, tmp_path):
    """Parameter names and shapes are transformers' (`gpt_neox.*`, `lm_head`); the body answers to autolm's
    names too; config.json round-trips."""
    directory, hf = NEOX.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert {k: v.shape for k, v in model.named_parameters()} == {k: v.shape for k, v in hf.named_parameters()}
    assert model.model is model.gpt_neox and model.get_input_embeddings() is model.gpt_neox.embed_in
    assert model.model.norm is model.gpt_neox.final_layer_norm
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    assert written == original
    assert (
        model.config.layer_norm_eps == 1e-5 and model.config.rope_parameters["partial_rotary_factor"] == 0.25
    )


def test_pythia_config_and_old_checkpoint(tmp_path_factory, tmp_path):
    """Pythia's files as shipped: config.json in transformers 4's keys (rotary_pct, rotary_emb_base, no
    rope_parameters) and weights with the attention mask buffers and rotary inv_freq of old exports: transformers'
    logits; saved back with the same config keys, which transformers reads to the same model."""
    import transformers

    directory, hf = SEQUENTIAL.checkpoint(tmp_path_factory)
    old = tmp_path / "pythia"
    old.mkdir()
    d = json.load(open(os.path.join(directory, "config.json")))
    rope = d.pop("rope_parameters")
    d.update(rotary_emb_base=int(rope["rope_theta"]), rotary_pct=rope["partial_rotary_factor"])
    (old / "config.json").write_text(json.dumps(d))
    sd = load_file(os.path.join(directory, "model.safetensors"))
    n = hf.config.max_position_embeddings
    for i in range(hf.config.num_hidden_layers):
        sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(
            1, 1, n, n
        )
        sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(sd, old / "model.safetensors", metadata={"format": "pt"})
    model = autolm.AutoModelForCausalLM.from_pretrained(old)
    assert model.config.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 500,
        "partial_rotary_factor": 0.5,
    }
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "transformers_version"} == {
        k: v for k, v in d.items() if k != "transformers_version"
    }
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    with torch.no_grad():
        got = back(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_config_as_transformers_and_errors_name_the_key(tmp_path):
    """GPTNeoXConfig takes transformers' arguments (rotary_pct, rotary_emb_base, layer_norm_eps) with its defaults;
    a wrong value is a ConfigError naming config.json's key."""
    config = autolm.models.GPTNeoXConfig(
        hidden_size=64, num_attention_heads=4, rotary_pct=0.5, layer_norm_eps=1e-3
    )
    assert config.rope_parameters == {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
    }
    assert config.rms_norm_eps == 1e-3 and config.head_dim == 16 and config.num_key_value_heads == 4
    default = autolm.models.GPTNeoXConfig()
    assert default.rope_parameters["partial_rotary_factor"] == 0.25 and default.use_parallel_residual
    assert (default.bos_token_id, default.eos_token_id, default.vocab_size) == (0, 2, 50432)
    base = dict(
        model_type="gpt_neox", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB
    )
    for change, key in ((dict(layer_norm_eps=0), "layer_norm_eps"), (dict(rotary_pct=1.5), "rotary_pct"),
                        (dict(rotary_pct=0.1), "rotary_pct"), (dict(num_attention_heads=5), "num_attention_heads"),
                        (dict(use_parallel_residual="yes"), "use_parallel_residual"),
                        (dict(hidden_act="swiglu"), "hidden_act")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=key):
            autolm.AutoConfig.from_pretrained(tmp_path)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes gptneox ------------------------------------------------


def regrouped(name: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    """GPTNeoXModel.modify_tensors: query_key_value's rows (weight and bias) from per head (heads, 3, head_dim) to
    all q, all k, all v."""
    if ".attention.query_key_value." not in name:
        return t
    return t.reshape(heads, 3, t.shape[0] // heads // 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def write_gptneox_gguf(directory: str, hf, path: str, kind: str = "F32") -> None:
    """The checkpoint in `directory` (transformers' model `hf`) as llama.cpp's converter writes it: GPTNeoXModel.set_gguf_parameters' keys (no RoPE
    base, no KV head count, rope.dimension_count the rotary dimensions), gguf-py's tensor names for GPTNEOX, q/k/v
    rows regrouped, no output tensor for a tied head, a plain vocabulary; the layers' matrices in `kind`."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "gptneox")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_rope_dimension_count(
        int(c.rope_parameters["partial_rotary_factor"] * (c.hidden_size // c.num_attention_heads))
    )
    w.add_head_count(c.num_attention_heads)
    w.add_parallel_residual(c.use_parallel_residual)
    w.add_layer_norm_eps(c.layer_norm_eps)
    w.add_file_type({"F32": 0, "Q8_0": 7, "Q4_0": 2}[kind])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<pad>", "<s>", "</s>", *(f"t{i}" for i in range(3, VOCAB))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, c.num_hidden_layers)
    for name, t in load_file(os.path.join(directory, "model.safetensors")).items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = regrouped(name, t, c.num_attention_heads).float().numpy()
        if kind != "F32" and data.ndim == 2 and new.startswith("blk."):
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
    """F32: the checkpoint's logits, the config read back from gptneox.* metadata (rotary fraction, residual,
    biases, tied head); Q8_0 kept in its blocks and Q4_0 read as int4 (the regrouped rows copied back in order):
    close. The converter writes no RoPE base and no activation: a file of a model with others runs with llama.cpp's
    (10000, GELU)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    write_gptneox_gguf(directory, hf, str(tmp_path / "m.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    ours, theirs = model.config, hf.config
    for key in (
        "use_parallel_residual",
        "attention_bias",
        "tie_word_embeddings",
        "layer_norm_eps",
        "hidden_size",
    ):
        assert getattr(ours, key) == pytest.approx(getattr(theirs, key)), key
    assert ours.rope_parameters["partial_rotary_factor"] == theirs.rope_parameters["partial_rotary_factor"]
    ids, mask = padded_batch()
    real = mask.bool()
    rope = {**theirs.rope_parameters, "rope_theta": 10000.0}
    ref = autolm.AutoModelForCausalLM.from_pretrained(directory, rope_parameters=rope, hidden_act="gelu")
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits[real]
        if name == "parallel":  # Pythia's base is llama.cpp's: transformers' logits
            theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
            torch.testing.assert_close(want, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], want, atol=1e-4, rtol=1e-4)
        for kind, quantization, tol in (("Q8_0", "gguf", 0.03), ("Q4_0", "int4", 0.25)):
            write_gptneox_gguf(directory, hf, str(tmp_path / f"{kind}.gguf"), kind)
            q = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"{kind}.gguf",
                                                            quantization=quantization)  # fmt: skip
            got = q(ids, attention_mask=mask).logits[real].float()
            assert (got - want).abs().mean() <= tol * want.abs().mean(), (kind, (got - want).abs().mean())


def test_cli_without_chat_template(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation; Pythia ships no chat template, so `autolm
    chat` says so; `autolm inspect` names the class and model type."""
    import shutil

    directory, hf = NEOX.checkpoint(tmp_path_factory)
    model_dir = tmp_path / "pythia"
    shutil.copytree(directory, model_dir)
    write_char_tokenizer(str(model_dir))

    def cli(*args):  # (exit status, stdout, stderr) as a finished process's
        code, out, err = run_cli(*args, env={"AUTOLM_HOME": str(tmp_path / "home"), "AUTOLM_EAGER": "1"})
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    p = cli("generate", str(model_dir), "Hello", "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr
    tok = autolm.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    want = tok.decode(
        hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :], skip_special_tokens=True
    )
    assert want and want in p.stdout
    chat = cli("chat", str(model_dir), "--prompt", "Hi")
    assert chat.returncode != 0 and "no chat template" in chat.stderr
    shown = cli("inspect", str(model_dir))
    assert shown.returncode == 0 and "GPTNeoXForCausalLM (gpt_neox)" in shown.stdout
