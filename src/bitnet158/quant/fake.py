"""Fake quantization for training: the forward pass sees quantized values, the backward pass sees
the identity (straight-through estimator), written as `x + (q(x) - x).detach()`.

`strength` is the λ of a quantization warm-up (as in Hugging Face's Llama3-8B-1.58 fine-tune):
`x + λ·(q(x) - x).detach()` blends from the full-precision value (λ = 0) to the quantized one (λ = 1).
It may be a Python number or a 0-dim tensor (a tensor lets torch.compile change it without recompiling).
"""

from __future__ import annotations

import torch

from bitnet158.quant.activations import quantize_activations
from bitnet158.quant.weights import quantize_ternary


def straight_through(x: torch.Tensor, quantized: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    delta = (quantized.to(x.dtype) - x).detach()
    if isinstance(strength, (int, float)) and strength == 1:
        return x + delta
    return x + (strength * delta).to(x.dtype)


def fake_quant_ternary(weight: torch.Tensor, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    return straight_through(weight, quantize_ternary(weight.detach()).dequantize(), strength)


def fake_quant_activations(x: torch.Tensor, bits: int = 8, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    return straight_through(x, quantize_activations(x.detach(), bits).dequantize(), strength)
