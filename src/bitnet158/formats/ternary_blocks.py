"""Ternary GGUF tensor encodings: int8 codes `[N, K]` in {-1, 0, 1} to the bytes of one tensor and back.

- TQ2_0 (35) and TQ1_0 (34), upstream llama.cpp: 256-value blocks along each row, each ending in an
  fp16 `d`. We store our exact codes with `d = 1` and put the per-tensor scale in `<name>.scale`
  (llama.cpp multiplies each linear's output by it). gguf.quants does the bit layout.
- I2_S (36), bitnet.cpp only: the whole tensor, row-major, in 128-value blocks of 32 bytes; value
  `j` of a block sits in byte `j % 32` at shift `6 - 2 * (j // 32)`, stored as `t + 1`. After the
  packed data a 32-byte tail whose first 4 bytes are the fp32 per-tensor scale (bitnet.cpp's
  `quantize_i2_s`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

# bitnet.cpp's type id; gguf's enum does not know it, so it is a plain int here.
I2_S = 36
I2_S_BLOCK = 128
I2_S_TAIL = 32
TERNARY_TYPES = {"tq2_0": GGMLQuantizationType.TQ2_0, "tq1_0": GGMLQuantizationType.TQ1_0, "i2_s": I2_S}


class BlockError(ValueError):
    """The bytes of a tensor do not decode to ternary codes; the caller names the file and tensor."""


def row_multiple(qtype: int) -> int:
    """What the row length (TQ types) or the element count (I2_S) must be a multiple of."""
    return I2_S_BLOCK if qtype == I2_S else GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def nbytes(qtype: int, rows: int, cols: int) -> int:
    if qtype == I2_S:
        return rows * cols // 4 + I2_S_TAIL
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return rows * cols // block * size


def encode(codes: np.ndarray, qtype: int, scale: float) -> np.ndarray:
    """uint8 bytes of ternary `codes [N, K]`; `scale` goes into I2_S's tail (TQ types carry it elsewhere)."""
    if qtype == I2_S:
        stored = (codes.astype(np.uint8) + 1).reshape(-1, 4, 32)
        packed = stored[:, 0] << 6 | stored[:, 1] << 4 | stored[:, 2] << 2 | stored[:, 3]
        tail = np.zeros(I2_S_TAIL, dtype=np.uint8)
        tail[:4] = np.array([scale], dtype="<f4").view(np.uint8)
        return np.concatenate([packed.reshape(-1), tail])
    data = gguf_quants.quantize(codes.astype(np.float32), GGMLQuantizationType(qtype))
    blocks = data.reshape(-1, GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][1])
    blocks[:, -2:] = np.array([1.0], dtype="<f2").view(np.uint8)  # d = 1: the codes are exact
    return data


def decode(data: np.ndarray, qtype: int, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """`(codes [rows, cols] int8, per-tensor scale)` from one tensor's bytes.

    For TQ types the scale is the blocks' common `d`; blocks holding only zeros may carry any `d`
    (llama.cpp's quantizer writes 0 there). Different `d`s are not a per-tensor ternary tensor.
    """
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size != nbytes(qtype, rows, cols):
        raise BlockError(f"holds {data.size} bytes, expected {nbytes(qtype, rows, cols)}")
    if qtype == I2_S:
        packed = data[: -I2_S_TAIL].reshape(-1, 1, 32)
        stored = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3
        if (stored == 3).any():
            raise BlockError("holds the 2-bit value 3, which is not a ternary code")
        codes = (stored.astype(np.int8) - 1).reshape(rows, cols)
        return codes, float(data[-I2_S_TAIL:][:4].view("<f4")[0])
    qtype = GGMLQuantizationType(qtype)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1]).copy()
    d = blocks[:, -2:].copy().view("<f2").reshape(-1)
    blocks[:, -2:] = np.array([1.0], dtype="<f2").view(np.uint8)
    codes = gguf_quants.dequantize(blocks, qtype).reshape(rows, cols)
    if ((codes != -1) & (codes != 0) & (codes != 1)).any():
        raise BlockError("holds a value that is not a ternary code")
    used = np.unique(d[np.abs(codes).reshape(d.size, -1).any(axis=1)])
    if used.size > 1:
        raise BlockError(f"has {used.size} different block scales: not one per-tensor scale")
    return codes.astype(np.int8), float(used[0]) if used.size else 1.0
