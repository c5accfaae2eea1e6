"""Ternary GGUF tensor encodings: int8 codes `[N, K]` in {-1, 0, 1} to the bytes of one tensor and back.

- TQ2_0 (35) and TQ1_0 (34), upstream llama.cpp: 256-value blocks along each row, each ending in an
  fp16 `d`. We store our exact codes with `d = 1` and put the per-tensor scale in `<name>.scale`
  (llama.cpp multiplies each linear's output by it). gguf.quants writes both and reads TQ1_0; TQ2_0's
  2-bit fields are read here, as integers.
- I2_S (36), bitnet.cpp only: the whole tensor, row-major, in 128-value blocks of 32 bytes; value
  `j` of a block sits in byte `j % 32` at shift `6 - 2 * (j // 32)`, stored as `t + 1`. After the
  packed data a 32-byte tail whose first 4 bytes are the fp32 per-tensor scale (bitnet.cpp's
  `quantize_i2_s`). Rows must be whole blocks, as bitnet.cpp's dot product reads them.

Every type keeps each row in its own bytes, so a tensor can be decoded a few rows at a time.
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
BLOCK_CODECS = {GGMLQuantizationType.TQ2_0: gguf_quants.TQ2_0, GGMLQuantizationType.TQ1_0: gguf_quants.TQ1_0}


class BlockError(ValueError):
    """The bytes of a tensor do not decode to ternary codes; the caller names the file and tensor."""


def row_multiple(qtype: int) -> int:
    """What the row length must be a multiple of."""
    return I2_S_BLOCK if qtype == I2_S else GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def row_nbytes(qtype: int, cols: int) -> int:
    if qtype == I2_S:
        return cols // 4
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return cols // block * size


def nbytes(qtype: int, rows: int, cols: int) -> int:
    """Bytes of a whole tensor (I2_S: with its tail)."""
    return rows * row_nbytes(qtype, cols) + (I2_S_TAIL if qtype == I2_S else 0)


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


def decode_rows(data: np.ndarray, qtype: int, rows: int, cols: int) -> tuple[np.ndarray, set[float]]:
    """`(codes [rows, cols] int8, block scales)` from the bytes of whole rows (I2_S: without the tail).

    The block scales are the TQ blocks' `d`s, leaving out blocks of only zeros (llama.cpp's quantizer
    writes 0 there); I2_S has none. One tensor must use one `d` to be a per-tensor ternary tensor.
    """
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if cols % row_multiple(qtype) or data.size != rows * row_nbytes(qtype, cols):
        raise BlockError(f"holds {data.size} bytes for {rows} rows of {cols}, expected whole "
                         f"{row_multiple(qtype)}-value blocks in {rows * row_nbytes(qtype, cols)} bytes")
    if qtype == I2_S:
        return _codes(data, (6, 4, 2, 0)).reshape(rows, cols), set()
    qtype = GGMLQuantizationType(qtype)
    blocks = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    d = blocks[:, -2:].copy().view("<f2").reshape(-1)
    if qtype == GGMLQuantizationType.TQ2_0:  # its 2-bit fields are the codes + 1: no floats needed
        codes = _codes(blocks[:, :-2], (0, 2, 4, 6))
    else:
        blocks = blocks.copy()
        blocks[:, -2:] = np.array([1.0], dtype="<f2").view(np.uint8)  # d = 1: the values are the codes
        # All blocks at once: gguf's row-by-row `dequantize` is many times slower.
        values = BLOCK_CODECS[qtype].dequantize_blocks(blocks)
        if ((values != -1) & (values != 0) & (values != 1)).any():
            raise BlockError("holds a value that is not a ternary code")
        codes = values.astype(np.int8)
    codes = codes.reshape(-1, row_multiple(qtype))
    return codes.reshape(rows, cols), {float(x) for x in np.unique(d[codes.any(axis=1)])}


def _codes(packed: np.ndarray, shifts: tuple[int, int, int, int]) -> np.ndarray:
    """int8 codes from bytes of 2-bit fields `t + 1`, 32 bytes at a time: value 32 i + j of each 128 is the
    field of byte j at `shifts[i]` (I2_S's blocks, and each half of a TQ2_0 block)."""
    stored = (packed.reshape(-1, 1, 32) >> np.array(shifts, dtype=np.uint8).reshape(1, 4, 1)) & 3
    if (stored == 3).any():
        raise BlockError("holds the 2-bit value 3, which is not a ternary code")
    return stored.astype(np.int8) - 1


def i2_s_scale(tail: np.ndarray) -> float:
    """The per-tensor scale in an I2_S tensor's tail."""
    return float(np.asarray(tail, dtype=np.uint8)[:4].view("<f4")[0])
