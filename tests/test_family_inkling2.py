"""Inkling 2 (inkling2_text) against transformers, on checkpoints transformers writes in the original layout
(model.llm.*, interleaved expert rows, attn_res queries): block attention residuals over a stack of two-layer blocks
(boundaries on full and sliding layers, a full first layer with no attention_input), full and sliding layers with
their own head counts and widths, dynamic convolutions of the full layers' keys and values, relative logits past
their extent and the window, log scaling from a low floor, L2 clipping, value norms, sinks and output gates at
thresholds and soft-caps low enough to bite, the fp32 DeepSeek-V4 router (a correction bias that changes the
routing), soft-capped experts, the final logit soft-cap and the cut to unpadded_vocab_size; a second checkpoint with
transformers' derived layer kinds (the sixth full), three-layer blocks and 3-tap convolutions. The standard battery,
the recurrent checks (the convolution states), config defaults and round trip, errors naming the field, the
image-text wrapper; llama.cpp has no Inkling 2 architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from family_checks import Family, check_config_defaults

import autolm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "r_proj", "gate_proj", "sink_proj"]
SIZES = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=1,
    swa_head_dim=16,
    d_rel=4,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
)
INKLING2 = Family(
    "Inkling2TextConfig",
    dict(
        SIZES,
        num_hidden_layers=5,
        layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid_sliding"],
        n_layers_per_attn_res_block=2,
        sliding_window_size=4,
        rel_extent=6,
        log_scaling_n_floor=3,
        log_scaling_alpha=0.5,
        unpadded_vocab_size=150,
        qk_l2_clip_threshold=2.0,
        rel_l2_clip_threshold=1.0,
        mlp_gate_softcap=1.0,
        mlp_up_softcap=2.0,
        final_logit_softcapping=3.0,
    ),
    lora_targets=TARGETS,
)
DERIVED = Family(
    "Inkling2TextConfig",
    dict(
        SIZES,
        num_hidden_layers=6,
        n_layers_per_attn_res_block=3,
        sliding_window_size=5,
        rel_extent=20,
        conv_kernel_size=3,
        unpadded_vocab_size=VOCAB,
    ),
    lora_targets=TARGETS,
)


def test_correction_bias(tmp_path_factory, tmp_path):
    """A correction bias that changes which experts route: transformers' logits."""
    INKLING2.check_correction_bias(tmp_path_factory, tmp_path)


def test_logits(tmp_path_factory):
    INKLING2.check_logits(tmp_path_factory)
    DERIVED.check_logits(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(INKLING2.checkpoint(tmp_path_factory)[0])
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape[-1] == 150 and logits.abs().max() <= 3.0  # cut, soft-capped
    derived = autolm.AutoConfig.from_pretrained(DERIVED.checkpoint(tmp_path_factory)[0])
    assert derived.layer_types == ["hybrid_sliding"] * 5 + ["hybrid"]


def test_hidden_states(tmp_path_factory):
    INKLING2.check_hidden_states(tmp_path_factory)


def test_generate(tmp_path_factory):
    INKLING2.check_generate(tmp_path_factory)


def test_long_generation(tmp_path_factory):
    """A 30-token prompt and 40 new tokens: past the windows, the relative extent and the log-scaling floor."""
    INKLING2.check_long_generation(tmp_path_factory, new=40, seed=7, exact_length=True)


def test_one_token_step(tmp_path_factory):
    INKLING2.check_one_token_step(tmp_path_factory)
    DERIVED.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory):
    INKLING2.check_compiled_step(tmp_path_factory)


def test_recurrent(tmp_path_factory, tmp_path):
    INKLING2.check_recurrent(tmp_path_factory, tmp_path)


def test_bf16(tmp_path_factory):
    INKLING2.check_bf16(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    INKLING2.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    INKLING2.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """Saved under transformers' module names, which transformers loads with equal logits; config.json's keys and
    values saved back."""
    INKLING2.check_save(tmp_path_factory, tmp_path / "a")
    INKLING2.check_names_and_config(tmp_path_factory, tmp_path / "b")
    DERIVED.check_names_and_config(tmp_path_factory, tmp_path / "c")


def test_config_defaults_are_transformers():
    from autolm.models.inkling2 import Inkling2TextConfig

    check_config_defaults(Inkling2TextConfig)
    c = Inkling2TextConfig()
    assert c.layer_types.count("hybrid") == 8 and c.num_blocks == 8


def test_config_reads_transformers_names():
    """sconv_kernel_size, model_max_length, num_local_experts and routed_scaling_factor as transformers reads them."""
    import transformers

    from autolm.models.inkling2 import Inkling2TextConfig

    d = dict(num_hidden_layers=3, sconv_kernel_size=3, model_max_length=4096, num_local_experts=16,
             routed_scaling_factor=2.5)  # fmt: skip
    ours, theirs = Inkling2TextConfig.from_dict(d), transformers.Inkling2TextConfig(**d)
    for key in ("conv_kernel_size", "max_position_embeddings", "n_routed_experts", "route_scale", "layer_types",
                "sliding_window_size"):  # fmt: skip
        assert getattr(ours, key) == getattr(theirs, key), key
    assert "sconv_kernel_size" not in ours.to_dict() and ours.to_dict()["sliding_window_size"] == 1024


def test_config_errors_name_the_key():
    from autolm.models.inkling2 import Inkling2TextConfig

    for kwargs, key in (
        (dict(num_hidden_layers=2, layer_types=["hybrid", "full_attention"]), "layer_types"),
        (dict(swa_num_key_value_heads=5), "swa_num_key_value_heads"),
        (dict(num_experts_per_tok=500), "num_experts_per_tok"),
        (dict(n_layers_per_attn_res_block=0), "n_layers_per_attn_res_block"),
        (dict(scoring_func="softmax"), "scoring_func"),
        (dict(mlp_up_softcap=0), "mlp_up_softcap"),
        (dict(log_scaling_n_floor=-1), "log_scaling_n_floor"),
        (dict(unpadded_vocab_size=10**6), "unpadded_vocab_size"),
    ):
        with pytest.raises(autolm.ConfigError, match=key):
            Inkling2TextConfig(**kwargs)


def test_image_text_model(tmp_path_factory, tmp_path):
    """The image-text model as transformers writes it (its language model and vision tower) loads as
    Inkling2ForCausalLM with the image-text model's logits on text."""
    import transformers
    from conftest import padded_batch, positions, randomize

    text = dict(INKLING2.checkpoint(tmp_path_factory)[1].config.to_dict())
    mm = transformers.Inkling2Config(
        text_config=text,
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            text_hidden_size=32,
            projection_hidden_dim=16,
        ),
    )
    torch.manual_seed(0)
    hf = transformers.Inkling2ForConditionalGeneration(mm)
    randomize(hf)
    hf.save_pretrained(tmp_path / "mm")
    hf = transformers.Inkling2ForConditionalGeneration.from_pretrained(
        tmp_path / "mm", attn_implementation="eager"
    )
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path / "mm")
    assert type(model).__name__ == "Inkling2ForCausalLM"
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = (
            m(ids, attention_mask=mask, position_ids=positions(mask)).logits for m in (model, hf.eval())
        )
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
