"""Per-token symmetric absmax activation quantization, as in BitNet b1.58 (8-bit) and BitNet a4.8 (4-bit)."""

from __future__ import annotations

import torch

from bitnet158.quant.quantized import Quantized
from bitnet158.quant.weights import SCALE_EPS


def quantize_activations(x: torch.Tensor, bits: int = 8) -> Quantized:
    """One scale per token (last dimension): codes in [-2^(b-1), 2^(b-1) - 1], stored as int8.

    Codes are `round(x * (qmax / max|x|))`, the exact expression transformers uses.
    """
    if bits not in (4, 8):
        raise ValueError(f"activation quantization supports 4 or 8 bits, not {bits}")
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    absmax = x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS)
    codes = (x * (qmax / absmax)).round().clamp(-qmax - 1, qmax).to(torch.int8)
    return Quantized(codes, absmax / qmax, bits=bits)
