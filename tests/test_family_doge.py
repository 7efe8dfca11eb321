"""Doge (SmallDoge) against transformers and peft: attention under the dynamic mask (dt from the values, the top
keep_window_size keys per query, keep_window_size below the prompts' lengths so the top-k selects), q/k norms, the
learned residual scales; a cross-domain mixture-of-experts checkpoint (product-key experts over a non-square
num_experts, biases, norm_topk_prob, a tied head, MHA, transformers' batch-mixing router split); a sliding-window one.
Left-padded batches throughout. The standard battery, config.json in transformers' keys, errors by field name.
llama.cpp has no Doge architecture: no GGUF."""

from __future__ import annotations

import pytest
import torch
from conftest import padded_batch
from family_checks import Family, check_config_defaults

import autolm
from autolm.errors import ConfigError
from autolm.models.doge import DogeConfig

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
# GQA, every query keeping its 5 keys of largest dt (the prompts are 4 to 13 tokens)
DENSE = Family(
    "DogeConfig", dict(SMALL, num_key_value_heads=2, keep_window_size=5),
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "dt_proj", "gate_proj", "up_proj", "down_proj"],
)  # fmt: skip
# the mixture: 20 experts (4 x 4 product keys), 3 per token, biases, a tied head, MHA, another RoPE base
MOE = Family(
    "DogeConfig",
    dict(SMALL, num_key_value_heads=4, keep_window_size=6, is_moe=True, num_experts=20, num_experts_per_tok=3,
         attention_bias=True, mlp_bias=True, norm_topk_prob=True, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
)  # fmt: skip
# a sliding window of 5 with 3 keys kept of it, GeLU
WINDOW = Family(
    "DogeConfig", dict(SMALL, num_key_value_heads=2, keep_window_size=3, sliding_window=5, hidden_act="gelu")
)
FAMILIES = {"dense": DENSE, "moe": MOE, "window": WINDOW}


@pytest.mark.parametrize("name", FAMILIES)
def test_logits(tmp_path_factory, name):
    FAMILIES[name].check_logits(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate(tmp_path_factory, name):
    FAMILIES[name].check_generate(tmp_path_factory)


def test_bf16(tmp_path_factory):
    DENSE.check_bf16(tmp_path_factory)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_step(tmp_path_factory, name):
    FAMILIES[name].check_one_token_step(tmp_path_factory)


def test_compiled_step(tmp_path_factory):
    """The per-layer compiled graphs do not serve Doge (the top-k over the cache's length, see keep_top): the
    torch.compile'd step of the general forward gives the eager tokens and logits."""
    from test_decode_steps import greedy_steps

    directory, _ = DENSE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not autolm.step.compilable(model) and autolm.step.compiled_plan(model) is None
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    tokens, logits = greedy_steps(model, ids, 6, "forward")
    autolm.step.compile_decode(model, backend="eager")
    got_tokens, got = greedy_steps(model, ids, 6, "auto")
    assert got_tokens == tokens
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=1e-4)


def test_hidden_states(tmp_path_factory):
    MOE.check_hidden_states(tmp_path_factory)


def test_lora(tmp_path_factory, tmp_path):
    DENSE.check_lora(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized(tmp_path_factory, bits):
    """int8 / int4 with the rest in fp32 stay close to the fp32 model (or no further than the fp32 model with the
    dequantized weights). Not the battery's check, whose quantized model computes in bf16: dt rounded to bf16 ties
    many keys (dt is near 1 in a random model), so the top-k keeps others than fp32's and the logits part further
    than the quantization does."""
    directory, _ = DENSE.checkpoint(tmp_path_factory)
    ids, mask = padded_batch()
    real = mask.bool()
    full = autolm.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    quant = autolm.AutoModelForCausalLM.from_pretrained(directory, quantization=bits, dtype=torch.float32)
    assert type(quant.model.layers[0].self_attn.dt_proj).__name__.startswith("Int")
    with torch.no_grad():
        truth = full(ids, attention_mask=mask).logits[real]
        err = (quant(ids, attention_mask=mask).logits[real] - truth).abs().mean()
        for name, m in quant.named_modules():
            if hasattr(m, "dequantize"):
                full.get_submodule(name).weight = torch.nn.Parameter(m.dequantize())
        ideal = (full(ids, attention_mask=mask).logits[real] - truth).abs().mean()
    assert err <= (0.08 if bits == "int8" else 0.25) * truth.abs().mean() or err <= 1.1 * ideal, (err, ideal)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_save(tmp_path_factory, tmp_path, name):
    FAMILIES[name].check_save(tmp_path_factory, tmp_path)


def test_disk_offload(tmp_path_factory, tmp_path):
    DENSE.check_disk_offload(tmp_path_factory, tmp_path)


@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_and_config_are_transformers(tmp_path_factory, tmp_path, name):
    """transformers' parameter names and shapes; config.json round-trips with transformers' keys only (tensor
    parallelism: test_distributed's `doge_moe`)."""
    FAMILIES[name].check_names_and_config(tmp_path_factory, tmp_path)


def test_quirks_matter(tmp_path_factory):
    """Each quirk changes the logits: the dynamic mask's top-k (a keep_window_size over the prompt keeps every
    key), dt's bias (A at zero: every dt is 1), the residual scales; and the mixture's router reads other tokens'
    scores (transformers' split): a row alone gives other logits than in the batch."""
    ids, mask = padded_batch()
    directory, _ = DENSE.checkpoint(tmp_path_factory)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    attn = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        changes = [lambda: [setattr(a, "keep_window_size", 64) for a in attn],
                   lambda: [a.A.zero_() for a in attn],
                   lambda: [layer.input_residual.fill_(1.0) for layer in model.model.layers]]  # fmt: skip
        for change in changes:
            change()
            after = model(ids, attention_mask=mask).logits
            assert not torch.allclose(base, after, atol=1e-3)
            base = after
        moe = autolm.AutoModelForCausalLM.from_pretrained(MOE.checkpoint(tmp_path_factory)[0])
        row = moe(ids[:1]).logits[0]
        assert not torch.allclose(moe(ids, attention_mask=mask).logits[0], row, atol=1e-3)


def test_default_config_and_errors():
    """DogeConfig() holds transformers' defaults; bad values raise ConfigError naming the field."""
    check_config_defaults(DogeConfig)
    assert DogeConfig().to_dict().keys() - {"model_type"} <= set(
        __import__("transformers").DogeConfig().to_dict()
    )
    small = dict(hidden_size=64, num_attention_heads=4)
    for change, key in ((dict(keep_window_size=0), "keep_window_size"), (dict(is_moe="yes"), "is_moe"),
                        (dict(hidden_dropout=2), "hidden_dropout"), (dict(num_experts=0), "num_experts"),
                        (dict(is_moe=True, num_experts=20, num_experts_per_tok=17), "num_experts_per_tok"),
                        (dict(hidden_act="nope"), "hidden_act")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            DogeConfig(**{**small, **change})


def test_tensor_parallel_save_gathers_what_it_cut(tmp_path_factory, tmp_path):
    """Under tensor parallelism (2 ranks) the mixture checkpoint's cut parts (A per KV head, the expert embeddings'
    rows, dt_proj and the Linear layers) are saved whole: save_pretrained writes the checkpoint's own tensors."""
    import textwrap

    from safetensors.torch import load_file
    from test_distributed import torchrun

    directory, _ = MOE.checkpoint(tmp_path_factory)
    script = tmp_path / "tp_save.py"
    script.write_text(
        textwrap.dedent("""
        import sys, torch
        import autolm
        from autolm.distributed import exit_all
        torch.set_num_threads(1)
        model = autolm.AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto")
        assert model.model.layers[0].mlp.up_embed.weight.shape[0] == 10  # cut: half the 20 experts
        model.save_pretrained(sys.argv[2])
        exit_all()
    """)
    )
    torchrun(str(script), directory, str(tmp_path / "saved"))
    want = load_file(f"{directory}/model.safetensors")
    got = load_file(tmp_path / "saved" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
