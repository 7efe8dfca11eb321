"""LFM3 against transformers: short-convolution layers (with conv_bias) beside sliding-window attention layers
(plain RoPE) and full attention layers (proportional RoPE, half the frequencies turning), the attention with biases,
per-head q/k norms, GQA and its sigmoid output gate per head, the sandwich norms after the mixer and the MLP; a
second checkpoint with LFM3's default layer pattern, no gate, no sandwich norms, an untied head, a 3-tap
convolution and plain RoPE on the full layers; the checkpoint as transformers writes it; the standard battery, the
recurrent checks and a long greedy generation (crossing the sliding window) against transformers'."""

from __future__ import annotations

import pytest
from family_checks import Family

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    sliding_window=6,
)
TARGETS = [
    "q_proj",
    "v_proj",
    "g_proj",
    "in_proj",
    "out_proj",
    "w1",
    "w2",
    "w3",
]  # peft has no default for lfm3
LFM3 = Family(
    "Lfm3Config",
    dict(
        SIZES,
        layer_types=["conv", "sliding_attention", "conv", "full_attention", "sliding_attention"],
        conv_bias=True,
        attention_bias=True,
    ),
    lora_targets=TARGETS,
)
# LFM3's default layer pattern (conv, conv, full, conv, sliding), no gate, no sandwich norms, an untied head
PLAIN = Family(
    "Lfm3Config",
    dict(
        SIZES,
        use_attention_gate=False,
        use_sandwich_norm=False,
        tie_word_embeddings=False,
        conv_L_cache=3,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
        },
    ),
    lora_targets=TARGETS,
)


def test_logits(tmp_path_factory):
    LFM3.check_logits(tmp_path_factory)
    PLAIN.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    LFM3.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 30 new tokens past the 6-key window, each new token one step of the convolutions:
    transformers' greedy tokens (both checkpoints)."""
    for fam in (LFM3, PLAIN):
        fam.check_long_generation(tmp_path_factory, new=30, seed=7, exact_length=True)


def test_recurrent(tmp_path_factory, tmp_path):
    """Without conv_bias (with it, in_proj's bias reaches the convolution at padding positions, as in
    transformers); then pieces through the cache against one forward and transformers'."""
    PLAIN.check_recurrent(tmp_path_factory, tmp_path)
    LFM3.check_pieces(tmp_path_factory)


def test_bf16(tmp_path_factory):
    LFM3.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    LFM3.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    LFM3.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the checkpoint's in the saved file (the gate as gate_proj),
    config.json's keys and values; the gate and the
    sandwich norms only where the config has them."""
    model, saved = LFM3.check_saved_files(tmp_path_factory, tmp_path / "a")
    assert "model.layers.1.self_attn.gate_proj.weight" in saved  # transformers' file name for g_proj
    assert "model.layers.1.self_attn.g_proj.weight" in model.state_dict()
    assert "model.layers.3.post_ffn_norm.weight" in saved
    assert model.model.layers[1].self_attn.sliding_window == 6
    assert model.model.layers[3].self_attn.sliding_window is None
    plain, saved = PLAIN.check_saved_files(tmp_path_factory, tmp_path / "b")
    assert not any("gate_proj" in k or "post_operator_norm" in k for k in saved)
    assert plain.config.layer_types == ["conv", "conv", "full_attention", "conv", "sliding_attention"]
    PLAIN.check_names_and_config(tmp_path_factory, tmp_path / "c")


def test_disk_offload(tmp_path_factory, tmp_path):
    LFM3.check_disk_offload(tmp_path_factory, tmp_path)


def test_config_defaults_equal_transformers():
    """Every field's default (the layer pattern and the RoPE tables by layer type included) is transformers'."""
    import transformers

    ours, theirs = autolm.Lfm3Config().to_dict(), transformers.Lfm3Config().to_dict()
    assert {k: v for k, v in theirs.items() if k in ours} == {k: v for k, v in ours.items() if k in theirs}
    assert not set(ours) - set(theirs)
    c = autolm.Lfm3Config(num_hidden_layers=9)
    assert c.layer_types == transformers.Lfm3Config(num_hidden_layers=9).layer_types
    assert c.ff_dim == c.intermediate_size


def test_config_refusals():
    """A layer kind autolm does not know, a sliding layer without a window, a full layer without its RoPE
    table, a proportional RoPE factor out of range: ConfigError naming the key; the 7-tap convolution by default."""
    with pytest.raises(autolm.ConfigError, match="layer_types"):
        autolm.Lfm3Config(num_hidden_layers=2, layer_types=["conv", "mamba"])
    with pytest.raises(autolm.ConfigError, match="sliding_window"):
        autolm.Lfm3Config(num_hidden_layers=2, layer_types=["conv", "sliding_attention"], sliding_window=None)
    with pytest.raises(autolm.ConfigError, match="full_attention"):
        autolm.Lfm3Config.from_dict(
            {"num_hidden_layers": 3, "rope_parameters": {"sliding_attention": {"rope_theta": 1e4}}}
        )
    bad = {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 2}
    with pytest.raises(autolm.ConfigError, match="partial_rotary_factor"):
        autolm.Lfm3Config.from_dict({"rope_parameters": {"sliding_attention": {}, "full_attention": bad}})
    assert (
        autolm.AutoModelForCausalLM.from_config(autolm.Lfm3Config(**SIZES)).model.layers[0].conv.L_cache == 7
    )
