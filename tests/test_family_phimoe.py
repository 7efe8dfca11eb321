"""Phi-MoE (Phi-3.5-MoE, Phi-tiny-MoE) against transformers and peft: LayerNorms with bias, q/k/v/o and LM-head
biases, GQA, a 5-slot window shorter than the prompts, LongRoPE as transformers' Phi-MoE computes it (short factors
at every length, the tables scaled by short_mscale up to original_max_position_embeddings and by another
long_mscale past it: the batches here are longer than it, and a generation crosses it), 4 experts under sparsemixer
routing with a threshold wide enough that the softmax weights take several logits; the checkpoint as transformers
writes it (Mixtral's block_sparse_moe.gate and per-expert w1/w2/w3); the sparsemixer itself against transformers'
in eval (fp32, bf16) and in training (Gumbel draws, gradients); the standard battery, GGUF as llama.cpp's
PhiMoeModel converter writes it (in, and out of autolm: the same file), and the CLI with Phi-3.5's chat template
(Phi-3.5-MoE-instruct ships Phi-3.5-mini-instruct's)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from chat_checks import check_cli
from conftest import VOCAB, padded_batch, positions
from family_checks import Family
from gguf_mimic import add_toy_vocab, stacked_experts
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_phi import _byte_tokenizer

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_local_experts=4,
    num_experts_per_tok=2,
    attention_bias=True,
    lm_head_bias=True,
)


def longrope(short_mscale: float, long_mscale: float) -> dict:
    """LongRoPE over head_dim 16 (8 factors), original length 8."""
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.2, 1.5, 1.9, 2.4, 3.0, 3.7, 4.5],
        "long_factor": [2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 13.0, 16.0],
        "short_mscale": short_mscale,
        "long_mscale": long_mscale,
        "original_max_position_embeddings": 8,
    }


TARGETS = ["q_proj", "v_proj", "o_proj"]  # peft has no default for phimoe
PHIMOE = Family(
    "PhimoeConfig",
    dict(
        SIZES,
        sliding_window=5,
        router_jitter_noise=0.2,
        input_jitter_noise=0.01,
        rope_parameters=longrope(1.1, 1.3),
    ),
    lora_targets=TARGETS,
)
# what a GGUF file holds: the released models' routing threshold, LongRoPE scaled by the converter's attention
# factor (sqrt(1 + ln 8 / ln 8) for 64 positions over 8)
PLAIN = Family(
    "PhimoeConfig", dict(SIZES, rope_parameters=longrope(math.sqrt(2), math.sqrt(2))), lora_targets=TARGETS
)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return _byte_tokenizer(tmp_path_factory.mktemp("byte_tokenizer") / "tokenizer")


def test_logits(tmp_path_factory):
    PHIMOE.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    PHIMOE.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    PHIMOE.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    PHIMOE.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    PHIMOE.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    PHIMOE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    PHIMOE.check_quantized(tmp_path_factory, bits)


def test_save(tmp_path_factory, tmp_path):
    """transformers' names in the state dict; the checkpoint's router and per-expert tensors and only transformers'
    config keys in the files autolm saves."""
    model, saved = PHIMOE.check_saved_files(tmp_path_factory, tmp_path)
    assert "model.layers.0.mlp.router.weight" in model.state_dict() and "lm_head.bias" in model.state_dict()
    assert {"model.layers.1.block_sparse_moe.experts.3.w2.weight",
            "model.layers.1.block_sparse_moe.gate.weight"} <= saved  # fmt: skip


def test_disk_offload(tmp_path_factory, tmp_path):
    PHIMOE.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resizing_keeps_the_heads_bias_as_transformers(tmp_path_factory, tmp_path, mean_resizing):
    """resize_token_embeddings grows the head's bias too (added entries: the old ones' mean, or zeros), as
    transformers does; the resized model saves and loads back in transformers with its bias."""
    import transformers

    directory, _ = PHIMOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.resize_token_embeddings(VOCAB + 8, mean_resizing=mean_resizing)
    theirs.resize_token_embeddings(VOCAB + 8, mean_resizing=mean_resizing)
    torch.testing.assert_close(model.lm_head.bias, theirs.lm_head.bias.detach())
    model.save_pretrained(tmp_path / "resized")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resized")
    assert torch.equal(back.lm_head.bias, model.lm_head.bias) and back.config.vocab_size == VOCAB + 8


# ---- sparsemixer, LongRoPE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsemixer_in_eval_is_transformers(dtype):
    """The router's experts and weights equal transformers' sparsemixer in eval, bit for bit, at thresholds that
    keep one logit, several and all of them (and weights in the logits' dtype)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from autolm.models.phimoe import SparseMixerRouter

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    for eps in (0.0, 0.01, 0.2, 0.9):
        router = SparseMixerRouter(16, 6, eps).to(dtype).eval()
        torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(1))
        ids, weights = router(x)
        want_weights, want_ids = sparsemixer(x @ router.weight.T, jitter_eps=eps, training=False)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights), eps
        assert weights.dtype == dtype
    assert (weights < 0.99).any() and (ids[:, 0] != ids[:, 1]).all()


def test_sparsemixer_in_training_is_transformers():
    """Training: the same Gumbel draws from the same generator state, the same weights and the same gradient
    (transformers' PhimoeMultiplier estimate) on the router's logits."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from autolm.models.phimoe import SparseMixerRouter

    router = SparseMixerRouter(16, 6, 0.2).train()
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ids, weights = router(x)
    (weights * upstream).sum().backward()
    ours = router.weight.grad.clone()
    router.weight.grad = None
    torch.manual_seed(7)
    want_weights, want_ids = sparsemixer(x @ router.weight.T, jitter_eps=0.2, training=True)
    (want_weights * upstream).sum().backward()
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)
    torch.testing.assert_close(ours, router.weight.grad)


def test_generation_crossing_original_length_recomputes_as_transformers(tmp_path_factory):
    """A prompt within original_max_position_embeddings that generates past it: transformers recomputes the whole
    sequence with long_mscale at the crossing; so does autolm (greedy one row, a batch, beam search)."""
    directory, hf = PHIMOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(), dict(num_beams=3)):
        for rows in (ids[:1], ids):
            ours = model.generate(rows, max_new_tokens=12, do_sample=False, **kwargs)
            assert torch.equal(ours, hf.generate(rows, max_new_tokens=12, do_sample=False, **kwargs)), kwargs


def test_training_forward_is_random_and_differentiable(tmp_path_factory):
    """In training the routing draws (and the input jitter): two forwards differ; the router gets a gradient."""
    directory, _ = PHIMOE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory).train()
    ids, mask = padded_batch()
    a = model(ids, attention_mask=mask, labels=ids)
    b = model(ids, attention_mask=mask).logits
    assert not torch.allclose(a.logits, b)
    a.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


# ---- GGUF: llama.cpp's PhiMoeModel converter, emulated -----------------------------------------------------------


def write_phimoe_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' Phi-MoE `hf` (--outtype f32), from the checkpoint files
    as the converter reads them: Phi3MiniModel's metadata (the original length, the rotary dimensions, the RMS
    epsilon key, the window or 0) plus the expert counts, LongRoPE's attention factor from the lengths and its
    factors as rope_factors_{long,short}; each layer's w1/w3/w2 stacked into ffn_{gate,up,down}_exps, the rest by
    gguf-py's name map; a plain vocabulary."""
    import gguf
    from safetensors.torch import load_file

    c = hf.config
    rope = c.rope_parameters
    original = rope["original_max_position_embeddings"]
    w = gguf.GGUFWriter(path, "phimoe")
    w.add_context_length(c.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_sliding_window(c.sliding_window or 0)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_count(c.num_local_experts)
    scale = c.max_position_embeddings / original
    w.add_rope_scaling_attn_factors(
        math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
    )
    add_toy_vocab(w)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHIMOE, c.num_hidden_layers)
    w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    tensors = load_file(f"{hf.name_or_path}/model.safetensors")
    for name, t in stacked_experts(tensors, ".experts.", c.num_local_experts):
        base, kind = name.rsplit(".", 1)
        w.add_tensor(f"{names.get_name(base)}.{kind}", np.ascontiguousarray(t.float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf(tmp_path_factory, tmp_path):
    """The converter's file loads as PhimoeForCausalLM with transformers' logits (LongRoPE from its factors and
    attention factor, the biases, the experts); int8 from it quantizes the experts."""
    _, hf = PLAIN.checkpoint(tmp_path_factory)
    write_phimoe_gguf(hf, str(tmp_path / "model.gguf"))
    model = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert type(model).__name__ == "PhimoeForCausalLM"
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
        theirs = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits[real]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    quant = autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", quantization="int8")
    assert type(quant.model.layers[0].mlp.experts).__name__ == "Int8Experts"


def test_gguf_out_refuses_what_the_file_cannot_hold(tmp_path_factory, tmp_path, byte_tokenizer):
    """mscales other than the converter's attention factor, another routing threshold, or a model without the
    biases llama.cpp's phimoe requires: refused, naming them, and no file."""
    from autolm.gguf_writer import save_gguf

    directory, _ = PLAIN.checkpoint(tmp_path_factory)
    unbiased = Family("PhimoeConfig", dict(PLAIN.kwargs, attention_bias=False, lm_head_bias=False))
    for source, change, match in (
        (directory, dict(rope_parameters=longrope(1.1, 1.3)), "short_mscale"),
        (directory, dict(router_jitter_noise=0.2), "router_jitter_noise"),
        (unbiased.checkpoint(tmp_path_factory)[0], {}, "attention_bias.*lm_head_bias"),
    ):
        model = autolm.AutoModelForCausalLM.from_pretrained(source, **change)
        with pytest.raises(autolm.ConfigError, match=match):
            save_gguf(model, byte_tokenizer, str(tmp_path / "no.gguf"), "f32")
        assert not (tmp_path / "no.gguf").exists()


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    """Phi-3.5-MoE-instruct's chat template is Phi-3.5-mini-instruct's."""
    long = Family(PHIMOE.config_cls, dict(PHIMOE.kwargs, max_position_embeddings=2048), lora_targets=TARGETS)
    check_cli(long, "phi-3.5-mini-instruct.jinja", tmp_path_factory, tmp_path, "PhimoeForCausalLM (phimoe)")


def test_phi35_moe_config_spelling():
    """Phi-3.5-MoE's config.json as shipped (transformers 4's spelling, LongRoPE in rope_scaling, the original
    length top-level too) reads as transformers reads it."""
    import transformers

    from autolm.models.phimoe import PhimoeConfig

    d = dict(SIZES, model_type="phimoe", rope_theta=10000.0, original_max_position_embeddings=8,
             rope_scaling={"type": "longrope", **{k: v for k, v in longrope(1.2, 1.2).items() if k != "rope_type"}})  # fmt: skip
    d["rope_scaling"].pop("rope_theta")
    ours = PhimoeConfig.from_dict(d)
    theirs = transformers.PhimoeConfig.from_dict(d)
    assert ours.rope_parameters["rope_type"] == "longrope"
    for k in ("rope_theta", "original_max_position_embeddings", "short_mscale", "long_mscale", "long_factor"):
        assert ours.rope_parameters[k] == theirs.rope_parameters[k], k


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (dict(num_experts_per_tok=1), "num_experts_per_tok must be 2"),
        (dict(num_local_experts=1, num_experts_per_tok=1), "num_local_experts"),
        (dict(router_jitter_noise=-0.1), "router_jitter_noise"),
        (dict(input_jitter_noise="0.1"), "input_jitter_noise"),
        (dict(attention_bias="yes"), "attention_bias"),
        (dict(lm_head_bias=1), "lm_head_bias"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
            "'default' or 'longrope'",
        ),
        (
            dict(rope_parameters={**longrope(1.0, 1.0), "short_factor": [1.0] * 3}),
            "short_factor must be a list of 8",
        ),
        (dict(rope_parameters={**longrope(1.0, 1.0), "long_mscale": None}), "long_mscale"),
        (
            dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        ),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.phimoe import PhimoeConfig

    with pytest.raises(autolm.ConfigError, match=match):
        PhimoeConfig(**{**dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2), **bad})
