"""Inkling (inkling_text) against transformers: full and sliding layers with their own head counts and widths,
relative logits (an extent shorter than the prompt, the window's on sliding layers), the log scaling of the full
layers' queries and biases, four short convolutions per layer (their states through the cache), a dense first
layer then the sigmoid router over routed and shared experts (the correction bias set), the normed embeddings,
the head's muP divisor and its cut to unpadded_vocab_size; a second checkpoint with transformers' derived layer
kinds (every sixth layer full), all layers sparse, a 3-tap convolution and one shared expert. The standard
battery, the recurrent checks, config defaults and round trip, errors naming the field; llama.cpp has no
Inkling architecture."""

from __future__ import annotations

import pytest
import torch
from family_checks import Family, check_config_defaults

import autolm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "r_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=1,
    swa_head_dim=16,
    d_rel=4,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    logits_mup_width_multiplier=0.5,
)
INKLING = Family(
    "InklingTextConfig",
    dict(
        SIZES,
        num_hidden_layers=3,
        sliding_window_size=4,
        rel_extent=6,
        local_layer_ids=[1],
        mlp_layer_types=["dense", "sparse", "sparse"],
        log_scaling_n_floor=3,
        log_scaling_alpha=0.5,
        unpadded_vocab_size=150,
    ),
    lora_targets=TARGETS,
)
DERIVED = Family(
    "InklingTextConfig",
    dict(
        SIZES,
        num_hidden_layers=6,
        sliding_window_size=5,
        rel_extent=20,
        conv_kernel_size=3,
        n_shared_experts=1,
    ),
    lora_targets=TARGETS,
)


def test_correction_bias(tmp_path_factory, tmp_path):
    """A correction bias that changes which experts route: transformers' logits."""
    INKLING.check_correction_bias(tmp_path_factory, tmp_path)


def test_logits(tmp_path_factory):
    INKLING.check_logits(tmp_path_factory)
    DERIVED.check_logits(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(INKLING.checkpoint(tmp_path_factory)[0])
    assert model(torch.tensor([[3, 4, 5]])).logits.shape[-1] == 150  # cut to unpadded_vocab_size
    assert model.config.layer_types == ["hybrid", "hybrid_sliding", "hybrid"]
    derived = autolm.AutoConfig.from_pretrained(DERIVED.checkpoint(tmp_path_factory)[0])
    assert derived.layer_types == ["hybrid_sliding"] * 5 + ["hybrid"]
    assert derived.mlp_layer_types == ["sparse"] * 6


def test_generate(tmp_path_factory):
    INKLING.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens: past the windows and the relative extent; transformers' tokens."""
    INKLING.check_long_generation(tmp_path_factory, new=40, seed=7, exact_length=True)


def test_one_token_step(tmp_path_factory):
    INKLING.check_one_token_step(tmp_path_factory)
    DERIVED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory):
    INKLING.check_compiled_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    INKLING.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    INKLING.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    INKLING.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    INKLING.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names and shapes, the checkpoint's tensor names and config.json keys and values saved back."""
    INKLING.check_saved_files(tmp_path_factory, tmp_path / "a")
    DERIVED.check_names_and_config(tmp_path_factory, tmp_path / "b")


def test_config_defaults_are_transformers():
    from autolm.models.inkling import InklingTextConfig

    check_config_defaults(InklingTextConfig)
    c = InklingTextConfig()
    assert c.layer_types.count("hybrid") == 11 and c.mlp_layer_types == ["sparse"] * 66


def test_config_reads_the_checkpoints_names():
    """sconv_kernel_size, model_max_length, dense_mlp_idx and dense_intermediate_size as transformers reads them."""
    import transformers

    from autolm.models.inkling import InklingTextConfig

    d = dict(num_hidden_layers=3, sconv_kernel_size=3, model_max_length=4096, dense_mlp_idx=2,
             intermediate_size=40, dense_intermediate_size=100)  # fmt: skip
    ours, theirs = InklingTextConfig.from_dict(d), transformers.InklingTextConfig(**d)
    for key in ("conv_kernel_size", "max_position_embeddings", "mlp_layer_types", "intermediate_size",
                "moe_intermediate_size", "sliding_window_size", "layer_types"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert "sconv_kernel_size" not in ours.to_dict() and ours.to_dict()["sliding_window_size"] == 512


def test_config_errors_name_the_key():
    from autolm.models.inkling import InklingTextConfig

    for kwargs, key in (
        (dict(num_hidden_layers=2, layer_types=["hybrid", "full_attention"]), "layer_types"),
        (dict(num_hidden_layers=2, mlp_layer_types=["dense"]), "mlp_layer_types"),
        (dict(swa_num_key_value_heads=3), "swa_num_key_value_heads"),
        (dict(n_shared_experts=0), "n_shared_experts"),
        (dict(num_experts_per_tok=300), "num_experts_per_tok"),
        (dict(d_rel=0), "d_rel"),
        (dict(log_scaling_n_floor=-1), "log_scaling_n_floor"),
        (dict(unpadded_vocab_size=10**6), "unpadded_vocab_size"),
        (dict(logits_mup_width_multiplier=0), "logits_mup_width_multiplier"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            InklingTextConfig(**kwargs)


def test_image_text_model(tmp_path_factory, tmp_path):
    """The image-text model as transformers writes it (the original layout: model.llm.*, interleaved gate/up
    rows, audio and vision towers) loads as InklingForCausalLM with the image-text model's logits on text; saved,
    it is the text model transformers loads."""
    import transformers
    from conftest import padded_batch, positions, randomize

    text = dict(INKLING.checkpoint(tmp_path_factory)[1].config.to_dict())
    mm = transformers.InklingConfig(
        text_config=text,
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        audio_config=dict(n_mel_bins=4, mel_vocab_size=8),
    )
    torch.manual_seed(0)
    hf = transformers.InklingForConditionalGeneration(mm)
    randomize(hf)
    hf.save_pretrained(tmp_path / "mm")
    hf = transformers.InklingForConditionalGeneration.from_pretrained(
        tmp_path / "mm", attn_implementation="eager"
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")
    assert type(model).__name__ == "InklingForCausalLM"
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = (
            m(ids, attention_mask=mask, position_ids=positions(mask)).logits for m in (model, hf.eval())
        )
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "text")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", attn_implementation="eager")
    with torch.no_grad():
        again = back(ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(again[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
