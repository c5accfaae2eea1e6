"""Q6_K encoding, which gguf.quants can decode but not encode: 256-value blocks of sixteen 16-value
groups, 6-bit codes in [-32, 31], an int8 scale per group and an fp16 `d` per block.

Plain absmax scales (llama.cpp's reference searches for slightly better ones); the bit layout is
the inverse of gguf.quants.Q6_K.dequantize_blocks.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """uint8 `[..., K / 256 * 210]` for float `values [..., K]`, K a multiple of 256."""
    shape = values.shape
    x = values.astype(np.float32).reshape(-1, QK_K // 16, 16)
    n = x.shape[0]
    group_scale = np.abs(x).max(axis=-1) / 31
    d = (group_scale.max(axis=-1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32 > 0, np.round(group_scale / d32), 0).clip(-128, 127).astype(np.int8)
        step = (d32 * scales)[..., None]
        q = np.where(step > 0, np.round(x / step), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, QK_K)
    low, high = q & 0x0F, q >> 4
    low = low.reshape(n, 2, 2, 2, 32)  # [half of the block][nibble][byte half][byte]
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(n, QK_K // 2)
    high = high.reshape(n, 2, 4, 32)  # [half of the block][bit pair][byte]
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(n, QK_K // 4)
    blocks = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8)], axis=-1)
    return blocks.reshape(*shape[:-1], -1)
