"""Granite MoE SWA against transformers: every Granite multiplier away from 1, GQA, attention biases, tied
embeddings, 4 experts of which each token uses 2, a shared MLP, a full layer then two sliding ones (a window of 4
tokens), a RoPE base per layer with a NoPE layer, the attention sinks; the standard battery, GGUF as llama.cpp's
GraniteMoeSWAModel converter writes it (in, out, Q8_0; with and without the shared MLP), the CLI."""

from __future__ import annotations

import pytest
from chat_checks import check_cli
from family_checks import Family
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_granite_swa import check_gguf_in, check_gguf_out_refuses, check_saved_names
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

KWARGS = dict(
    hidden_size=64,
    intermediate_size=32,
    shared_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    embedding_multiplier=3.0,
    residual_multiplier=0.6,
    attention_multiplier=0.09,
    logits_scaling=2.5,
    attention_bias=True,
    tie_word_embeddings=True,
    sliding_window=4,
)
GRANITEMOE_SWA = Family(
    "GraniteMoeSWAConfig",
    dict(KWARGS, layer_rope_theta=[10000.0, 0, 50000.0]),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for granitemoe_swa
)
# what llama.cpp's graph runs: one RoPE base; the NoPE layer as the converter writes it from no_rope_layers
GGUF_FAMILIES = {
    "granitemoe_swa": Family(
        "GraniteMoeSWAConfig", dict(KWARGS, layer_rope_theta=[10000.0, 0, 10000.0], no_rope_layers=[1, 0, 1])
    ),
    "granitemoe_swa_unshared": Family(
        "GraniteMoeSWAConfig", dict(KWARGS, shared_intermediate_size=0, tie_word_embeddings=False)
    ),
}


def test_logits(tmp_path_factory):
    GRANITEMOE_SWA.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    GRANITEMOE_SWA.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    GRANITEMOE_SWA.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    GRANITEMOE_SWA.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    GRANITEMOE_SWA.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    GRANITEMOE_SWA.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    GRANITEMOE_SWA.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict and the saved files (the shared MLP's too); only transformers'
    config keys."""
    GRANITEMOE_SWA.check_save(tmp_path_factory, tmp_path)
    check_saved_names(GRANITEMOE_SWA, tmp_path_factory, tmp_path)
    model = autolm.AutoModelForCausalLM.from_pretrained(GRANITEMOE_SWA.checkpoint(tmp_path_factory)[0])
    assert "model.layers.0.shared_mlp.input_linear.weight" in model.state_dict()


def test_disk_offload(tmp_path_factory, tmp_path):
    GRANITEMOE_SWA.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", sorted(GGUF_FAMILIES))
def test_gguf(name, tmp_path_factory, tmp_path):
    """The converter's file (its expert counts under "granite_swa") loads as GraniteMoeSWAForCausalLM."""
    check_gguf_in(GGUF_FAMILIES[name], "GraniteMoeSWAForCausalLM", tmp_path_factory, tmp_path)


@pytest.mark.parametrize(
    ("family", "changes", "field"),
    [
        (GRANITEMOE_SWA, {}, "layer_rope_theta"),
        (GGUF_FAMILIES["granitemoe_swa"], {"sliding_window": None}, "sliding_window"),
    ],
    ids=["rope_base_per_layer", "no_window"],
)
def test_gguf_out_refuses(family, changes, field, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """A RoPE base per layer, no window (llama.cpp's graph runs neither): a ConfigError naming the field, no
    file."""
    check_gguf_out_refuses(family, changes, field, tmp_path_factory, tmp_path, byte_tokenizer)


def test_cli(tmp_path_factory, tmp_path):
    """Granite 3.3's template (no granite-swash template is stored here)."""
    long = Family(GRANITEMOE_SWA.config_cls, dict(GRANITEMOE_SWA.kwargs, max_position_embeddings=2048))
    check_cli(
        long,
        "granite-3.3-2b-instruct.jinja",
        tmp_path_factory,
        tmp_path,
        "GraniteMoeSWAForCausalLM (granitemoe_swa)",
    )


def test_config_defaults_as_transformers():
    import transformers

    ours = autolm.models.GraniteMoeSWAConfig(num_hidden_layers=6)
    theirs = transformers.GraniteMoeSWAConfig(num_hidden_layers=6)
    assert ours.layer_types == theirs.layer_types
    assert ours.layer_rope_theta == theirs.layer_rope_theta
    assert (ours.sliding_window, ours.shared_intermediate_size, ours.num_local_experts) == (128, 0, 8)


def test_config_errors_name_the_key():
    from autolm.models.granitemoe_swa import GraniteMoeSWAConfig

    with pytest.raises(autolm.ConfigError, match="shared_intermediate_size"):
        GraniteMoeSWAConfig(shared_intermediate_size=-1)
    with pytest.raises(autolm.ConfigError, match="layer_rope_theta"):
        GraniteMoeSWAConfig(num_hidden_layers=2, layer_rope_theta=[1.0, "x"])
    with pytest.raises(autolm.ConfigError, match="num_experts_per_tok"):
        GraniteMoeSWAConfig(num_local_experts=4, num_experts_per_tok=5)
