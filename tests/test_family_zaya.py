"""ZAYA against transformers: CCA attention (the q/k convolutions of cca_time0 / cca_time1 taps, their residual paths,
the values half from the previous token, L2 q/k norms with a learned key temperature), full and sliding layers with
partial RoPE by layer type, the fp32 residual stream with its scalings, the one-expert mixture whose router carries
a state from layer to layer (with a skip class), the head's bias; the standard battery and the recurrent checks
(state through the cache in pieces, speculation, the serving engine)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, padded_batch, positions
from family_checks import Family, check_config_defaults

import autolm

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
    num_experts=4,
    router_hidden_size=16,
    max_position_embeddings=128,
    layer_types=["hybrid", "hybrid_sliding", "hybrid"],
    sliding_window=5,
)
TARGETS = ["q_proj", "k_proj", "v_proj_current", "o_proj", "fc1", "down_proj"]  # peft has no default for zaya
# biases in the projections and the head, a 3-tap grouped convolution, a sliding window
ZAYA = Family(
    "ZayaConfig", dict(SIZES, attention_bias=True, lm_head_bias=True, cca_time1=3), lora_targets=TARGETS
)
# a 3-tap depthwise convolution, an untied head, no biases (a left-padded row's state is its unpadded one)
PLAIN = Family("ZayaConfig", dict(SIZES, cca_time0=3, tie_word_embeddings=False), lora_targets=TARGETS)


def test_logits(tmp_path_factory):
    ZAYA.check_logits(tmp_path_factory)
    PLAIN.check_logits(tmp_path_factory)


def test_skip_class(tmp_path_factory, tmp_path):
    """Balancing biases that make the router choose the skip class for some tokens (those tokens' mixture output
    zero): transformers' logits."""
    import transformers

    directory, _ = ZAYA.checkpoint(tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    for layer in hf.model.layers:
        layer.mlp.gate.balancing_biases.copy_(torch.tensor([0.0, 0.1, -0.2, 0.0, 0.35]))
    hf.save_pretrained(tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_batch()
    skipped = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, args, out: skipped.append(int((out[1] == 0).sum())))
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert sum(skipped) > 0, "no token took the skip class"
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_generate(tmp_path_factory):
    ZAYA.check_generate(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    """The convolution and delayed-value states through the cache in two pieces, speculation and the serving
    engine (without biases: with them, padding's zeroed inputs still give the projections' biases)."""
    PLAIN.check_recurrent(tmp_path_factory, tmp_path)


def test_one_token_step(tmp_path_factory):
    ZAYA.check_one_token_step(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 20 new tokens past the sliding window, each a step of the states: transformers'."""
    PLAIN.check_long_generation(tmp_path_factory, new=20, seed=7, exact_length=True)


def test_bf16(tmp_path_factory):
    ZAYA.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    ZAYA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    """On the checkpoint without biases: the biased one's bf16 rest (the quantized model's dtype) flips routing
    decisions of the tiny random model, far from what quantization alone changes."""
    PLAIN.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names and shapes (the balancing biases a buffer in the file), config.json as written."""
    _, saved = ZAYA.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.gate.balancing_biases" in saved
    assert "model.layers.0.mlp.gate.router_states_scale" not in saved and "lm_head.bias" in saved
    PLAIN.check_names_and_config(tmp_path_factory, tmp_path / "plain")


def test_disk_offload(tmp_path_factory, tmp_path):
    ZAYA.check_disk_offload(tmp_path_factory, tmp_path)


def test_default_config_is_transformers():
    from autolm.models.zaya import ZayaConfig

    check_config_defaults(ZayaConfig)


def test_config_reads_the_hub_spelling():
    """The Hub's config carries a stray top-level rope_type in rope_parameters (transformers drops it); no
    rope_parameters: transformers' defaults; no layer_types: every layer "hybrid"."""
    from autolm.models.zaya import ZayaConfig

    rope = {
        "rope_type": "default",
        "hybrid": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
    }
    c = ZayaConfig.from_dict({"num_hidden_layers": 2, "rope_parameters": rope, "vocab_size": VOCAB})
    assert set(c.rope_parameters) == {"hybrid"} and c.rope_theta == 1e6
    assert c.layer_types == ["hybrid", "hybrid"]
    assert ZayaConfig.from_dict({}).rope_parameters["hybrid_sliding"]["rope_theta"] == 10_000.0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts_per_tok=2), "num_experts_per_tok"),
        (dict(layer_types=["hybrid", "full_attention"], num_hidden_layers=2), "layer_types"),
        (dict(layer_types=["hybrid_sliding"], num_hidden_layers=1), "sliding_window"),
        (dict(cca_time0=0), "cca_time0"),
        (dict(router_hidden_size="16"), "router_hidden_size"),
        (dict(lm_head_bias="yes"), "lm_head_bias"),
        (
            dict(rope_parameters={"hybrid": {"rope_theta": 1e4, "partial_rotary_factor": 1.5}}),
            "partial_rotary_factor",
        ),
        (dict(rope_parameters={"full_attention": {"rope_theta": 1e4}}), "rope_parameters"),
        (dict(num_key_value_heads=1, num_attention_heads=1, head_dim=3), "num_key_value_heads"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.zaya import ZayaConfig

    with pytest.raises(autolm.ConfigError, match=match):
        ZayaConfig.from_dict(bad)
