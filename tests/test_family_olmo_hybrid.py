"""OLMo Hybrid against transformers: Gated DeltaNet layers (separate q/k/v/a/b/g projections, more value heads than
key heads, beta doubled by linear_allow_neg_eigval) around an OLMo 3 attention layer with biases, GQA and
whole-projection q/k norms; a second checkpoint with the default layer pattern (the last layer forced to full
attention), the linear sizes derived from hidden_size, plain beta and a tied head; the checkpoint as transformers
writes it (attention_layer_norm / feedforward_layer_norm, the conv weight in q/k/v pieces); the standard battery,
the recurrent checks (padding, pieces across the delta rule's chunks, the serving engine) and a long greedy
generation against transformers'."""

from __future__ import annotations

import pytest
import torch
from family_checks import Family
from safetensors import safe_open

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
)
TARGETS = ["q_proj", "v_proj", "g_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft has no default
HYBRID = Family(
    "OlmoHybridConfig",
    dict(
        SIZES,
        num_hidden_layers=3,
        num_key_value_heads=2,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        attention_bias=True,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
    ),
    lora_targets=TARGETS,
)
# layer_types by default for two layers: [linear, full] (the last forced to full attention); linear sizes derived
DEFAULT = Family(
    "OlmoHybridConfig",
    dict(SIZES, num_hidden_layers=2, linear_allow_neg_eigval=False, tie_word_embeddings=True),
    lora_targets=TARGETS,
)


def test_logits(tmp_path_factory):
    HYBRID.check_logits(tmp_path_factory)
    DEFAULT.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    HYBRID.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    for fam in (HYBRID, DEFAULT):
        fam.check_long_generation(tmp_path_factory, new=40, seed=5, exact_length=True)


def test_recurrent(tmp_path_factory, tmp_path):
    HYBRID.check_recurrent(tmp_path_factory, tmp_path)
    cache = HYBRID.check_pieces(tmp_path_factory)
    conv, state = cache.states[0]
    assert conv.shape == (2, 16 + 16 + 64, 3) and state.shape == (2, 4, 8, 16)


def test_bf16(tmp_path_factory):
    HYBRID.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    HYBRID.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    HYBRID.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's tensor names in the saved file (the norms as
    attention_layer_norm / feedforward_layer_norm, the conv in q/k/v pieces at the projections' widths, as the Hub's
    files hold them), config.json's keys and values."""
    model, saved = HYBRID.check_saved_files(tmp_path_factory, tmp_path / "a")
    assert {
        "model.layers.0.attention_layer_norm.weight",
        "model.layers.1.feedforward_layer_norm.weight",
    } <= saved
    assert "model.layers.0.input_layernorm.weight" in model.state_dict()
    with safe_open(tmp_path / "a" / "saved" / "model.safetensors", "pt") as f:
        widths = [f.get_slice(f"model.layers.2.linear_attn.{p}_conv1d.weight").get_shape()[0] for p in "qkv"]
    assert widths == [16, 16, 64]
    DEFAULT.check_saved_files(tmp_path_factory, tmp_path / "b")
    DEFAULT.check_names_and_config(tmp_path_factory, tmp_path / "c")


def test_disk_offload(tmp_path_factory, tmp_path):
    HYBRID.check_disk_offload(tmp_path_factory, tmp_path)


def test_config_defaults_equal_transformers():
    """Every field's default (the layer pattern and the derived linear sizes included) is transformers'."""
    import transformers

    ours, theirs = autolm.OlmoHybridConfig().to_dict(), transformers.OlmoHybridConfig().to_dict()
    assert {k: v for k, v in theirs.items() if k in ours} == {k: v for k, v in ours.items() if k in theirs}
    assert not set(ours) - set(theirs)
    for kwargs in (
        dict(num_hidden_layers=6),
        dict(num_hidden_layers=3, hidden_size=96, num_attention_heads=6),
    ):
        c, t = autolm.OlmoHybridConfig(**kwargs), transformers.OlmoHybridConfig(**kwargs)
        assert c.layer_types == t.layer_types
        assert (
            c.linear_key_head_dim == t.linear_key_head_dim
            and c.linear_value_head_dim == t.linear_value_head_dim
        )


def test_config_refusals():
    """Layer types without a linear or an attention layer, an unknown kind, linear key heads that do not divide
    the value heads, an activation other than SiLU: ConfigError naming the key."""
    for types in (["full_attention"] * 2, ["linear_attention"] * 2, ["linear_attention", "mamba"]):
        with pytest.raises(autolm.ConfigError, match="layer_types"):
            autolm.OlmoHybridConfig(num_hidden_layers=2, layer_types=types)
    with pytest.raises(autolm.ConfigError, match="linear_num_key_heads"):
        autolm.OlmoHybridConfig(linear_num_key_heads=4, linear_num_value_heads=6)
    with pytest.raises(autolm.ConfigError, match="hidden_act"):
        autolm.OlmoHybridConfig(hidden_act="gelu")
    model = autolm.OlmoHybridForCausalLM(autolm.OlmoHybridConfig(num_hidden_layers=2, hidden_size=64,
                                                                 num_attention_heads=4))  # fmt: skip
    assert [type(layer).__name__ for layer in model.model.layers] == [
        "OlmoHybridLinearAttentionDecoderLayer",
        "Olmo3DecoderLayer",
    ]
    assert torch.equal(model.model.layers[0].linear_attn.o_norm.weight, torch.ones(24))
