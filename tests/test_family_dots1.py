"""dots.llm1 against transformers and peft: Qwen 3's attention (per-head q/k norms, here with q/k/v/o biases),
GQA, windows on the layers from max_window_layers on; a dense first layer then two mixture layers of 8 experts in 2
groups (each token's experts from the 1 best group; sigmoid scores steered by a random e_score_correction_bias,
renormalised, scaled by routed_scaling_factor) plus 2 shared experts; the checkpoint as transformers writes it (one
tensor per expert). The standard battery, GGUF as llama.cpp's Dots1Model converter writes it (in, and out of
autolm) of a checkpoint llama.cpp's dots1 runs (no GQA, biases, groups or windows; the others refused), and the CLI
(dots.llm1's chat template is not among the test data: ChatML stands in)."""

from __future__ import annotations

import json

import pytest
from chat_checks import check_cli
from gguf_mimic import add_text_model
from test_compiled_step import compiled_home, home  # noqa: F401
from test_family_glm4_moe import (
    RoutedFamily,
    byte_tokenizer,  # noqa: F401
    check_gguf_in,
    check_gguf_out_refuses,
    check_layers_and_routing,
    check_saved,
    write_tensors,
)

import autolm

SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # peft has no default for dots1
DOTS = RoutedFamily("Dots1Config", dict(SIZES, n_group=2, topk_group=1, attention_bias=True, sliding_window=4,
                                         max_window_layers=1), lora_targets=TARGETS)  # fmt: skip
# what llama.cpp's dots1 runs (dots.llm1's shape): no groups, no biases, no windows, no GQA (its k and v are as wide
# as q); config.json's scoring_func "sigmoid" (not a field of transformers' config) gives the converter the gating
# function, which llama.cpp's graph needs
PLAIN = RoutedFamily("Dots1Config", dict(SIZES, sliding_window=None, num_key_value_heads=4, scoring_func="sigmoid"),
                      lora_targets=TARGETS)  # fmt: skip


def test_logits(tmp_path_factory):
    DOTS.check_logits(tmp_path_factory)


def test_generate(tmp_path_factory):
    DOTS.check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DOTS.check_bf16(tmp_path_factory)


def test_one_token_step(tmp_path_factory):
    DOTS.check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory, home):  # noqa: F811
    DOTS.check_compiled_step(tmp_path_factory, home)


def test_lora(tmp_path_factory, tmp_path):
    DOTS.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    DOTS.check_quantized(tmp_path_factory, bits)


def test_disk_offload(tmp_path_factory, tmp_path):
    DOTS.check_disk_offload(tmp_path_factory, tmp_path)


def test_layers_and_routing(tmp_path_factory):
    check_layers_and_routing(DOTS, tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(DOTS.checkpoint(tmp_path_factory)[0])
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 4, 4]


def test_save(tmp_path_factory, tmp_path):
    check_saved(DOTS, tmp_path_factory, tmp_path)


# ---- GGUF: llama.cpp's Dots1Model converter, emulated -----------------------------------------------------------


# config.json's scoring_func -> gguf.ExpertGatingFuncType
GATING = {"sigmoid": "SIGMOID", "softmax": "SOFTMAX"}


def write_dots1_gguf(hf, path: str) -> None:
    """The GGUF llama.cpp's converter makes of transformers' dots.llm1 `hf` (--outtype f32): TextModel's keys (the
    expert counts and groups, the gating function where config.json has scoring_func, the head size only where it
    has head_dim), Qwen2MoeModel's expert length, then the leading dense layers, shared experts,
    routed_scaling_factor and norm_topk_prob as expert_weights_scale / _norm; tensors as GLM-4.5's converter writes
    them."""
    import gguf

    c, hp = hf.config, json.load(open(f"{hf.name_or_path}/config.json"))
    w = gguf.GGUFWriter(path, "dots1")
    add_text_model(w, c)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(hp["n_group"])
    w.add_expert_group_used_count(hp["topk_group"])
    if hp.get("scoring_func") in GATING:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[GATING[hp["scoring_func"]]])
    if "head_dim" in hp:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(c.norm_topk_prob)
    write_tensors(w, hf, gguf.MODEL_ARCH.DOTS1, c.num_hidden_layers)


def test_gguf(tmp_path_factory, tmp_path):
    model = check_gguf_in(PLAIN, write_dots1_gguf, tmp_path_factory, tmp_path, "Dots1ForCausalLM")
    assert model.config.n_group == 1 and model.config.norm_topk_prob


@pytest.mark.parametrize(
    ("family", "match"),
    [
        (RoutedFamily("Dots1Config", dict(DOTS.kwargs, num_key_value_heads=4)), "attention_bias.*n_group"),
        (RoutedFamily("Dots1Config", dict(SIZES, sliding_window=None)), "num_key_value_heads"),
        (RoutedFamily("Dots1Config", dict(PLAIN.kwargs, tie_word_embeddings=True)), "tie_word_embeddings"),
    ],
    ids=["bias-groups", "gqa", "tied"],
)  # fmt: skip
def test_gguf_out_refuses(family, match, tmp_path_factory, tmp_path, byte_tokenizer):  # noqa: F811
    """Biases (llama.cpp's dots1 loads no attn_output.bias), groups, GQA (its k and v are as wide as q: such a file
    does not load there), a tied head (it requires output.weight): refused, naming the fields, no file (a window
    alone is written with a warning: gguf_plan's rule for formats without one)."""
    check_gguf_out_refuses(family, tmp_path_factory, tmp_path, byte_tokenizer, f"'dots1' model.*{match}")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(SIZES, sliding_window=None), "num_key_value_heads"),
        (dict(PLAIN.kwargs, scoring_func=None), "gating"),
    ],
    ids=["gqa", "no-gating"],
)
def test_gguf_in_refuses_what_llama_cpp_cannot_run(kwargs, match, tmp_path_factory, tmp_path):
    """The converter's file of a GQA checkpoint (llama.cpp's dots1 does not load it) or of a config.json without
    scoring_func (no expert_gating_func: llama.cpp's graph aborts): a ConfigError naming the key."""
    _, hf = RoutedFamily("Dots1Config", kwargs).checkpoint(tmp_path_factory)
    write_dots1_gguf(hf, str(tmp_path / "model.gguf"))
    with pytest.raises(autolm.ConfigError, match=match):
        autolm.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")


# ---- CLI, config -------------------------------------------------------------------------------------------------


def test_cli(tmp_path_factory, tmp_path):
    long = RoutedFamily(
        DOTS.config_cls, dict(DOTS.kwargs, max_position_embeddings=2048), lora_targets=["q_proj"]
    )
    check_cli(long, "qwen2-moe-chatml.jinja", tmp_path_factory, tmp_path, "Dots1ForCausalLM (dots1)")


def test_default_config_is_transformers():
    """Dots1Config holds transformers' defaults (with the expert counts, which have none); initializer_range, kept
    only where given, aside."""
    import transformers

    from autolm.models.dots1 import Dots1Config

    counts = dict(n_routed_experts=128, n_shared_experts=2, num_experts_per_tok=6)
    theirs = json.loads(transformers.Dots1Config(**counts).to_json_string())
    for key in ("transformers_version", "initializer_range"):
        theirs.pop(key)
    assert Dots1Config(**counts).to_dict() == theirs
    with pytest.raises(autolm.ConfigError, match="n_routed_experts"):
        Dots1Config()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(num_experts_per_tok=None), "num_experts_per_tok"),
        (dict(n_group=3), "n_group"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
        (dict(routed_scaling_factor="2"), "routed_scaling_factor"),
        (dict(norm_topk_prob=1), "norm_topk_prob"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(max_window_layers=-1), "max_window_layers"),
    ],
)
def test_config_errors_name_the_key(bad, match):
    from autolm.models.dots1 import Dots1Config

    with pytest.raises(autolm.ConfigError, match=match):
        Dots1Config(**{"n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, **bad})
