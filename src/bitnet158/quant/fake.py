"""Fake quantization for training: the forward pass sees quantized values, the backward pass sees
the identity (straight-through estimator), written as `x + (q(x) - x).detach()`."""

from __future__ import annotations

import torch

from bitnet158.quant.activations import quantize_activations
from bitnet158.quant.weights import quantize_ternary


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return x + (quantized.to(x.dtype) - x).detach()


def fake_quant_ternary(weight: torch.Tensor) -> torch.Tensor:
    return straight_through(weight, quantize_ternary(weight.detach()).dequantize())


def fake_quant_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    return straight_through(x, quantize_activations(x.detach(), bits).dequantize())
