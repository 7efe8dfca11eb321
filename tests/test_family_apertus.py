"""Apertus (Swiss AI's Apertus-8B / 70B) against transformers and peft: Llama's layer with per-head q/k RMSNorm, the
non-gated MLP up_proj -> xIELU (learnable alpha_p / alpha_n per layer, beta / eps buffers) -> down_proj, GQA,
Llama 3 RoPE (the released scaling, on a short original context), norms named attention_layernorm /
feedforward_layernorm; and a variant with q/k/v/o biases, relu2, default RoPE and a tied head. The standard battery,
config.json in transformers' keys, the CLI with a ChatML template (Apertus' own template is not pinned here)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from chat_checks import check_cli
from conftest import padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.apertus import ApertusConfig

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # fmt: skip
# xIELU, GQA, Llama 3 RoPE scaling (original context 8: every frequency band in play), an untied head
APERTUS = Family(
    "ApertusConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, rope_parameters=LLAMA3),
    lora_targets=["q_proj", "v_proj", "up_proj", "down_proj"],  # peft has no default for apertus
)  # fmt: skip
# biases on q/k/v/o, relu2 instead of xIELU, default RoPE, a tied head, three layers
BIASED = Family(
    "ApertusConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
         max_position_embeddings=64, attention_bias=True, hidden_act="relu2", tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"apertus": APERTUS, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    APERTUS.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    APERTUS.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    APERTUS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    APERTUS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    APERTUS.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    APERTUS.check_disk_offload(tmp_path_factory, tmp_path)


def test_xielu_is_transformers():
    """The activation module computes transformers' XIELUActivation (Python path) for the same parameters, on
    both sides of zero and around eps; alpha_p / alpha_n are parameters of shape (1,), beta / eps saved buffers."""
    from transformers.activations import XIELUActivation as Theirs

    from autolm.models.apertus import XIELUActivation

    theirs, ours = Theirs(dtype=torch.float32), XIELUActivation()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert {n for n, _ in ours.named_parameters()} == {"alpha_p", "alpha_n"}
    with torch.no_grad():
        theirs.alpha_p.fill_(0.3), theirs.alpha_n.fill_(-0.7), theirs.beta.fill_(0.4)
        ours.load_state_dict(theirs.state_dict())
    x = torch.cat([torch.linspace(-6, 6, 101), torch.tensor([-1e-7, -1e-6, 0.0, 1e-7])])
    torch.testing.assert_close(ours(x), theirs._xielu_python(x))
    assert not torch.allclose(ours(x), torch.relu(x) ** 2)


def test_xielu_buffers_are_read(tmp_path_factory, tmp_path):
    """beta and eps come from the checkpoint (not the defaults): a checkpoint with other values gives
    transformers' logits for them."""
    import transformers

    directory, _ = APERTUS.checkpoint(tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.act_fn.beta.fill_(0.2 + 0.3 * i)
            layer.mlp.act_fn.eps.fill_(-0.5)
    hf.save_pretrained(tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert float(model.model.layers[1].mlp.act_fn.beta) == pytest.approx(0.5)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter and buffer names and shapes; config.json round-trips with transformers' keys
    only; transformers' tensor-parallel plan (its replicated q/k norms aside: autolm never splits a norm)."""
    directory, hf = FAMILIES[name].checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    model.config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original
    plan = {k: v for k, v in hf.config.base_model_tp_plan.items() if not k.endswith("_norm")}
    assert type(model).tp_patterns == plan
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "biased") and ("lm_head" in model.tp_plan()) == (not tied)


def test_default_config_and_errors():
    """ApertusConfig() holds transformers' defaults (Llama 3 RoPE, xIELU); a config.json without RoPE keys reads
    transformers' Llama 3 default; bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.ApertusConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert ApertusConfig().to_dict() == theirs
    bare = ApertusConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4})
    assert bare.rope_parameters == transformers.ApertusConfig().rope_parameters
    for change, key in ((dict(attention_bias="yes"), "attention_bias"), (dict(hidden_act="xielu2"), "hidden_act"),
                        (dict(rms_norm_eps=0), "rms_norm_eps"), (dict(num_key_value_heads=3), "num_key_value_heads")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            ApertusConfig(hidden_size=64, num_attention_heads=4, **change)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer (no merges), as tests/test_gguf_out.py's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}},
                               merges=[]))  # fmt: skip
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    d = tmp_path_factory.mktemp("byte_tokenizer")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return autolm.AutoTokenizer.from_pretrained(str(d))


def test_gguf_out_is_refused(tmp_path_factory, tmp_path, byte_tokenizer):
    """llama.cpp's apertus keeps xIELU's values as metadata, which autolm does not write: GGUF out refuses the
    family and writes no file."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(APERTUS.checkpoint(tmp_path_factory)[0])
    with pytest.raises(ConfigError, match="apertus|Apertus"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")


def test_cli(tmp_path_factory, tmp_path):
    """The template's default system prompt needs a longer context than the battery's checkpoints."""
    long = Family("ApertusConfig", {**APERTUS.kwargs, "max_position_embeddings": 256})
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "ApertusForCausalLM (apertus)")
