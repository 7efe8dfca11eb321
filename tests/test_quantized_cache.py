"""generate(cache_implementation="quantized", cache_config=...): keys and values quantized as transformers' quantized
cache does with its real backends (optimum-quanto, hqq: test-only oracles, skipped where not installed), the newest
tokens kept full-precision and everything requantized each time the residual fills."""

import importlib.util

import pytest
import torch

import autolm
from autolm.errors import GenerationError
from autolm.nn.kv_quant import dequantize, quantize
from autolm.nn.quantized_cache import QuantizedCache

NAME = "llama_gqa_llama3_sharded"  # 2 layers, 2 KV heads of 24
IDS = torch.tensor([[1, 17, 33, 5, 99, 42, 7]])
_MODULE = {"quanto": "optimum.quanto", "hqq": "hqq"}


def _needs(backend: str) -> None:
    if importlib.util.find_spec(_MODULE[backend].split(".")[0]) is None or (
        backend == "quanto" and importlib.util.find_spec("optimum.quanto") is None
    ):
        pytest.skip(f"{_MODULE[backend]} (the {backend} backend transformers calls) is not installed")


@pytest.fixture(scope="module")
def models(checkpoint):
    directory, ref = checkpoint(NAME)
    return ref, autolm.AutoModelForCausalLM.from_pretrained(directory)


CASES = [  # backend, nbits, axis, q_group_size, batch
    ("quanto", 4, 0, 8, False),
    ("quanto", 2, 0, 8, True),
    ("quanto", 2, -1, 4, False),  # per-channel groups over 4 rows (KIVI's keys)
    ("hqq", 4, 0, 8, False),
    ("hqq", 2, 0, 8, False),
    ("hqq", 2, 1, 8, True),
]


@pytest.mark.parametrize("backend,nbits,axis,group,batch", CASES)
def test_generate_matches_transformers(models, backend, nbits, axis, group, batch):
    """Greedy tokens, scores and the final cache (its residual and its dequantized tokens) as transformers' with the
    real backend; residual_length 2 requantizes every second new token (5 times in 11 decode steps). A left-padded
    batch only where groups stay within a token: the padding's keys (whatever each library computes for a query
    that sees no real token) would enter other groups' ranges."""
    _needs(backend)
    ref, got = models
    ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7, 8]] + ([[0, 0, 1, 40, 41, 12, 3, 9]] if batch else []))
    mask = (ids != 0).long()
    config = {"backend": backend, "nbits": nbits, "axis_key": axis, "axis_value": axis, "q_group_size": group,
              "residual_length": 2}  # fmt: skip
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True, cache_implementation="quantized", cache_config=config)  # fmt: skip
    want, out = ref.generate(ids, **kw), got.generate(ids, **kw)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
    plain = got(
        out.sequences, attention_mask=torch.cat([mask, torch.ones_like(out.sequences[:, 8:])], 1)
    ).logits
    assert not torch.allclose(out.scores[-1], plain[:, -2], atol=1e-2)  # the quantization shows
    cache = out.past_key_values
    assert (
        isinstance(cache, QuantizedCache) and cache.get_seq_length() == want.past_key_values.get_seq_length()
    )
    for i, layer in enumerate(want.past_key_values.layers):
        assert (
            cache.residual[i][0].shape[-2] == layer.keys.shape[-2] == 1
        )  # 11 decode steps: 5 requantizations
        for mine, theirs in zip(cache.quantized[i], (layer._quantized_keys, layer._quantized_values)):
            a, b = dequantize(mine), layer._dequantize(theirs)
            real = torch.cat(
                [mask, torch.ones(len(ids), a.shape[2] - 8, dtype=torch.long)], 1
            ).bool()  # not padding
            torch.testing.assert_close(a.transpose(1, 2)[real], b.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_fp8_matches_transformers(models, rows):
    """backend "fp8" (pure torch, no oracle to install): greedy tokens and scores as transformers', and the final
    cache's float8 codes (1 byte a value) bit for bit and per-tensor scales. Two rows without padding (the scale
    spans the batch, and a padded row's keys after the first layer are each library's own)."""
    ref, got = models
    ids = torch.tensor([[1, 17, 33, 5, 99, 42, 7, 8], [1, 40, 41, 12, 3, 9, 60, 2]][:rows])
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
              cache_implementation="quantized", cache_config={"backend": "fp8"})  # fmt: skip
    want, out = ref.generate(ids, **kw), got.generate(ids, **kw)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
    plain = got(out.sequences).logits
    assert not torch.allclose(out.scores[-1], plain[:, -2], atol=1e-3)  # the quantization shows
    cache = out.past_key_values
    assert not cache.residual and cache.get_seq_length() == want.past_key_values.get_seq_length()
    for i, layer in enumerate(want.past_key_values.layers):
        for mine, (codes, scale) in zip(cache.quantized[i], (layer._quantized_keys, layer._quantized_values)):
            assert mine.codes.dtype == torch.float8_e4m3fn and mine.codes.element_size() == 1
            assert torch.equal(mine.codes.view(torch.uint8), codes.view(torch.uint8))
            # the scale: the keys' largest magnitude, to the forward's float rounding
            torch.testing.assert_close(mine.scale, scale, atol=0, rtol=1e-6)
            torch.testing.assert_close(dequantize(mine), layer._dequantize((codes, scale)), atol=0, rtol=1e-6)
    assert cache.nbytes == sum(q.codes.numel() + 4 for pair in cache.quantized.values() for q in pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_updates_equal_transformers_layer(dtype):
    """Update by update, the keys and values returned equal transformers' Fp8QuantizedLayer's bit for bit: the prompt
    unquantized, then every token dequantized in the prompt's dtype at the prompt's scale (values past its range
    saturate), an all-zero prompt's scale float32's tiny. (transformers' bfloat16 forward rounds otherwise than
    autolm's, so whole generations are compared in float32 above.)"""
    from transformers.cache_utils import Fp8QuantizedLayer

    g = torch.Generator().manual_seed(0)
    for first in (torch.randn(2, 2, 5, 8, generator=g), torch.zeros(2, 2, 5, 8)):
        theirs, ours = Fp8QuantizedLayer(), QuantizedCache("fp8")
        steps = [first, torch.randn(2, 2, 1, 8, generator=g) * 10, torch.randn(2, 2, 2, 8, generator=g)]
        for t in steps:
            k, v = t.to(dtype), (t * 0.5 - 0.1).to(dtype)
            want = theirs.update(k, v)
            got = ours.update(0, k, v, torch.arange(1), 0)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype == dtype and torch.equal(a, b)
        assert all(q.nbytes == q.codes.numel() + 4 for q in ours.quantized[0])


def test_memory_is_packed(models):
    """The cache holds packed codes (2 bits: 4 to a byte) plus a float32 scale and shift per group of 48, and the
    residual's 3 tokens in full precision: under a quarter of the float32 keys and values here."""
    _, got = models
    cfg = {"nbits": 2, "q_group_size": 48, "residual_length": 4}
    out = got.generate(IDS, max_new_tokens=24, do_sample=False, cache_implementation="quantized", cache_config=cfg,
                       return_dict_in_generate=True)  # fmt: skip
    cache = out.past_key_values
    T = IDS.shape[1] + 23
    full = 2 * 2 * (2 * T * 24) * 4  # layers, keys and values, (n_kv, T, hd) float32
    packed = [q for pair in cache.quantized.values() for q in pair]
    assert len(packed) == 4 and all(q.codes.dtype == torch.uint8 for q in packed)
    assert all(
        q.codes.numel() == 2 * (T - 3) * 24 // 4 and q.nbytes == q.codes.numel() + (T - 3) * 8 for q in packed
    )
    assert all(r.shape[-2] == 3 for pair in cache.residual.values() for r in pair)
    assert cache.nbytes < full / 4
    given = autolm.QuantizedCache("quanto", got.config, **cfg)  # transformers' way to hand one to generate()
    assert torch.equal(
        got.generate(IDS, max_new_tokens=24, do_sample=False, past_key_values=given), out.sequences
    )


def _quanto(t, bits, axis, group):
    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

    qtype = qint4 if bits == 4 else qint2
    scale, shift = MaxOptimizer()(t, qtype, axis, group)
    return quantize_weight(t, qtype, axis, scale, shift, group).dequantize()


def _hqq(t, bits, axis, group):
    from hqq.core.quantize import Quantizer

    q, meta = Quantizer.quantize(
        t, axis=axis, device=t.device, compute_dtype=t.dtype, nbits=bits, group_size=group
    )
    meta["compute_dtype"] = t.dtype
    Quantizer.cuda(q, meta=meta, device=t.device)
    return Quantizer.dequantize(q, meta)


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_equals_backend(backend, dtype):
    """Tensor by tensor, the dequantized values equal the backend's bit for bit (one group only, constant groups,
    both axes, all the nbits transformers allows)."""
    _needs(backend)
    g = torch.Generator().manual_seed(0)
    shapes = [(1, 2, 7, 24), (2, 2, 8, 24), (1, 1, 1, 8)]
    if backend == "quanto":
        cases = [(b, a, s) for b in (2, 4) for a, s in ((0, 8), (0, 24), (-1, 2))]
        oracle = _quanto
    else:
        cases = [(b, 0, 8) for b in (1, 2, 3, 4, 8)] + [(4, 1, 8)]
        oracle = _hqq
    for shape in shapes:
        t = torch.randn(shape, generator=g).to(dtype)
        t[..., :8] = t[..., :1]  # a constant group
        for bits, axis, group in cases:
            if backend == "hqq" and axis == 1 and t.numel() // group % (8 // bits):
                continue  # hqq's packing fails (rows not a multiple of its codes per byte); autolm's does not
            try:
                want = oracle(t, bits, axis, group)
            except (ValueError, AssertionError):  # groups that do not tile the tensor: refused by both
                with pytest.raises(GenerationError, match="q_group_size"):
                    quantize(t, backend, bits, axis, group, "keys")
                continue
            got = dequantize(quantize(t, backend, bits, axis, group, "keys"))
            assert torch.equal(got, want), (shape, bits, axis, group)


@pytest.mark.parametrize(
    "config,field",
    [
        ({"backend": "fp4"}, "backend"),
        ({"backend": "fp8", "residual_length": 4}, "residual_length"),  # fp8 takes no group-wise setting
        ({"backend": "quanto", "nbits": 3}, "nbits"),
        ({"backend": "hqq", "axis_key": -1}, "axis_key"),
        ({"axis_value": 2}, "axis_value"),
        ({"q_group_size": 0}, "q_group_size"),
        ({"residual_length": -1}, "residual_length"),
        ({"nbit": 4}, "nbit"),
        (
            {"q_group_size": 5},
            "q_group_size",
        ),  # 5 does not divide the 2 * 7 * 24 values of a row: at the first forward
    ],
)
def test_errors_name_the_field(models, config, field):
    _, got = models
    with pytest.raises(GenerationError, match=field):
        got.generate(IDS, max_new_tokens=2, cache_implementation="quantized", cache_config=config)


def test_refused_where_autolm_does_not_run_it(models, checkpoint):
    """Models with other than full-attention layers (as transformers refuses them), a cache given (beam search runs:
    test_quantized_cache_beams.py)."""
    _, got = models
    kw = dict(max_new_tokens=2, cache_implementation="quantized")
    with pytest.raises(GenerationError, match="past_key_values"):
        got.generate(IDS, past_key_values=autolm.DynamicCache(), **kw)
    sliding = autolm.AutoModelForCausalLM.from_pretrained(checkpoint("mistral_sliding")[0])
    with pytest.raises(GenerationError, match="sliding_attention"):
        sliding.generate(IDS, **kw)
