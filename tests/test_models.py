"""Logit parity with transformers on tiny random checkpoints written by transformers itself."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, VOCAB, hf_reference, padded_batch, positions, to_v4_spelling

import autolm


def assert_real_tokens_close(out, ref, mask, atol):
    for b in range(mask.shape[0]):
        real = mask[b].bool()
        torch.testing.assert_close(out[b][real].float(), ref[b][real].float(), atol=atol, rtol=atol)


# a left-padded row equals its unpadded run in autolm and not in transformers (MiniMax-M3's block-sparse layers:
# README): compared with transformers' unpadded runs
UNPADDED_REFERENCE = {"minimax_m3_vl_text"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_logits_match_transformers_left_padded(checkpoint, name):
    directory, ref_model = checkpoint(name)
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    if model.dtype == torch.bfloat16:
        ref_model = hf_reference(directory)
    ids, mask = padded_batch(lengths=(14, 9, 4))
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        for b in range(len(ids)) if name in UNPADDED_REFERENCE else ():
            ref[b, mask[b].bool()] = ref_model(ids[b : b + 1, mask[b].bool()]).logits[0]
        out = model(ids, attention_mask=mask).logits
    assert out.dtype == ref.dtype
    # a recurrent family's chunked scans sum in another order than transformers' (within 1e-4, as its own tests)
    atol = (1e-4 if model.recurrent else 1e-5) if out.dtype == torch.float32 else 2e-2
    assert_real_tokens_close(out, ref, mask, atol)


def test_dynamic_rope_beyond_max_positions(checkpoint):
    directory, ref_model = checkpoint("llama_dynamic")  # max_position_embeddings=8
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_sliding_window_shorter_than_sequence(checkpoint):
    directory, ref_model = checkpoint("mistral_sliding")  # window 6
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, ref = model(ids).logits, ref_model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The window really matters: full attention gives different logits late in the sequence.
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[:, -1], ref[:, -1], atol=1e-3)


def test_v4_config_spelling(checkpoint, tmp_path):
    import shutil

    import transformers

    directory, _ = checkpoint("llama_gqa_llama3_sharded")
    v4 = str(tmp_path / "v4")
    shutil.copytree(directory, v4)
    to_v4_spelling(v4)
    cfg = autolm.AutoConfig.from_pretrained(v4)
    assert cfg.rope_spelling == "v4" and cfg.rope_parameters["rope_type"] == "llama3"
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(v4).eval()
    model = autolm.AutoModelForCausalLM.from_pretrained(v4)
    ids, mask = padded_batch(seed=3)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert_real_tokens_close(model(ids, attention_mask=mask).logits, ref, mask, 1e-5)


def test_left_and_right_padding_equal_unpadded(checkpoint):
    directory, _ = checkpoint("qwen2_sliding")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        alone = model(ids).logits[0]
        left = model(
            torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1),
            attention_mask=torch.tensor([[0] * 4 + [1] * 9]),
        ).logits[0, 4:]
        right = model(
            torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
            attention_mask=torch.tensor([[1] * 9 + [0] * 4]),
        ).logits[0, :9]
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)


def test_loss_matches_transformers(checkpoint):
    directory, ref_model = checkpoint("qwen2_tied_bias")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        torch.testing.assert_close(model(ids, labels=labels).loss, ref_model(ids, labels=labels).loss)


def test_incremental_decode_equals_full_forward(checkpoint):
    directory, _ = checkpoint("mistral_sliding")
    model = autolm.AutoModelForCausalLM.from_pretrained(directory)
    ids, mask = padded_batch(seed=6, lengths=(12, 7))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.make_cache(2, 4)  # small: forces the buffers to grow
        out = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache)
        steps = [out.logits]
        for t in range(5, ids.shape[1]):
            steps.append(
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits
            )
    assert_real_tokens_close(torch.cat(steps, 1), full, mask, 1e-5)


def test_linear_uses_onednn_for_fp32_inference_and_f_linear_under_autograd(monkeypatch):
    """fp32 inference on oneDNN's matmul, except on CPUs where MKL's (F.linear's) is faster (Intel's) and for
    products too small to pay for oneDNN's set-up: this machine's choice, then the other one."""
    from torch.profiler import profile

    from autolm.kernels import core
    from autolm.kernels.core import mkl_leads
    from autolm.nn import Linear

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    vendor = next((line for line in open("/proc/cpuinfo") if line.startswith("vendor_id")), "")
    assert mkl_leads() == (torch.backends.mkl.is_available() and "GenuineIntel" in vendor)
    layer = Linear(48, 40, bias=True)
    x = torch.randn(2, 7, 48)

    def ops(fn):
        with profile() as prof:
            out = fn()
        return out, {e.key for e in prof.key_averages()}

    assert x.shape[:-1].numel() * layer.weight.numel() < core.ONEDNN_FROM
    with torch.no_grad():
        _, names = ops(lambda: layer(x))  # a small product: F.linear
    assert "mkldnn::_linear_pointwise" not in names and "aten::addmm" in names
    monkeypatch.setattr(core, "ONEDNN_FROM", 0)  # as if it were large
    for leads in (mkl_leads(), not mkl_leads()):
        monkeypatch.setattr(core, "mkl_leads", lambda leads=leads: leads)
        with torch.no_grad():
            fast, names = ops(lambda: layer(x))
        if leads:
            assert "mkldnn::_linear_pointwise" not in names and "aten::addmm" in names
        else:
            assert "mkldnn::_linear_pointwise" in names and "aten::addmm" not in names
        torch.testing.assert_close(fast, torch.nn.functional.linear(x, layer.weight, layer.bias))
    train, names = ops(lambda: layer(x))  # weights require grad: the autograd path
    assert "mkldnn::_linear_pointwise" not in names
    train.sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        _, names = ops(lambda: layer.bfloat16()(x.bfloat16()))  # bf16: F.linear (PyTorch picks oneDNN itself)
    assert "mkldnn::_linear_pointwise" not in names


@pytest.mark.parametrize("masked", [False, True])
def test_blocked_attention_equals_sdpa(masked):
    """Query blocks of 5 over 13 new tokens after 4 cached ones (uneven last block), 6 query heads on 2
    KV heads; a padding + window mask, or None: causal after the cached keys."""
    from autolm.kernels.attention import blocked_attention

    g = torch.Generator().manual_seed(0)
    B, nh, n_kv, T, past, hd = 2, 6, 2, 13, 4, 8
    q = torch.randn(B, nh, T, hd, generator=g)
    k, v = (torch.randn(B, n_kv, past + T, hd, generator=g) for _ in range(2))
    S = past + T
    qpos, kpos = torch.arange(past, S)[:, None], torch.arange(S)[None, :]
    allowed = (kpos <= qpos)[None, None].expand(B, 1, T, S)
    if masked:
        pad = torch.ones(B, S, dtype=torch.bool)
        pad[1, :6] = False  # row 1 left-padded
        allowed = allowed & (kpos > qpos - 7)[None, None] & pad[:, None, None, :]
        allowed = allowed | (kpos == qpos)[None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(3, 1), v.double().repeat_interleave(3, 1), attn_mask=allowed
    )
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = blocked_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), allowed if masked else None, hd**-0.5, block=5
        )
        out = out.transpose(1, 2)  # it returns (B, T, nh, hd), the layout o_proj reads
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
