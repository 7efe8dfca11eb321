"""float weights -> a GGUF file's blocks, in llama.cpp's layouts: the legacy types (Q4_0 .. Q8_0) by the gguf
package's quantizer, Q4_K / Q5_K / Q6_K by autolm's own (plainer than llama.cpp's search for the best scales; the
same layout, which gguf.quants dequantizes). Used by GGUF out and by a LoRA merge into a kept GGUF layer."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from ..errors import ConfigError

LEGACY = (2, 3, 6, 7, 8)  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the gguf package quantizes these
FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # F32, F16, BF16


def quantize_blocks(a: np.ndarray, kind: int) -> np.ndarray:
    """float (..., K) -> uint8 (..., bytes per row of K) blocks of ggml type `kind` (K a whole number of blocks;
    F32, F16 and BF16 rows as their bytes)."""
    if kind in FLOATS:
        return (
            torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(FLOATS[kind]).view(torch.uint8).numpy()
        )
    ours = {12: quantize_k, 13: partial(quantize_k, bits=5), 14: quantize_q6_k}.get(kind)
    if ours is not None:
        return ours(a.reshape(-1, a.shape[-1])).reshape(*a.shape[:-1], -1)  # experts: (E, rows, K)
    if kind not in LEGACY:
        raise ConfigError(f"no quantizer for ggml type {kind}: autolm writes Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, "
                          "Q5_K and Q6_K blocks")  # fmt: skip
    import gguf

    return gguf.quants.quantize(a, gguf.GGMLQuantizationType(kind))


def quantizable(kind: int) -> bool:
    return kind in LEGACY or kind in FLOATS or kind in (12, 13, 14)


def quantize_k(w: np.ndarray, bits: int = 4) -> np.ndarray:
    """float (rows, K), K a multiple of 256 -> Q4_K (bits 4) or Q5_K (bits 5) blocks, uint8 (rows, K / 256 * 144
    or 176): per sub-block of 32 a scale and a min (6 bits each, relative to the block's fp16 d and dmin) from
    its range, 4- or 5-bit quants (the fifth bits in a plane of their own). Plainer than llama.cpp's search for
    the best scales; the same layout (gguf.quants dequantizes it)."""
    top = (1 << bits) - 1
    x = w.astype(np.float32).reshape(-1, 8, 32)  # (blocks, sub-blocks, 32)
    lo = np.minimum(x.min(-1), 0)
    scale, mins = (x.max(-1) - lo) / top, -lo  # (blocks, 8)
    d, dmin = (scale.max(-1) / 63).astype(np.float16), (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / df)), 0, 63).astype(np.uint8)
        mn = np.clip(np.nan_to_num(np.round(mins / dminf)), 0, 63).astype(np.uint8)
        step, low = (df * sc)[..., None], (dminf * mn)[..., None]
        q = np.clip(np.nan_to_num(np.round((x + low) / step)), 0, top).astype(np.uint8)  # (blocks, 8, 32)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], -1)  # fmt: skip
    # the low four bits: sub-blocks 2j in the low nibbles, 2j + 1 in the high ones
    qs = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).reshape(-1, 128)
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed]
    if bits == 5:  # byte l's bit j: the fifth bit of sub-block j's weight l
        parts.append(sum(((q[:, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8))
    return np.concatenate([*parts, qs], -1).reshape(w.shape[0], -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float (rows, K), K a multiple of 256 -> Q6_K blocks, uint8 (rows, K / 256 * 210): per group of 16 an int8
    scale relative to the block's fp16 d, 6-bit quants."""
    x = w.astype(np.float32).reshape(-1, 16, 16)
    scale = np.abs(x).max(-1) / 31  # (blocks, 16)
    d = (scale.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.round(scale / df)), -128, 127).astype(np.int8)
        q = np.clip(np.nan_to_num(np.round(x / (df * sc)[..., None])) + 32, 0, 63).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # (blocks, half, quarter, 32): quarters 0, 1 low nibbles, 2, 3 high
    ql = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)
    qh = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)]
    return np.concatenate(parts, -1).reshape(w.shape[0], -1)
