"""Weight quantizers: ternary absmean (b1.58), binary (BitNet), symmetric absmax at 2, 4 and 8 bits.

All arithmetic is in float32. Rounding is `torch.round` (half to even), as in transformers, and the
ternary codes are `round(W * (1 / s))` exactly as transformers computes them, so our packed weights
match a transformers-quantized checkpoint bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch

from bitnet158.quant.quantized import Quantized

SCALE_EPS = 1e-5

Granularity = Literal["tensor", "channel", "group"]


def quantize_ternary(weight: torch.Tensor) -> Quantized:
    """BitNet b1.58: one scale `s = mean|W|` per tensor, codes in {-1, 0, 1}."""
    w = weight.float()
    scale = w.abs().mean().clamp(min=SCALE_EPS)
    codes = (w * (1.0 / scale)).round().clamp(-1, 1).to(torch.int8)
    return Quantized(codes, scale.reshape(1), bits=1.58)


def quantize_binary(weight: torch.Tensor) -> Quantized:
    """BitNet (arXiv 2310.11453): sign of the centred weight, scaled by mean|W|; codes in {-1, 1}."""
    w = weight.float()
    centred = w - w.mean()
    codes = torch.where(centred >= 0, 1, -1).to(torch.int8)
    return Quantized(codes, w.abs().mean().clamp(min=SCALE_EPS).reshape(1), bits=1)


def quantize_absmax(
    weight: torch.Tensor, bits: int, granularity: Granularity = "tensor", group_size: int = 128
) -> Quantized:
    """Symmetric absmax quantization to `bits` in {2, 4, 8}: codes in [-(2^(b-1) - 1), 2^(b-1) - 1].

    `channel` takes one scale per output row (dim 0); `group` one scale per `group_size` consecutive
    values along the last dimension, which must divide it.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"absmax quantization supports 2, 4 or 8 bits, not {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.float()
    if granularity == "tensor":
        absmax = w.abs().amax()
    elif granularity == "channel":
        absmax = w.abs().reshape(w.shape[0], -1).amax(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    elif granularity == "group":
        if w.shape[-1] % group_size:
            raise ValueError(f"group size {group_size} does not divide the last dimension {w.shape[-1]}")
        absmax = w.abs().unflatten(-1, (-1, group_size)).amax(dim=-1)
    else:
        raise ValueError(f"unknown granularity {granularity!r}: expected tensor, channel or group")
    scale = absmax.clamp(min=SCALE_EPS) / qmax
    expanded = scale.repeat_interleave(group_size, dim=-1) if granularity == "group" else scale
    codes = (w / expanded).round().clamp(-qmax, qmax).to(torch.int8)
    return Quantized(
        codes,
        scale.reshape(1) if granularity == "tensor" else scale,
        bits=bits,
        group_size=group_size if granularity == "group" else None,
    )
