"""JetMoE against transformers and peft: a mixture of attention heads (each token's top-k experts project its
queries and take back their heads' outputs, over keys and values shared from `kv_proj`; the query heads repeat the
KV heads slot by slot) and a mixture of SiLU-gated experts, both with an output bias; the layer norms' fixed
epsilon beside the config's final one. Checkpoints: 2 of 4 experts, 2 KV heads of kv_channels 16, an untied head,
another epsilon; and 3 of 5 experts, 4 KV heads of 8 (heads * kv_channels below hidden_size), GELU, the default
tied head, three layers, another RoPE base. The standard battery, the attention probabilities, the model's names
(transformers' but for the stacked experts) and the checkpoint's in what autolm saves, config.json in
transformers' keys. llama.cpp has no JetMoE architecture: no GGUF."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import padded_batch, positions
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.jetmoe import JetMoeConfig

JETMOE = Family(
    "JetMoeConfig",
    dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
         num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
         rms_norm_eps=1e-5),
    lora_targets=["kv_proj", "layer"],  # peft has no default for jetmoe; `layer`: the routers' Linear
)  # fmt: skip
WIDE = Family(
    "JetMoeConfig",
    dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_key_value_heads=4, kv_channels=8,
         num_local_experts=5, num_experts_per_tok=3, max_position_embeddings=64, activation_function="gelu",
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"jetmoe": JETMOE, "wide": WIDE}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    JETMOE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    JETMOE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    JETMOE.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = JETMOE.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="jetmoe"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    JETMOE.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_names(tmp_path_factory, tmp_path, name):
    """transformers loads what autolm saves, with equal logits; the saved file holds the checkpoint's names and
    config.json as transformers wrote it; the model's names are transformers' but for the MLP's experts, held
    stacked (input_linear as experts.gate_up_proj, output_linear as experts.down_proj)."""
    from safetensors import safe_open

    family = FAMILIES[name]
    family.check_save(tmp_path_factory, tmp_path)
    directory, hf = family.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    with (
        safe_open(f"{directory}/model.safetensors", "pt") as f,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as g,
    ):
        saved = set(g.keys())
        assert saved == set(f.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in saved)
    written, original = (json.load(open(f"{d}/config.json")) for d in (tmp_path / "saved", directory))
    for d in (written, original):
        d.pop("transformers_version", None)
    assert written == original
    assert "model.layers.1.mlp.input_linear.weight" in saved
    stacked = {"input_linear": "experts.gate_up_proj", "output_linear": "experts.down_proj"}
    theirs = {re.sub(r"mlp\.(input_linear|output_linear)\.weight$", lambda m: "mlp." + stacked[m[1]], k)
              for k in hf.state_dict()}  # fmt: skip
    assert set(model.state_dict()) == theirs
    assert "model.layers.0.self_attention.experts.router.layer.weight" in theirs
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "wide") and not type(model).tp_patterns and not hf.config.base_model_tp_plan


def test_disk_offload(tmp_path_factory, tmp_path):
    JETMOE.check_disk_offload(tmp_path_factory, tmp_path)


def test_attention_probabilities_and_layer_norm_epsilon(tmp_path_factory):
    """output_attentions gives transformers' maps (B, k * KV heads, T, S) in its head order at every real query;
    the layer norms keep epsilon 1e-6 while the final norm takes the config's."""
    directory, hf = JETMOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(
            ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True
        ).attentions
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
    assert len(ours) == 2 and ours[0].shape[1] == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0]
    assert (
        layer.input_layernorm.eps == layer.post_attention_layernorm.eps == 1e-6
        and model.model.norm.eps == 1e-5
    )


def test_default_config_and_errors():
    """JetMoeConfig() holds transformers' defaults (num_attention_heads derived, activation_function and
    kv_channels as config.json names them); bad values raise ConfigError naming the key."""
    import transformers

    check_config_defaults(JetMoeConfig)
    theirs = json.loads(transformers.JetMoeConfig().to_json_string())
    theirs.pop("transformers_version")
    assert JetMoeConfig().to_dict() == theirs
    cfg = JetMoeConfig.from_dict({"num_key_value_heads": 4, "num_experts_per_tok": 3, "num_attention_heads": 7,
                                  "kv_channels": 8, "activation_function": "gelu"})  # fmt: skip
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_act) == (12, 8, "gelu")
    small = dict(hidden_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=4)
    for change, key in ((dict(num_experts_per_tok=5), "num_experts_per_tok"),
                        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
                        (dict(hidden_act="tanh"), "activation_function"),
                        (dict(num_key_value_heads="2"), "num_key_value_heads"),
                        (dict(aux_loss_coef="x"), "aux_loss_coef"), (dict(rms_norm_eps=0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            JetMoeConfig(**{**small, **change})
