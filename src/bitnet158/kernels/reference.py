"""Plain PyTorch reference for the ternary linear: int8 activations times ternary weights, exactly.

Fast kernels (later: native CPU, Triton/CUDA) must agree with `ternary_matmul` bit for bit and with
`ternary_linear` within float rounding.
"""

from __future__ import annotations

import torch

from bitnet158.packing import unpack_2bit
from bitnet158.quant.activations import quantize_activations

# float32 adds integers exactly while every partial sum stays below 2^24: |sum| <= 128 * K.
_FLOAT32_EXACT_K = 2**24 // 128


def ternary_matmul(act_codes: torch.Tensor, weight_codes: torch.Tensor) -> torch.Tensor:
    """`act_codes [..., K] (int8) @ weight_codes[N, K]^T (int8 ternary)` as exact int32 `[..., N]`."""
    exact_in_float32 = act_codes.shape[-1] <= _FLOAT32_EXACT_K and (
        act_codes.device.type == "cpu" or torch.get_float32_matmul_precision() == "highest"
    )
    dtype = torch.float32 if exact_in_float32 else torch.float64
    return (act_codes.to(dtype) @ weight_codes.to(dtype).T).to(torch.int32)


def ternary_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BitLinear inference: per-token int8 activations, 2-bit packed ternary weights, scales applied once."""
    act = quantize_activations(x)
    acc = ternary_matmul(act.codes, unpack_2bit(packed_weight, out_features))
    out = acc.float() * (act.scale * weight_scale.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
