"""FlexOlmo against transformers: OLMoE's q/k norms over the whole projection and 4 experts of which each token
uses 2 (softmax over all experts, top 2, renormalised with norm_topk_prob), with OLMo 2's norms after attention and
the experts; GQA and q/k/v/o biases; a variant with a head size other than hidden / heads, no renormalisation and
a tied head; the checkpoint as transformers writes it (one tensor per expert); the standard battery, config
defaults (RoPE base 500000) and errors. llama.cpp has no FlexOlmo: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults
from test_compiled_step import compiled_home, home  # noqa: F401
from test_gguf_out import byte_tokenizer  # noqa: F401

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts=4,
    num_experts_per_tok=2,
)
FLEX = Family(
    "FlexOlmoConfig",
    dict(SIZES, norm_topk_prob=True, attention_bias=True),
    lora_targets=["q_proj", "v_proj"],  # peft has no default for flex_olmo
)
WIDE = Family("FlexOlmoConfig", dict(SIZES, head_dim=32, tie_word_embeddings=True))
ALL = pytest.mark.parametrize("family", [FLEX, WIDE], ids=["flex", "wide"])


@ALL
def test_logits(tmp_path_factory, family):
    family.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    FLEX.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    FLEX.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    FLEX.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    FLEX.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    FLEX.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    FLEX.check_quantized(tmp_path_factory, bits)


@ALL
def test_save(tmp_path_factory, tmp_path, family):
    """transformers' names and shapes; the checkpoint's per-expert tensors, no input_layernorm, and only
    transformers' config keys (no clip_qkv) in the files autolm saves."""
    model, saved = family.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in saved
    assert "model.layers.0.post_feedforward_layernorm.weight" in saved
    assert not any("input_layernorm" in name for name in saved)
    assert "clip_qkv" not in model.config.to_dict()


def test_disk_offload(tmp_path_factory, tmp_path):
    FLEX.check_disk_offload(tmp_path_factory, tmp_path)


def test_norms_multiply_their_weight_in_fp32(tmp_path_factory):
    """OLMo 2's RMSNorm arithmetic (the weight multiplied before the cast back), where OLMoE's casts first: in
    bf16 the logits are transformers' bf16 logits more closely than with OLMoE's norms."""
    import transformers

    from autolm.nn import RMSNorm

    directory, _ = FLEX.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16,
                                                           attn_implementation="eager")  # fmt: skip
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m.weight_in_fp32 for m in norms)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[real].float()
        ours = model(ids, attention_mask=mask).logits[real].float()
        for m in norms:
            m.weight_in_fp32 = False
        olmoe = model(ids, attention_mask=mask).logits[real].float()
    assert (ours - theirs).abs().mean() < (olmoe - theirs).abs().mean()


def test_config_defaults():
    """Every default autolm writes is transformers' (FlexOlmo-7x7B's sizes, RoPE base 500000); num_local_experts
    reads num_experts, as transformers' attribute_map."""
    from autolm.models.flex_olmo import FlexOlmoConfig

    check_config_defaults(FlexOlmoConfig)
    c = FlexOlmoConfig.from_dict(
        dict(hidden_size=64, num_attention_heads=4, num_experts=3, num_experts_per_tok=1)
    )
    assert c.num_local_experts == 3 and c.rope_theta == 500000.0 and c.bos_token_id is None


@pytest.mark.parametrize(
    "key, value",
    [("num_experts", 0), ("num_experts_per_tok", 5), ("norm_topk_prob", "yes"), ("rms_norm_eps", 0)],
)
def test_config_errors_name_the_key(key, value):
    from autolm.models.flex_olmo import FlexOlmoConfig

    base = dict(hidden_size=64, num_attention_heads=4, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(autolm.ConfigError, match=key):
        FlexOlmoConfig.from_dict({**base, key: value})


def test_no_gguf(tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """llama.cpp has no FlexOlmo architecture: GGUF out is refused, naming the model type."""
    from autolm.gguf_writer import save_gguf

    model = autolm.AutoModelForCausalLM.from_pretrained(FLEX.checkpoint(tmp_path_factory)[0])
    with pytest.raises(autolm.AutolmError, match="flex_olmo"):
        save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
