"""DiffLlama against transformers and peft: Llama's layer with the Differential Transformer's attention (two
softmax maps per head pair subtracted with the learned lambda, lambda_init by layer, a weightless RMSNorm over each
pair, times 1 - lambda_init). Checkpoints: grouped KV heads (4 KV heads: the value halves span two heads each)
over three layers, head_dim given, untied; and 2 KV heads for 4 query heads with q/k/v/o biases, a tied head,
head_dim from the hidden size, another RoPE base and epsilon. The standard battery, the attention probabilities
(output_attentions), the cache's layout, config.json in transformers' keys. llama.cpp has no DiffLlama
architecture: no GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401

import autolm
from autolm.errors import ConfigError
from autolm.models.diffllama import DiffLlamaConfig

# GQA (8 query heads, 4 KV heads), head_dim given, three layers (lambda_init differs by layer), an untied head
DIFF = Family(
    "DiffLlamaConfig",
    dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
         head_dim=16, max_position_embeddings=64),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for diffllama
)  # fmt: skip
# the fewest KV heads (2: one in each value half), q/k/v/o biases, a tied head, another RoPE base and epsilon
BIASED = Family(
    "DiffLlamaConfig",
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=64, attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
FAMILIES = {"diff": DIFF, "biased": BIASED}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DIFF.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    DIFF.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    DIFF.check_lora(tmp_path_factory, tmp_path)


def test_lora_without_targets_is_refused_as_peft_refuses_it(tmp_path_factory):
    import peft
    import transformers

    from autolm.errors import AdapterError

    directory, _ = DIFF.checkpoint(tmp_path_factory)
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(directory), peft.LoraConfig())
    with pytest.raises(AdapterError, match="diffllama"):
        autolm.get_peft_model(autolm.AutoModelForCausalLM.from_pretrained(directory), autolm.LoraConfig())


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DIFF.check_quantized(tmp_path_factory, bits)


@pytest.mark.parametrize("name", FAMILIES)
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    DIFF.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes (the lambda vectors, no groupnorm weight); config.json round-trips
    with transformers' keys only; no tensor-parallel plan (transformers declares none)."""
    model, hf = FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)
    assert "model.layers.0.self_attn.lambda_q1" in model.state_dict()
    assert not hf.config.base_model_tp_plan and not type(model).tp_patterns
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "biased")


def test_attention_probabilities_and_lambda(tmp_path_factory):
    """output_attentions gives transformers' maps (B, heads, T, S) in its head order at every real query; lambda
    matters: lambda_init of another layer changes the logits."""
    directory, hf = DIFF.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True)
        assert len(ours.attentions) == 3
        for a, b in zip(ours.attentions, theirs.attentions):
            torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
        assert [layer.self_attn.lambda_init for layer in model.model.layers] == [
            layer.self_attn.lambda_init for layer in hf.model.layers
        ]
        model.model.layers[2].self_attn.lambda_init = model.model.layers[0].self_attn.lambda_init
        changed = model(ids, attention_mask=mask).logits[real]
    assert not torch.allclose(changed, ours.logits[real], atol=1e-3)


def test_cache_holds_the_kv_heads_in_pairs(tmp_path_factory):
    """The cache holds n_kv / 2 heads of 2 head_dim per layer (as much as Llama's n_kv heads); a prompt run in two
    pieces through it gives the whole prompt's logits."""
    directory, _ = DIFF.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        cache = first.past_key_values
        assert cache.keys[0].shape[1::2] == (2, 32) and cache.values[0].shape[1::2] == (2, 32)
        second = model(ids[:, 5:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([first.logits, second], 1), whole, atol=1e-5, rtol=1e-5)


def test_default_config_and_errors():
    """DiffLlamaConfig() holds transformers' defaults; bad values raise ConfigError naming the key."""
    import transformers

    theirs = json.loads(transformers.DiffLlamaConfig().to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert DiffLlamaConfig().to_dict() == theirs
    small = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    for change, key in ((dict(num_key_value_heads=1), "num_key_value_heads"),
                        (dict(num_attention_heads=6, num_key_value_heads=4, head_dim=16), "num_key_value_heads"),
                        (dict(attention_dropout=0.1), "attention_dropout"), (dict(lambda_std_dev="x"), "lambda_std_dev"),
                        (dict(attention_bias=1), "attention_bias"), (dict(rms_norm_eps=0), "rms_norm_eps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            DiffLlamaConfig(**{**small, **change})
