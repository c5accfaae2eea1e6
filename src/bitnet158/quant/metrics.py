"""Error between a tensor and its quantized approximation."""

from __future__ import annotations

import math

import torch


def mse(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (reference.double() - approx.double()).pow(2).mean().item()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in decibels; infinite when the two are equal."""
    signal = reference.double().pow(2).sum().item()
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)


def cosine_similarity(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        reference.double().flatten(), approx.double().flatten(), dim=0
    ).item()
