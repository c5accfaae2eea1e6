"""Ternary linear kernels. Every backend computes what `reference.ternary_linear` computes.

`bitlinear_forward` is the one entry point for inference layers: it picks the fastest backend for
the input's device and falls back to the plain PyTorch reference.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from bitnet158.kernels import cpu
from bitnet158.kernels.reference import ternary_linear, ternary_matmul

if TYPE_CHECKING:
    from bitnet158.nn.bitlinear import PackedBitLinear

__all__ = ["bitlinear_forward", "gpu_kernels_available", "ternary_linear", "ternary_matmul"]


def bitlinear_forward(layer: PackedBitLinear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` on the fastest backend for `x.device`."""
    if x.device.type == "cuda" and gpu_kernels_available():  # GPU: Triton W2A8 kernels (kernels/gpu.py)
        from bitnet158.kernels import gpu

        return gpu.linear(layer, x)
    if x.device.type == "cpu" and cpu.available():  # CPU: native kernels (csrc/, kernels/cpu.py)
        return cpu.bitlinear_forward(layer, x)
    return ternary_linear(x, layer.weight, layer.weight_scale, layer.out_features, layer.bias)


@functools.cache
def gpu_kernels_available() -> bool:
    """Whether Triton is importable (it ships with CUDA builds of PyTorch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
