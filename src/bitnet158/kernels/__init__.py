"""Ternary linear kernels. Every backend computes what `reference.ternary_linear` computes.

`bitlinear_forward` is the one entry point for inference layers: it picks the fastest backend for
the input's device and falls back to the plain PyTorch reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bitnet158.kernels.reference import ternary_linear, ternary_matmul

if TYPE_CHECKING:
    from bitnet158.nn.bitlinear import PackedBitLinear

__all__ = ["bitlinear_forward", "ternary_linear", "ternary_matmul"]


def bitlinear_forward(layer: PackedBitLinear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on the fastest backend for `x.device`."""
    return ternary_linear(x, layer.weight, layer.weight_scale, layer.out_features, layer.bias)
