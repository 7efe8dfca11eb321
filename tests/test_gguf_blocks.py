"""GGUF weights kept in llama.cpp's own blocks (quantization="gguf"): every type's blocks dequantize as gguf's
reference code does, every kept layer's matmul equals the dequantized weight's, and a model written in
llama.cpp's exact block layouts (with the gguf package) gives the logits of its dequantized twin."""

from __future__ import annotations

import os
import re
import sys

import gguf
import numpy as np
import pytest
import torch

import autolm
from autolm.kernels import ggml as K
from autolm.kernels import ggml_repack as R
from autolm.kernels import native
from autolm.nn.ggml import GGMLEmbedding, GGMLLinear
from autolm.quant import Int4Linear, memory_report

NO_KERNEL = "autolm's C++ kernel needs AVX2 (or AVX-512 VNNI) and a C++ compiler"

# byte offsets of each type's fp16 fields inside a block (ggml-common.h): random bytes there would be NaN or huge
HALVES = {
    K.Q4_0: [0],
    K.Q4_1: [0, 2],
    K.Q5_0: [0],
    K.Q5_1: [0, 2],
    K.Q8_0: [0],
    K.Q2_K: [80, 82],
    K.Q3_K: [108],
    K.Q4_K: [0, 2],
    K.Q5_K: [0, 2],
    K.Q6_K: [208],
    K.IQ4_NL: [0],
    K.IQ4_XS: [0],
    K.MXFP4: [],  # its scale is a power of two in byte 0 (below)
}
QUANTIZED = sorted(HALVES)


def random_blocks(kind: int, rows: int, cols: int, seed: int = 0, scale: float = 0.05) -> np.ndarray:
    """Random rows of ggml type `kind` (uint8 (rows, bytes per row)) in llama.cpp's block layout."""
    rng = np.random.default_rng(seed)
    if kind in K.FLOAT:
        w = rng.normal(0, scale, (rows, cols)).astype(np.float32)
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType(kind)).view(np.uint8).reshape(rows, -1)
    block, size = K.BLOCKS[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        d = rng.uniform(0.2, 1, (rows, cols // block, 1)) * scale / (16 if block == 256 else 8)
        raw[..., at : at + 2] = d.astype(np.float16).view(np.uint8)
    if kind == K.MXFP4:  # E8M0: 2^(e - 128) per doubled FP4 value (e = 0, 1: denormal halves)
        raw[..., 0] = rng.choice([0, 1, 119, 120, 121, 122], (rows, cols // block))
    return raw.reshape(rows, -1)


def test_type_tables_are_ggufs():
    """autolm's own names and block sizes (read without importing gguf) are the gguf package's."""
    assert set(K.NAMES) == set(K.BLOCKS)
    for kind, name in K.NAMES.items():
        assert gguf.GGMLQuantizationType(kind).name == name
        assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]) == K.BLOCKS[kind]


@pytest.mark.parametrize("kind", QUANTIZED, ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_blocks_dequantize_as_gguf_does(kind):
    raw = random_blocks(kind, 5, 512, seed=kind)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind))
    got = K.dequantize(torch.from_numpy(raw), kind).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", sorted(R.INT4), ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_int4_parts_hold_the_blocks_values_exactly(kind):
    """The int4 types' quants read as 16-bit words into the nibble layout, with their scales: gguf's values."""
    from autolm.kernels.quant import unpack_nibbles

    raw = random_blocks(kind, 6, 1024, seed=kind)
    nibbles, scale, low = R.int4_parts(torch.from_numpy(raw), kind)
    q = unpack_nibbles(nibbles).float().unflatten(-1, (-1, 32))
    w = scale.unsqueeze(-1) * (q - 8 if kind == K.Q4_0 else q) + (0 if low is None else low.unsqueeze(-1))
    np.testing.assert_array_equal(
        w.flatten(1).numpy(), gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind))
    )


@pytest.mark.parametrize("kind", sorted(K.PLANAR), ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_planes_hold_the_blocks_values_exactly(kind):
    raw = torch.from_numpy(random_blocks(kind, 300, 512, seed=kind))  # several chunks of rows
    q, scale, low = R.planar(raw, kind)
    assert q.dtype == torch.int8 and scale.shape == (300, 512 // K.PLANAR[kind])
    assert (low is not None) == (kind in K.LOW)
    assert torch.equal(K.group_weight(q, scale, low), K.dequantize(raw, kind))


def _kept_state(raw: torch.Tensor, kind: int) -> dict[str, torch.Tensor]:
    """The entries of a GGMLLinear keeping `raw` (planes for the PLANAR types)."""
    if kind not in K.PLANAR:
        return {"weight": raw}
    q, scale, low = R.planar(raw, kind)
    return {"weight": q, "scales": scale, **({} if low is None else {"low": low})}


@pytest.mark.parametrize("kind", [*QUANTIZED, K.F16, K.BF16], ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_kept_matmul_equals_the_dequantized_weight(kind, monkeypatch):
    """Eager (tiles of rows dequantized), and the matrix-vector forms compiled graphs run (on the planes: every
    product times its group's scale; on the blocks: per group the integer quants' dot product times the
    group's scale), against x @ dequantize(W).T in float64. (The C++ kernel's int8 activations: below.)"""
    monkeypatch.setattr(native, "computes", lambda kind, columns: False)
    n, k = 70, 512
    raw = torch.from_numpy(random_blocks(kind, n, k, seed=kind + 1))
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(kind))).double()
    bias = torch.randn(n)
    layer = GGMLLinear(k, n, True, kind, torch.float32)
    layer.load_state_dict({**_kept_state(raw, kind), "bias": bias}, assign=True)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 1, k)
        want = (x.double() @ w.T + bias.double()).float()
        tol = dict(rtol=1e-4, atol=1e-4 * want.abs().max().item())
        torch.testing.assert_close(layer(x), want, **tol)
        if rows <= 4:
            torch.testing.assert_close(K._matvec(x, raw, kind, bias), want, **tol)
            if kind in K.PLANAR:
                args = (layer.weight, layer.scales, layer.low, bias)
                torch.testing.assert_close(K._group_matvec(x, *args), want, **tol)
    K._TILE_BYTES, old = 4 * k * 16, K._TILE_BYTES  # several tiles
    try:
        torch.testing.assert_close(layer(x), want, **tol)
    finally:
        K._TILE_BYTES = old
    if layer.scales is None:  # rows in llama.cpp's q/k order (5 heads of 14): outputs in the model's order
        layer.heads = 5
        ordered = K.llama_qk_order(w, 5)
        assert torch.equal(
            ordered[[14, 21, 15]], w[[14, 15, 16]]
        )  # head 1's first rotate-half pair: adjacent
        torch.testing.assert_close(layer.dequantize().double(), ordered)
        torch.testing.assert_close(layer(x), (x.double() @ ordered.T + bias.double()).float(), **tol)
    ids = torch.tensor([[3, 0, 69]])
    emb = GGMLEmbedding(n, k, kind, torch.float32)
    emb.load_state_dict({"blocks": raw}, assign=True)
    torch.testing.assert_close(emb(ids), w[ids[0]].float().unsqueeze(0))


def int8_rows(x: torch.Tensor, columns: int) -> torch.Tensor:
    """x rounded as the C++ kernel quantizes it: per `columns` to int8, scale max |x| / 127 (float32)."""
    blocks = x.float().unflatten(-1, (-1, columns))
    top = blocks.abs().amax(-1, keepdim=True)
    # 127 / top as the kernel divides (torch's scalar / tensor multiplies by a reciprocal: 1 ulp off, which
    # moves values within an ulp of a half to the other integer)
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, 0.0)
    return ((blocks * inv).round().clamp(-127, 127) * (top / 127)).flatten(-2)


def bf16(t):
    return t.bfloat16().double()


@pytest.mark.skipif(not native.available(), reason=NO_KERNEL)
@pytest.mark.parametrize("kind", sorted(native.KINDS), ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_native_kernel_is_the_int8_activation_product(kind):
    """The C++ kernel's types on their blocks by integer dot products: x quantized to int8 per 256 columns
    (K-quants) or 32 (the others), as llama.cpp does, times gguf's dequantized weight, for any number of rows
    (with one row a thread, a few, and in panels, from 4, 8 or 16 rows on: 34 rows, 612 weight rows, neither a
    whole number of panels); bf16 in, bf16 out. Blocks of 32: an odd number of blocks per row, and an even one
    (the nibble kinds' blocks then go two at a time on the one-row path). Where the CPU has AMX, from 16 rows on:
    the weight rounded to bf16 times x rounded to bf16, summed in float32 (34 and 57 rows: a whole pair of
    16-row tiles, a half-empty one, an odd one)."""
    for k in (768,) if native.KINDS[kind][0] == 256 else (800, 832):  # 25 and 26 blocks of 32
        _check_native_kernel(kind, k)


def _check_native_kernel(kind, k):
    columns = native.KINDS[kind][1]
    n = 612  # 38.25 panels of 16, 76.5 of 8
    raw = torch.from_numpy(random_blocks(kind, n, k, seed=kind + 2))
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType(kind))).double()
    layer = GGMLLinear(k, n, True, kind, torch.float32, planes=False)
    bias = torch.randn(n)
    layer.load_state_dict({"weight": raw, "bias": bias}, assign=True)
    g = torch.Generator().manual_seed(kind)
    tiles = native.tile_rows()  # from so many rows on, on AMX's tile unit: bf16 weights and activations
    for shape in ((1, k), (3, 1, k), (2, 17, k), (57, k)):
        x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 4  # uneven columns
        if tiles and x.numel() // k >= tiles:
            want = (bf16(x) @ bf16(w).T + bias.double()).float()
            bound = 0.005  # bf16's rounding of both: ~0.25%
        else:
            want = (int8_rows(x, columns).double() @ w.T + bias.double()).float()
            bound = 0.04  # int8 activations' rounding: ~1% on random blocks (up to 3% on one row)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        exact = x.double() @ w.T + bias.double()
        assert ((layer(x) - exact).norm() / exact.norm()).item() < bound
        # the rows llama.cpp permuted (6 heads of 100 rows): the outputs come in the model's order
        assert torch.equal(
            native.ggml_mm(x, raw, kind, 6), K.llama_qk_order(native.ggml_mm(x, raw, kind), 6, -1)
        )
    xb = torch.randn(4, k, dtype=torch.bfloat16, generator=g)
    got = native.ggml_mm(xb, raw, kind)
    assert got.dtype == torch.bfloat16
    want = int8_rows(xb, columns).double() @ w.T
    torch.testing.assert_close(got.float(), want.float(), rtol=0.01, atol=0.01 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="does not hold"):
        native.ggml_mm(torch.randn(1, 512), raw, kind)


@pytest.mark.skipif(not native.available(), reason=NO_KERNEL)
@pytest.mark.parametrize("kind", sorted(native.KINDS), ids=lambda k: gguf.GGMLQuantizationType(k).name)
def test_each_row_takes_its_own_experts_blocks(kind):
    """Stacked experts (E, N, bytes), as llama.cpp's converter stacks them: ggml_mm_id gives each row of x its own
    expert's product, the one ggml_mm gives that row with that expert's rows; the experts' projection without the
    kernel (autograd) is the dequantized product."""
    block = native.KINDS[kind][0]
    for k in (512,) if block == 256 else (96, 128):  # blocks of 32: odd and even numbers of them per row
        _check_experts(kind, k)


def _check_experts(kind, k):
    from autolm.kernels.experts import ggml_expert_linear

    E, n = 3, 40
    raw = torch.from_numpy(random_blocks(kind, E * n, k, seed=kind)).view(E, n, -1)
    g = torch.Generator().manual_seed(kind)
    x, ids = torch.randn(5, k, generator=g), torch.tensor([2, 0, 2, 1, 0])
    got = native.ggml_mm_id(x, raw, ids, kind)
    assert torch.equal(
        got, torch.cat([native.ggml_mm(x[r : r + 1], raw[e], kind) for r, e in enumerate(ids)])
    )
    assert torch.equal(ggml_expert_linear(x, raw, kind, ids), got)
    assert torch.equal(ggml_expert_linear(x[:2], raw, kind, 1), native.ggml_mm(x[:2], raw[1], kind))
    w = K.dequantize(raw.view(E * n, -1), kind).view(E, n, k)
    slow = ggml_expert_linear(x.requires_grad_(), raw, kind, ids, torch.ones(E, n))
    torch.testing.assert_close(slow, (x.unsqueeze(1) * w[ids]).sum(-1) + 1)
    torch.testing.assert_close(ggml_expert_linear(x, raw, kind, 2), x @ w[2].T)
    with pytest.raises(RuntimeError, match="expert 3 of 3"):
        native.ggml_mm_id(x, raw, torch.tensor([0, 1, 2, 3, 0]), kind)
    # rows sorted by expert (a prompt's): each expert's run of rows computed together, as one matmul of its rows
    ids = torch.tensor([0] * 7 + [1] * 7 + [2] * 70)
    x = torch.randn(len(ids), k, generator=g)
    got = native.ggml_mm_id(x, raw, ids, kind)
    # against each expert's rows 7 at a time (below the panels' size); a row the threads split takes the one-row path
    runs = [(a, min(a + 7, len(ids)), ids[a]) for a in range(0, len(ids), 7)]
    want = torch.cat([native.ggml_mm(x[a:b], raw[e], kind) for a, b, e in runs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    os.environ.get("AUTOLM_NATIVE") in ("avx2", "avxvnni", "avx512") or not native.available(),
    reason="another build's own run, or no kernel",
)
@pytest.mark.parametrize("build", ["avx2", "avxvnni", "avx512"])
def test_the_avx2_kernels_pass_the_same_tests(build):
    """The kernels CPUs without AVX-512 VNNI run (ggml_avx2.h; AUTOLM_NATIVE=avx2 builds them on any x86-64-v3
    CPU, AUTOLM_NATIVE=avxvnni with AVX-VNNI's instructions on a CPU that has them), and on a CPU with AMX those
    of CPUs without it (AUTOLM_NATIVE=avx512: the int8 panels for any number of rows): this file's tests of the C++
    kernel, run in a process of their own (a process loads one build), every type against the int8-activation
    product and as stacked experts, the kept models' logits and the weights that stay views of the file."""
    import subprocess

    assert native.march() == "native"
    if build == "avxvnni" and "avx_vnni" not in native._cpu_flags():
        pytest.skip("this CPU has no AVX-VNNI")
    if build == "avx512" and not native.tile_rows():
        pytest.skip("the native build has no tiles here: it is the AVX-512 build")
    tests = "native_kernel or own_experts or (kept_model_gives and native) or natively_computed"
    command = [sys.executable, "-m", "pytest", __file__, "-n", "0", "-p", "no:cacheprovider", "-k", tests]
    env = dict(os.environ, AUTOLM_NATIVE=build)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "skipped" not in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed[1]) >= 28, done.stdout[-2000:]  # 12 types twice, 3 models, the views


# A Llama-shaped model whose every linear layer is another type; K-quants need rows of 256.
HIDDEN, FFN, HEADS, KV, VOCAB, LAYERS = 256, 512, 4, 2, 96, 2
TYPES = [
    dict(attn_q=K.Q4_K, attn_k=K.Q5_K, attn_v=K.Q6_K, attn_output=K.Q3_K, ffn_gate=K.Q2_K, ffn_up=K.IQ4_XS,
         ffn_down=K.Q8_0),
    dict(attn_q=K.Q5_0, attn_k=K.Q5_1, attn_v=K.IQ4_NL, attn_output=K.Q4_0, ffn_gate=K.Q4_1, ffn_up=K.F16,
         ffn_down=K.BF16),
]  # fmt: skip


def write_gguf(path: str, embed: int, output: int | None) -> str:
    """A tiny llama GGUF in llama.cpp's layouts; output None: tied embeddings."""
    w = gguf.GGUFWriter(path, "llama")
    for key, value in dict(context_length=64, embedding_length=HIDDEN, block_count=LAYERS,
                           feed_forward_length=FFN, vocab_size=VOCAB).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    seed = iter(range(1000))

    def tensor(name: str, kind: int, rows: int, cols: int) -> None:
        raw = random_blocks(kind, rows, cols, seed=next(seed), scale=0.5 if "embd" in name else 0.05)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(kind))

    tensor("token_embd.weight", embed, VOCAB, HIDDEN)
    rng = np.random.default_rng(7)
    for i, types in enumerate(TYPES):
        kv = HIDDEN // HEADS * KV
        shapes = dict(attn_q=(HIDDEN, HIDDEN), attn_k=(kv, HIDDEN), attn_v=(kv, HIDDEN),
                      attn_output=(HIDDEN, HIDDEN), ffn_gate=(FFN, HIDDEN), ffn_up=(FFN, HIDDEN),
                      ffn_down=(HIDDEN, FFN))  # fmt: skip
        for part, kind in types.items():
            tensor(f"blk.{i}.{part}.weight", kind, *shapes[part])
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32))
    if output is not None:
        tensor("output.weight", output, VOCAB, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load(path: str, **kw):
    return autolm.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), progress=False, **kw
    )


@pytest.mark.parametrize("embed,output", [(K.Q6_K, K.Q8_0), (K.Q8_0, None), (K.Q4_K, None)])
@pytest.mark.parametrize("with_native", [True, False], ids=["native", "torch"])
def test_kept_model_gives_the_dequantized_models_logits(tmp_path, embed, output, with_native, monkeypatch):
    if with_native and not native.available():
        pytest.skip(NO_KERNEL)
    if not with_native:
        monkeypatch.setattr(native, "computes", lambda kind, columns: False)
    path = write_gguf(str(tmp_path / "tiny.gguf"), embed, output)
    kept, plain = _load(path, quantization="gguf"), _load(path)
    layer = kept.model.layers[0]
    if with_native:  # Q4_K and Q6_K: the file's blocks, computed on by the C++ kernel
        assert layer.self_attn.q_proj.weight.dtype == torch.uint8 and layer.self_attn.v_proj.scales is None
    else:
        assert isinstance(layer.self_attn.q_proj, Int4Linear)  # Q4_K: autolm's int4 layout, groups of 32
    assert isinstance(layer.mlp.down_proj, GGMLLinear) and layer.mlp.down_proj.ggml_type == K.Q8_0
    assert isinstance(kept.model.embed_tokens, GGMLEmbedding) and kept.dtype == torch.float32
    q5 = kept.model.layers[
        1
    ].self_attn.q_proj  # Q5_0 in the file: its blocks, or int8 planes of the same values
    assert q5.ggml_type == K.Q5_0 and q5.weight.dtype == (torch.uint8 if with_native else torch.int8)
    assert torch.equal(q5.dequantize(), plain.model.layers[1].self_attn.q_proj.weight)
    q3 = layer.self_attn.o_proj  # Q3_K: the file's own blocks
    assert q3.weight.dtype == torch.uint8 and q3.scales is None
    if output is None:  # the tied head: a layer of its own from the embeddings' blocks
        head = (Int4Linear, K.Q4_K) if embed == K.Q4_K and not with_native else (GGMLLinear, embed)
        assert isinstance(kept.lm_head, head[0]) and getattr(kept.lm_head, "ggml_type", head[1]) == head[1]
    assert "Q6_K x" in " ".join(kept.load_report.notes)
    # the parameters the blocks stand for (autolm inspect), a tied head's blocks counted once
    assert memory_report(kept)[2] == memory_report(plain)[2]
    assert memory_report(kept)[0] < memory_report(plain)[0]
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = kept(ids).logits, plain(ids).logits
    # Q4_K and Q4_0 / Q4_1 layers compute with bf16 activations and scales (PyTorch's int4 kernel), or with int8
    # activations (Q4_K and Q6_K in the C++ kernel: this random model's sharp attention turns their rounding
    # into a few far-off logits, so most of them must be close); the rest in fp32
    close = (got - want).abs() <= 0.02 * (want.abs() + want.abs().max())
    assert close.float().mean() >= 0.95 if with_native else close.all()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    greedy = kept.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(greedy, plain.generate(ids[:1], max_new_tokens=4, do_sample=False))


def test_kept_model_caches_keys_and_values_in_float16_as_llama_cpp(tmp_path):
    """A kept model's KV cache holds float16 (llama.cpp's default cache type: half the bytes each step reads);
    the general forward and the one-token step attend over it, and kv_cache_dtype takes another dtype."""
    from test_decode_steps import greedy_steps

    model = _load(write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None), quantization="gguf")
    assert model.dtype == torch.float32 and model.make_cache(1, 4).keys[0].dtype == torch.float16
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    assert out.past_key_values.keys[0].dtype == torch.float16
    half = [greedy_steps(model, ids, 6, mode) for mode in ("forward", "eager")]
    model.kv_cache_dtype = torch.float32
    assert model.make_cache(1, 4).keys[0].dtype == torch.float32
    with torch.no_grad():
        full = model(ids).logits
    tokens, logits = greedy_steps(model, ids, 6, "eager")

    def near(got, want):  # keys and values rounded to float16 (this random model's keys reach ~80)
        return ((got - want).abs() <= 0.02 * (want.abs() + want.abs().max())).all()

    assert near(out.logits, full)
    assert not torch.equal(out.logits, full)  # the cache's dtype did change what attention read
    assert half[0][0] == half[1][0] == tokens  # the same greedy tokens
    assert near(half[0][1], logits) and near(half[1][1], logits)


def test_kept_blocks_are_the_files_memory_map(tmp_path):
    """The embeddings and the layers that compute on the blocks as they are (F16, BF16) are views of one memory map
    of the whole file."""
    path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, K.BF16)
    model = _load(path, quantization="gguf")
    size = os.path.getsize(path)
    views = [model.model.embed_tokens.blocks, model.lm_head.weight, model.model.layers[1].mlp.up_proj.weight]
    assert model.model.layers[1].mlp.up_proj.ggml_type == K.F16
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one map of the file
    assert all(v.untyped_storage().nbytes() == size for v in views)


@pytest.mark.skipif(not native.available(), reason=NO_KERNEL)
def test_natively_computed_blocks_are_views_of_the_file_map_on_huge_pages(tmp_path):
    """The weights the C++ kernel computes on (here Q2_K to Q6_K, IQ4_XS, IQ4_NL, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 and
    the tied Q8_0 head) are views of the file's map, which is advised to use huge pages, the embeddings' lookup and
    the tied head reading the same bytes; the q/k rows llama's converter permuted too, in the file's order: their
    layers give outputs and weights in the model's order."""
    path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None)
    model = _load(path, quantization="gguf")
    layers = model.model.layers
    attn = [layers[0].self_attn, layers[1].self_attn]
    mapped = [attn[0].v_proj, attn[0].o_proj, layers[0].mlp.gate_proj, layers[0].mlp.up_proj,
              layers[0].mlp.down_proj, attn[1].v_proj, attn[1].o_proj, layers[1].mlp.gate_proj,
              layers[1].mlp.up_proj, model.lm_head, *(m for a in attn for m in (a.q_proj, a.k_proj))]  # fmt: skip
    size = os.path.getsize(path)
    assert {m.weight.untyped_storage().nbytes() for m in mapped} == {size}
    assert model.model.embed_tokens.blocks.data_ptr() == model.lm_head.weight.data_ptr()
    reader = gguf.GGUFReader(path)
    raw = {t.name: torch.from_numpy(np.array(t.data)).view(torch.uint8).reshape(int(t.shape[1]), -1)
           for t in reader.tensors if len(t.shape) == 2}  # fmt: skip
    assert torch.equal(attn[0].v_proj.weight, raw["blk.0.attn_v.weight"])
    assert torch.equal(layers[1].mlp.gate_proj.weight, raw["blk.1.ffn_gate.weight"])
    assert torch.equal(model.lm_head.weight, raw["token_embd.weight"])
    q, k = attn[1].q_proj, attn[1].k_proj
    assert torch.equal(q.weight, raw["blk.1.attn_q.weight"]) and torch.equal(
        k.weight, raw["blk.1.attn_k.weight"]
    )
    assert (q.heads, k.heads) == (model.config.num_attention_heads, model.config.num_key_value_heads)
    assert attn[0].v_proj.heads == 0
    reference = _load(path)  # dequantized while loading, q/k rows put in the model's order there
    ref = reference.model.layers[1].self_attn
    for mine, theirs in ((q, ref.q_proj), (k, ref.k_proj)):
        torch.testing.assert_close(mine.dequantize(), theirs.weight.float())
        x = torch.randn(3, mine.in_features)
        torch.testing.assert_close(mine(x), x @ theirs.weight.float().T, rtol=0.02, atol=0.02)
    if sys.platform == "linux":  # the map's VmFlags: "hg", advised to use huge pages
        assert "hg" in _vm_flags(model.lm_head.weight.data_ptr())


def _mapping(address: int) -> tuple[str, list[str]]:
    """(the file mapped, "" for memory of its own; its VmFlags) of this process's mapping holding `address`
    (/proc/self/smaps)."""
    inside, path = False, ""
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside, path = lo <= address < hi, " ".join(fields[5:])
            elif inside and fields[0] == "VmFlags:":
                return path, fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _vm_flags(address: int) -> list[str]:
    return _mapping(address)[1]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_gguf_read_without_mmap_survives_the_file_cut_short(tmp_path, monkeypatch):
    """AUTOLM_NO_MMAP=1: the file is read into memory of its own, none of it mapped, so cutting it short after the
    load (which would kill a process computing over its map with SIGBUS) changes nothing; the same logits."""
    path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, K.BF16)
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        mapped = _load(path, quantization="gguf")
        want = mapped(ids).logits
        assert _mapping(mapped.lm_head.weight.data_ptr())[0] == path
        monkeypatch.setenv("AUTOLM_NO_MMAP", "1")
        model = _load(path, quantization="gguf")
        blocks = [
            model.lm_head.weight,
            model.model.embed_tokens.blocks,
            model.model.layers[1].mlp.up_proj.weight,
        ]
        assert all(_mapping(b.data_ptr())[0] == "" for b in blocks)
        del mapped
        os.truncate(path, os.path.getsize(path) // 3)
        assert torch.equal(model(ids).logits, want)


def test_int4_quantization_takes_k_quant_blocks(tmp_path):
    """quantization='int4' on a K-quant file: Q4_K blocks load as they are, other types via torch."""
    path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, K.Q6_K)
    model, plain = _load(path, quantization="int4"), _load(path)
    q, want = model.model.layers[0].self_attn.q_proj, plain.model.layers[0].self_attn.q_proj.weight
    assert isinstance(q, Int4Linear)  # only the int4 layers' bf16 scales and zeros round the blocks
    torch.testing.assert_close(q.dequantize(), want, rtol=2**-8, atol=2**-8 * want.abs().max().item())


def test_the_cli_runs_a_gguf_file_in_its_blocks(tmp_path, monkeypatch):
    from autolm.cli.common import load

    path = write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None)
    monkeypatch.setattr("autolm.tokenizer.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    model, _ = load(path)
    assert isinstance(model.lm_head, GGMLLinear)
    model, _ = load(path, quantize="none")
    assert isinstance(model.lm_head, torch.nn.Linear)


def test_compiled_step_graphs_compute_on_the_blocks(tmp_path, monkeypatch):
    """The one-token step's graphs derived from a model of every kept type (exported as AOTInductor compiles
    them: the blocks are graph inputs, the matrix-vector loop reads them) give the general forward's tokens."""
    from test_decode_steps import greedy_steps

    from autolm import step
    from autolm.step import graphs

    model = _load(write_gguf(str(tmp_path / "tiny.gguf"), K.Q6_K, None), quantization="gguf")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    plain_tokens, plain = greedy_steps(model, ids, 8, "forward")
    monkeypatch.delenv("AUTOLM_EAGER")
    step.install_plan(model, graphs.exported(model))
    tokens, logits = greedy_steps(model, ids, 8, "auto")
    assert step._PLANS[model][1] is not None
    assert tokens == plain_tokens
    if native.available():  # int8 activations: inductor's other rounding of a norm moves a few of them a step
        close = (logits - plain).abs() <= 0.02 * (plain.abs() + plain.abs().max())
        assert close.float().mean() >= 0.95
    else:
        torch.testing.assert_close(logits, plain, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("lora", [False, True], ids=["blocks", "lora"])
def test_batched_step_graphs_compute_on_the_blocks(tmp_path, monkeypatch, lora):
    """The graphs for any number of rows (the server's batches: exported with a symbolic batch size, which the
    blocks' op carries through) give the general forward's tokens for a left-padded batch; with LoRA layers over
    the blocks too (`autolm serve model.gguf --adapter ...`)."""
    from conftest import padded_batch

    from autolm import step
    from autolm.lora import LoraConfig, get_peft_model
    from autolm.step import graphs

    model = _load(write_gguf(str(tmp_path / "tiny.gguf"), K.Q6_K, None), quantization="gguf")
    if lora:
        targets = ["q_proj", "v_proj", "down_proj"]
        get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear"
    ids, mask = padded_batch(seed=2, vocab=VOCAB)
    run = dict(
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    model.decode_mode = "forward"
    plain = model.generate(ids, **run)
    model.decode_mode = "auto"
    monkeypatch.delenv("AUTOLM_EAGER")
    step.install_plan(model, graphs.exported(model, batched=True), batched=True)
    fast = model.generate(ids, **run)
    assert step._BATCHED[model][1] is not None
    assert torch.equal(fast.sequences, plain.sequences)
    logits, want = torch.stack(fast.logits), torch.stack(plain.logits)
    if native.available():  # int8 activations, as in the one-row test above
        assert ((logits - want).abs() <= 0.02 * (want.abs() + want.abs().max())).float().mean() >= 0.95
    else:
        torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-3)


def test_a_kept_model_refuses_to_save_in_the_hf_layout(tmp_path):
    from autolm.errors import AutolmError

    model = _load(write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None), quantization="gguf")
    with pytest.raises(AutolmError, match="quantization='gguf'"):
        model.save_pretrained(tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_tensor_data_off_the_8_byte_alignment_is_refused(tmp_path):
    """GGUF aligns tensor data to general.alignment, a multiple of 8; the blocks' fp16 scales are read as views
    of their bytes, so a file that puts a tensor at an odd offset is refused by name, not misread."""
    from autolm.errors import GGUFError
    from autolm.sources.gguf import GGUFFile

    path = str(tmp_path / "odd.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(1)
    w.add_tensor("a.weight", np.zeros(3, dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.I8)
    w.add_tensor(
        "token_embd.weight", random_blocks(K.Q8_0, 4, 32, seed=0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"tensor '[a-z_.]+' starts at byte \d+, not a multiple of 8"):
        GGUFFile(path)


def test_loading_kept_blocks_leaves_the_gguf_package_unimported(tmp_path):
    """A twentieth of a second of every GGUF load: the types autolm keeps are named from its own table."""
    import subprocess
    import sys

    write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, K.Q6_K)
    code = (
        "import sys, autolm\n"
        f"autolm.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file='tiny.gguf',"
        " quantization='gguf', progress=False)\n"
        "assert 'gguf' not in sys.modules, 'gguf imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_without_a_compiler_the_torch_kernels_run(tmp_path):
    """Where the C++ kernel cannot be built (no compiler here), a warning says so once and the kept model runs on
    the torch kernels: the planes and int4 layers, the same logits as with AUTOLM_NATIVE=0."""
    import subprocess
    import sys

    write_gguf(str(tmp_path / "tiny.gguf"), K.Q8_0, None)
    code = (
        "import logging, torch, autolm\n"
        "from autolm.kernels import native\n"
        "logging.basicConfig()\n"
        f"m = autolm.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, gguf_file='tiny.gguf',"
        " quantization='gguf', progress=False)\n"
        "assert not native.available() and m.model.layers[1].self_attn.q_proj.weight.dtype == torch.int8\n"
        "print(m(torch.tensor([[1, 2, 3]])).logits.sum().item())\n"
    )
    failing = tmp_path / "failing-compiler"  # a compiler that runs and fails: its message in the warning
    failing.write_text("#!/bin/sh\necho 'fatal: no such header' >&2\nexit 1\n")
    failing.chmod(0o755)
    runs = {}
    cases = (("broken", {"CXX": str(tmp_path / "no-compiler")}), ("failing", {"CXX": str(failing)}),
             ("off", {"AUTOLM_NATIVE": "0"}))  # fmt: skip
    for name, extra in cases:
        env = dict(os.environ, AUTOLM_HOME=str(tmp_path / name), **extra)
        runs[name] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    timeout=600, check=True)  # fmt: skip
    assert "building its C++ kernels failed" in runs["broken"].stderr
    assert "failed: fatal: no such header" in runs["failing"].stderr
    assert "C++" not in runs["off"].stderr
    assert runs["broken"].stdout == runs["off"].stdout == runs["failing"].stdout
