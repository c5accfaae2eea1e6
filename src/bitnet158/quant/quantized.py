"""The result of every quantizer: integer codes plus the scales that map them back to real values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quantized:
    """`codes * scale` approximates the original tensor.

    `scale` broadcasts against `codes`, except with `group_size`, where it holds one scale per
    group of `group_size` consecutive values along the last dimension (shape `[..., K // group_size]`).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: float
    group_size: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.float()
        if self.group_size is not None:
            scale = scale.repeat_interleave(self.group_size, dim=-1)
        return (self.codes.float() * scale).to(dtype)
