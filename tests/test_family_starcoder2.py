"""StarCoder 2 against transformers and peft: LayerNorm with bias, q/k/v/o biases, GQA, the plain
c_fc -> gelu_pytorch_tanh -> c_proj MLP with biases, a sliding window shorter than the test sequences, a tied
head; and a variant without biases, with an untied head, one KV head, another epsilon and a large RoPE base. The
standard battery, training-mode dropout as transformers draws it, config.json in StarCoder 2's names, GGUF as
llama.cpp's converter writes "starcoder2" (and autolm's GGUF out of it), no chat template, the CLI."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from chat_checks import run_cli
from conftest import VOCAB, padded_batch, positions, write_char_tokenizer
from family_checks import Family
from gguf_llamacpp import check_gguf, write_gguf
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models import Starcoder2Config

# biases, GQA, tied head, a window of 5 (the battery's prompts are up to 13 tokens, its decodes 27)
STARCODER2 = Family(
    "Starcoder2Config",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, sliding_window=5),
    lora_targets=["q_proj", "v_proj", "c_fc", "c_proj"],  # peft has no default for starcoder2
)  # fmt: skip
VARIANT = Family(
    "Starcoder2Config",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
         max_position_embeddings=64, use_bias=False, tie_word_embeddings=False, norm_epsilon=1e-3,
         rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813}),
)  # fmt: skip
FAMILIES = {"starcoder2": STARCODER2, "variant": VARIANT}
# the variant with the biases llama.cpp's starcoder2 needs: an untied head, its own epsilon and RoPE base
GGUF_VARIANT = Family(VARIANT.config_cls, dict(VARIANT.kwargs, use_bias=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    STARCODER2.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    STARCODER2.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    STARCODER2.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    STARCODER2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    STARCODER2.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    STARCODER2.check_disk_offload(tmp_path_factory, tmp_path)


def test_state_dict_config_and_window_are_transformers(tmp_path_factory, tmp_path):
    """transformers' parameter names and shapes (mlp.c_fc, biases, LayerNorm biases); config.json round-trips in
    StarCoder 2's names (norm_epsilon, use_bias); the window is on every layer; transformers' tensor-parallel
    plan."""
    models = {}
    for name, family in FAMILIES.items():
        directory, hf = family.checkpoint(tmp_path_factory)
        models[name] = model = autolm.AutoModelForCausalLM.from_pretrained(directory)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
        model.config.save_pretrained(tmp_path)
        written = json.loads((tmp_path / "config.json").read_text())
        original = json.loads(open(os.path.join(directory, "config.json")).read())
        assert {k: v for k, v in written.items() if k != "transformers_version"} == {
            k: v for k, v in original.items() if k != "transformers_version"
        }
    model, variant = models["starcoder2"], models["variant"]
    assert {"model.layers.1.mlp.c_fc.bias", "model.layers.1.self_attn.o_proj.bias"} <= set(model.state_dict())
    assert not any(k.endswith("proj.bias") or k.endswith("c_fc.bias") for k in variant.state_dict())
    assert variant.config.norm_epsilon == variant.model.norm.eps == 1e-3
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [5, 5]
    assert [layer.self_attn.sliding_window for layer in variant.model.layers] == [None, None]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # tensor parallelism splits what transformers' plan splits (c_fc by output features, c_proj by input)
    assert type(model).tp_patterns == dict(hf.config.base_model_tp_plan)
    assert model.tp_plan()["model.layers.1.mlp.c_proj"] == "rowwise" and "lm_head" not in model.tp_plan()


def test_training_dropout_draws_as_transformers(tmp_path):
    """residual_dropout and embedding_dropout apply while training only, with transformers' masks under the same
    seed (the same draws in the same order)."""
    import transformers

    cfg = transformers.Starcoder2Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        residual_dropout=0.3, embedding_dropout=0.2)  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, _ = padded_batch(lengths=(13, 13))
    outs = []
    for m in (model.train(), hf.train(), model):
        torch.manual_seed(5)
        outs.append(m(ids, use_cache=False).logits)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    torch.manual_seed(6)
    assert not torch.allclose(model(ids, use_cache=False).logits, outs[0])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_config_names_and_errors():
    """Starcoder2Config(norm_epsilon=...) as in transformers; bad values raise ConfigError naming the key."""
    config = Starcoder2Config(hidden_size=64, num_attention_heads=4, norm_epsilon=1e-3)
    assert config.rms_norm_eps == config.norm_epsilon == 1e-3 and config.head_dim == 16
    assert config.to_dict()["norm_epsilon"] == 1e-3 and "rms_norm_eps" not in config.to_dict()
    defaults = Starcoder2Config()
    assert (defaults.num_key_value_heads, defaults.use_bias, defaults.tie_word_embeddings) == (2, True, True)
    for change, key in ((dict(norm_epsilon=0), "norm_epsilon"), (dict(residual_dropout=2), "residual_dropout"),
                        (dict(embedding_dropout="x"), "embedding_dropout"), (dict(use_bias="yes"), "use_bias"),
                        (dict(hidden_act="swiglu"), "hidden_act"),
                        (dict(sliding_window=0), "sliding_window")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            Starcoder2Config(hidden_size=64, num_attention_heads=4, **change)


# ---- GGUF, as llama.cpp's convert_hf_to_gguf.py writes starcoder2 --------------------------------------------


def test_gguf(tmp_path_factory, tmp_path):
    """An untied head, LayerNorm epsilon and RoPE base from the metadata: transformers' logits. A file without the
    biases (use_bias false), which llama.cpp's starcoder2 cannot load, is refused naming use_bias."""
    model, _ = check_gguf(GGUF_VARIANT, tmp_path_factory, tmp_path)
    c = model.config
    assert (c.use_bias, c.tie_word_embeddings, c.num_key_value_heads) == (True, False, 1)
    assert c.norm_epsilon == pytest.approx(1e-3)
    assert c.rope_theta == pytest.approx(999999.4420358813)
    _, hf = VARIANT.checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "plain.gguf"))
    with pytest.raises(autolm.ConfigError, match="use_bias"):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="plain.gguf")


def test_gguf_has_no_window_as_llama_cpp(tmp_path_factory, tmp_path):
    """The converter writes no sliding window and llama.cpp's starcoder2 attends over everything: the file loads
    with biases and a tied head and gives transformers' logits of the same weights without the window."""
    import transformers

    directory, hf = STARCODER2.checkpoint(tmp_path_factory)
    write_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert (model.config.use_bias, model.config.tie_word_embeddings, model.config.sliding_window) == (
        True, True, None
    )  # fmt: skip
    full = transformers.AutoModelForCausalLM.from_pretrained(directory, sliding_window=None,
                                                             attn_implementation="eager")  # fmt: skip
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits[real]
        theirs = full(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---- the command line: StarCoder 2 base ships no chat template ----------------------------------------------


def _write_tokenizer(directory: str) -> None:
    """conftest's character tokenizer with one more token for each id past its characters (VOCAB in all), so
    whatever the random model generates prints as text."""
    from tokenizers import Tokenizer

    write_char_tokenizer(directory)
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tok.add_tokens([chr(0x3B1 + i) for i in range(VOCAB - tok.get_vocab_size())])
    assert tok.get_vocab_size() == VOCAB
    tok.save(os.path.join(directory, "tokenizer.json"))


def test_cli(tmp_path_factory, tmp_path):
    """`autolm generate` prints transformers' greedy continuation (past the window); `autolm inspect` names the
    family; `autolm chat` without a template is a clear error."""
    directory, hf = STARCODER2.checkpoint(tmp_path_factory)
    model_dir = tmp_path / "starcoder2"
    shutil.copytree(directory, model_dir)
    _write_tokenizer(str(model_dir))

    def cli(*args):  # (exit status, stdout, stderr) as a finished process's
        code, out, err = run_cli(*args, env={"AUTOLM_HOME": str(tmp_path / "home"), "AUTOLM_EAGER": "1"})
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    p = cli("generate", str(model_dir), "Hello", "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr
    tok = autolm.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    want = tok.decode(new, skip_special_tokens=True)
    assert want and want in p.stdout
    shown = cli("inspect", str(model_dir))
    assert shown.returncode == 0, shown.stderr
    assert "Starcoder2ForCausalLM (starcoder2)" in shown.stdout
    chat = cli("chat", str(model_dir), "--prompt", "Hi")
    assert chat.returncode != 0 and "no chat template" in chat.stderr
