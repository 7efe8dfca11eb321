"""Aria's language model (aria_text) against transformers and peft: Llama's attention with GQA, a mixture of 4
experts of which each token uses 2 (the softmax over the top-2 router logits; the routed experts SiLU-gated, stored
(in, out) and saved as `fc1` / `fc2`) plus shared experts twice intermediate_size wide, an untied head; and a
second checkpoint with 5 experts choosing 3, one shared expert with GELU and biases (the routed experts stay SiLU),
attention biases, a head_dim of its own, another RoPE base and a tied head. The standard battery, the checkpoint's
names in what autolm saves and transformers' in the model, transformers' tensor-parallel plan, config.json and the
config's defaults. llama.cpp has no Aria architecture: no GGUF."""

from __future__ import annotations

import pytest
import torch
from family_checks import Family, check_config_defaults, same_logits
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.aria_text import AriaTextConfig

SMALL = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)  # fmt: skip
ARIA = Family(
    "AriaTextConfig",
    dict(SMALL, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=2),
    lora_targets=[
        "q_proj",
        "v_proj",
        "gate_proj",
    ],  # peft has no default for aria_text; gate_proj: shared experts
)
WIDE = Family(
    "AriaTextConfig",
    dict(SMALL, moe_num_experts=5, moe_topk=3, moe_num_shared_experts=1, hidden_act="gelu", mlp_bias=True,
         attention_bias=True, head_dim=24, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"aria": ARIA, "wide": WIDE}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    ARIA.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    ARIA.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    ARIA.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = ARIA.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="aria_text"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    ARIA.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_names_and_config(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves (equal logits); the file holds the checkpoint's names (the experts as
    fc1 / fc2) and config.json transformers' keys and values; the model's names and shapes are transformers';
    the tensor-parallel plan is transformers' but for the experts, which cut their own rows."""
    family = FAMILIES[name]
    model, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert (
        "model.layers.1.mlp.experts.fc1.weight" in saved and "model.layers.0.mlp.experts.fc2.weight" in saved
    )
    _, hf = family.checkpoint(tmp_path_factory)
    plan = {k: v for k, v in hf.config.base_model_tp_plan.items() if ".experts" not in k}
    assert type(model).tp_patterns == plan
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "wide")
    mlp = model.model.layers[0].mlp
    assert mlp.experts.transposed and (mlp.experts.act_fn is not mlp.shared_experts.act_fn) == (
        name == "wide"
    )


def test_disk_offload(tmp_path_factory, tmp_path):
    ARIA.check_disk_offload(tmp_path_factory, tmp_path)


def test_no_shared_experts(tmp_path_factory):
    """moe_num_shared_experts 0: the experts alone, beside a zero-wide shared MLP (as transformers holds it)."""
    import transformers
    from conftest import VOCAB, randomize

    cfg = transformers.AriaTextConfig(vocab_size=VOCAB, **dict(ARIA.kwargs, moe_num_shared_experts=0))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize(hf)
    d = tmp_path_factory.mktemp("aria_unshared")
    hf.save_pretrained(d)
    model = autolm.AutoModelForCausalLM.from_pretrained(d)
    assert model.model.layers[0].mlp.shared_experts.up_proj.weight.shape == (0, 64)
    same_logits(model, hf)


def test_config_defaults_and_errors():
    """AriaTextConfig() holds transformers' defaults (pretraining_tp, initializer_range kept as config.json gives
    them); bad values raise ConfigError naming the key."""
    check_config_defaults(AriaTextConfig)
    cfg = AriaTextConfig.from_dict({"moe_num_experts": 16, "moe_topk": 4, "pretraining_tp": 1})
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.to_dict()["pretraining_tp"]) == (16, 4, 1)
    for change, key in ((dict(moe_topk=9), "moe_topk"), (dict(moe_topk=0), "moe_topk"),
                        (dict(moe_num_experts=0), "moe_num_experts"),
                        (dict(moe_num_shared_experts=-1), "moe_num_shared_experts"),
                        (dict(moe_num_shared_experts="2"), "moe_num_shared_experts"),
                        (dict(mlp_bias="yes"), "mlp_bias")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            AriaTextConfig(**change)
