"""Beam search with generate(cache_implementation="quantized"): the beams' reordering of the residual and the
quantized tokens as transformers' QuantizedLayer does it (the quantized ones when next dequantized), against
transformers with its real backends (optimum-quanto, hqq: test-only oracles, skipped where not installed)."""

import importlib.util

import pytest
import torch

import autolm
from autolm.errors import GenerationError
from autolm.nn.quantized_cache import QuantizedCache

NAME = "llama_gqa_llama3_sharded"  # 2 layers, 2 KV heads of 24
IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7, 8], [0, 0, 1, 40, 41, 12, 3, 9]])  # the second left-padded
_MODULE = {"quanto": "optimum.quanto", "hqq": "hqq"}


def _needs(backend: str) -> None:
    module = _MODULE.get(backend)
    if module and (
        importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None
    ):
        pytest.skip(f"{module} (the {backend} backend transformers calls) is not installed")


@pytest.fixture(scope="module")
def models(checkpoint):
    directory, ref = checkpoint(NAME)
    return ref, autolm.AutoModelForCausalLM.from_pretrained(directory)


CASES = [  # backend, nbits, axis (keys and values), q_group_size, prompts
    # groups within a token: a left-padded batch of 2 (see test_quantized_cache for why only there)
    ("quanto", 4, 0, 8, 2),
    ("quanto", 2, 0, 8, 2),
    ("hqq", 4, 1, 8, 2),
    ("hqq", 2, 1, 8, 2),
    ("fp8", None, None, None, 2),
    ("quanto", 4, -1, 4, 1),  # groups across tokens and beams (KIVI's keys), one prompt
]


@pytest.mark.parametrize("backend,nbits,axis,group,prompts", CASES)
def test_beam_search_matches_transformers(models, backend, nbits, axis, group, prompts):
    """num_beams 3, residual_length 4: 10 new tokens requantize twice, with beams reordered in between (their
    quantized tokens then dequantized in the new order). Tokens, sequence scores, per-step scores and beam indices
    as transformers'; not those of beam search with the plain cache."""
    _needs(backend)
    ref, got = models
    ids = IDS[:prompts]
    mask = (ids != 0).long()
    config = {"backend": backend}
    if backend != "fp8":
        config.update(nbits=nbits, axis_key=axis, axis_value=axis, q_group_size=group, residual_length=4)
    kw = dict(attention_mask=mask, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False,
              pad_token_id=0, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    want = ref.generate(ids, cache_implementation="quantized", cache_config=config, **kw)
    out = got.generate(ids, cache_implementation="quantized", cache_config=config, **kw)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(out.sequences_scores, want.sequences_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
    assert torch.equal(out.beam_indices, want.beam_indices)
    assert isinstance(out.past_key_values, QuantizedCache)
    plain = got.generate(ids, **kw)
    assert not torch.allclose(
        out.sequences_scores, plain.sequences_scores, atol=1e-3
    )  # the quantization shows


@pytest.mark.parametrize(
    "backend,nbits,axis,group",
    [
        ("quanto", 4, 0, 4),
        ("quanto", 2, -1, 2),
        ("hqq", 4, 0, 4),
        ("hqq", 2, 1, 4),
        ("fp8", None, None, None),
    ],
)
def test_updates_and_reorders_equal_transformers_layer(models, backend, nbits, axis, group):
    """The same keys and values, and the same beam reorders (several in a row, across requantizations), into
    transformers' QuantizedCache and autolm's: every update returns the same tensors bit for bit. Groups across
    tokens and beams too (quanto axis -1, hqq axis 0): given the same inputs, the deferred reorder is exact."""
    _needs(backend)
    import transformers

    ref, _ = models
    settings = {} if backend == "fp8" else dict(nbits=nbits, axis_key=axis, axis_value=axis, q_group_size=group,
                                                  residual_length=3)  # fmt: skip
    theirs = transformers.QuantizedCache(backend, ref.config, **settings)
    mine = QuantizedCache(backend, **settings)
    g = torch.Generator().manual_seed(0)
    n = 5
    for step, width in enumerate([5, 1, 1, 2, 1, 1, 1, 1, 1]):
        k, v = torch.randn(3, 2, width, 24, generator=g), torch.randn(3, 2, width, 24, generator=g)
        a = theirs.update(k, v, 0)
        b = mine.update(0, k, v, torch.arange(n - width, n), n)
        for x, y in zip(a, b):
            assert torch.equal(x, y), step
        rows = torch.randint(0, 3, (3,), generator=g)
        theirs.reorder_cache(rows)
        mine.reorder(rows)
        if step % 3 == 1:  # two reorders before the next update
            theirs.reorder_cache(rows.flip(0))
            mine.reorder(rows.flip(0))
        n += 1


def test_reorder_defers_the_quantized_tokens():
    """After reorder, every token (quantized, residual) reads in the new row order; the quantized codes are kept
    as they were until the next requantization (no second rounding), the order then baked in."""
    cache = QuantizedCache("quanto", nbits=2, q_group_size=8, residual_length=3)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 5, 24, generator=g), torch.randn(3, 2, 5, 24, generator=g)
    cache.update(0, k, v, torch.arange(5), 5)
    cache.update(0, k[:, :, :1] + 1, v[:, :, :1] + 1, torch.arange(5, 6), 6)
    cache.length = 6
    before = cache.layers[0]
    codes = cache.quantized[0][0].codes.clone()
    rows = torch.tensor([2, 2, 0])
    cache.reorder(rows)
    cache.reorder(torch.tensor([1, 0, 2]))  # composed: rows [2, 2, 0][[1, 0, 2]]
    after, order = cache.layers[0], rows[[1, 0, 2]]
    torch.testing.assert_close(after.keys, before.keys[order], atol=0, rtol=0)
    torch.testing.assert_close(after.values, before.values[order], atol=0, rtol=0)
    assert torch.equal(cache.quantized[0][0].codes, codes)
    new = torch.randn(3, 2, 2, 24, generator=g)
    keys, _ = cache.update(0, new, new, torch.arange(6, 8), 8)  # residual 1 + 2 >= 3: requantized
    torch.testing.assert_close(keys, torch.cat([before.keys[order], new], 2), atol=0, rtol=0)
    assert 0 not in cache.pending and 0 not in cache.residual


def test_speculation_still_refused(models):
    """transformers cannot crop a quantized cache (its layers crop only their residual, the quantized tokens and the
    length stay; prompt lookup fails in crop with an IndexError on the emptied residual), so prompt lookup / assisted
    decoding with one is refused by name."""
    _, got = models
    kw = dict(max_new_tokens=4, cache_implementation="quantized")
    with pytest.raises(GenerationError, match="speculative decoding"):
        got.generate(IDS[:1], prompt_lookup_num_tokens=2, **kw)
    with pytest.raises(GenerationError, match="speculative decoding"):
        got.generate(IDS[:1], assistant_model=got, **kw)
