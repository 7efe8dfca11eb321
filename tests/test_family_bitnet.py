"""BitNet (microsoft/bitnet-b1.58-2B-4T-bf16) against transformers and peft: Llama's layer with attn_sub_norm before
o_proj and ffn_sub_norm before down_proj, the squared-ReLU gated MLP without biases, GQA, RoPE base 500000 by
default; a variant with q/k/v/o biases, MHA, SiLU, a tied head, another RoPE base and epsilon. transformers' plain
model quantizes nothing in forward: the battery runs on checkpoints without quantization_config. The -bf16
checkpoint's own quantization_config (BitNet's online mode: ternary weights, int8 activations in every Linear but
the head) is checked against transformers' AutoBitLinear; packed checkpoints and int8 / int4 on top are refused by
name. No GGUF (llama.cpp's "bitnet" is 1bitLLM's SiLU graph) and no tensor-parallel plan, as in transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.bitnet import AutoBitLinear, BitNetConfig

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
# peft has no default targets for bitnet
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
# BitNet b1.58 2B4T's shape: GQA, relu2, an untied head, RoPE base 500000 (widths divide int4's groups of 32)
BITNET = Family("BitNetConfig", SMALL, lora_targets=TARGETS)
# biases on q/k/v/o (attention_bias), MHA, SiLU, a tied head, another RoPE base and epsilon, three layers
VARIANT = Family(
    "BitNetConfig",
    dict(SMALL, intermediate_size=128, num_hidden_layers=3, num_key_value_heads=4, attention_bias=True,
         hidden_act="silu", tie_word_embeddings=True, rms_norm_eps=1e-6,
         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
)  # fmt: skip
ONLINE_QUANT = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
# the -bf16 checkpoint's config.json: transformers makes every Linear but the head its AutoBitLinear
ONLINE = Family("BitNetConfig", dict(SMALL, quantization_config=ONLINE_QUANT))
FAMILIES = {"bitnet": BITNET, "variant": VARIANT}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    BITNET.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    BITNET.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    BITNET.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    BITNET.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    BITNET.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (self_attn.attn_sub_norm, mlp.ffn_sub_norm); config.json round-trips
    with transformers' keys only; no tensor-parallel plan, as transformers declares none."""
    model, _ = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "variant")
    assert all(type(m) is not AutoBitLinear for m in model.modules())  # no quantization_config: dense
    with pytest.raises(ConfigError, match="'bitnet' has no tensor-parallel plan"):
        autolm.AutoModelForCausalLM.from_pretrained(
            FAMILIES[name].checkpoint(tmp_path_factory)[0], tp_plan="auto"
        )


def test_default_config_is_transformers():
    """BitNetConfig() holds transformers' defaults; config.json without RoPE keys reads BitNet's base (500000)."""
    import transformers

    theirs = json.loads(transformers.BitNetConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert BitNetConfig().to_dict() == theirs
    check_config_defaults(BitNetConfig)
    bare = BitNetConfig.from_dict(dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert bare.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert not bare.online_quantization


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(head_dim=8), "head_dim"),
        (dict(hidden_act="swiglu"), "hidden_act"),
        (dict(attention_bias=1), "attention_bias"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(quantization_config={**ONLINE_QUANT, "quantization_mode": "offline"}), "quantization_config"),
        (dict(quantization_config={**ONLINE_QUANT, "linear_class": "bitlinear"}), "quantization_config"),
        (dict(quantization_config={**ONLINE_QUANT, "use_rms_norm": True}), "quantization_config"),
    ],
)
def test_config_errors_name_the_key(tmp_path, bad, match):
    base = dict(model_type="bitnet", vocab_size=VOCAB, **SMALL)
    (tmp_path / "config.json").write_text(json.dumps({**base, **bad}))
    with pytest.raises(ConfigError, match=match):
        autolm.AutoConfig.from_pretrained(tmp_path)


def _online(tmp_path_factory):
    """(directory, transformers' model) of the online-quantized checkpoint, with torch.compile off: transformers'
    quantizers are compiled functions (minutes on a CPU); eager, they compute the same."""
    with torch._dynamo.config.patch(disable=True):
        return ONLINE.checkpoint(tmp_path_factory)


def test_online_quantization_as_transformers(tmp_path_factory):
    """BitNet's online quantization_config: the Linear layers transformers swaps for AutoBitLinear (all but the head)
    are autolm's AutoBitLinear and give its outputs on the same inputs; the model's logits are transformers' where no
    int8 rounding falls the other way (a value on a step's edge may, after the two norms' last-bit differences: one
    step then moves its token's row), and far from the dense model's."""
    directory, hf = _online(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    dense = autolm.AutoModelForCausalLM.from_pretrained(BITNET.checkpoint(tmp_path_factory)[0])
    theirs_q = {n for n, m in hf.named_modules() if type(m).__name__ == "AutoBitLinear"}
    ours_q = {n: m for n, m in model.named_modules() if isinstance(m, AutoBitLinear)}
    assert set(ours_q) == theirs_q and len(theirs_q) == 14 and type(model.lm_head) is not AutoBitLinear
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        for name, m in ours_q.items():
            inputs = x[..., : m.in_features] * 3
            torch.testing.assert_close(m(inputs), hf.get_submodule(name)(inputs), atol=1e-5, rtol=1e-5)
        ids, mask = padded_batch(seed=1)
        real = mask.bool()
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        unquantized = dense(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    same = ((ours - theirs).abs().amax(-1) <= 1e-4).float().mean()
    assert same >= 0.5 and (ours - theirs).abs().mean() <= 0.01 * (unquantized - theirs).abs().mean()


def test_online_quantization_keeps_master_weights_and_refuses_int8(tmp_path_factory, tmp_path, monkeypatch):
    """Saving writes the master weights and the quantization_config as read; the eager one-token step and the
    exported step's graphs (the ternary weights computed in the graph) give the forward's greedy tokens and logits
    (in float64, where no int8 rounding falls apart between them); int8 / int4 on top are refused by name."""
    from test_decode_steps import greedy_steps

    from autolm import step
    from autolm.step import graphs

    directory, _ = _online(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.online_quantization and "quantization_config" not in model.config.extra
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads(open(os.path.join(directory, "config.json")).read())
    assert saved["quantization_config"] == original["quantization_config"] == ONLINE_QUANT
    back = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
    monkeypatch.delenv("AUTOLM_EAGER", raising=False)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    plain_tokens, plain = greedy_steps(model, ids, 12, "forward")
    for mode in ("eager", "auto"):
        if mode == "auto":
            step.install_plan(model, graphs.exported(model))
        tokens, logits = greedy_steps(model, ids, 12, mode)
        assert tokens == plain_tokens
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)
    assert step._PLANS[model][1] is not None
    for bits in ("int8", "int4"):
        with pytest.raises(ConfigError, match="quantizes its weights itself"):
            autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=bits)


def test_gguf_out_is_refused(tmp_path_factory, tmp_path):
    """llama.cpp's "bitnet" runs another model (a SiLU MLP): save_gguf is a ConfigError naming the model type, and
    writes nothing."""
    from conftest import write_char_tokenizer

    from autolm.gguf_writer import save_gguf

    directory, _ = BITNET.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    os.makedirs(tmp_path / "tok")
    write_char_tokenizer(str(tmp_path / "tok"))
    tok = autolm.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="'bitnet' has no llama.cpp architecture"):
        save_gguf(model, tok, str(tmp_path / "out.gguf"), "f32")
    assert not os.path.exists(tmp_path / "out.gguf")
