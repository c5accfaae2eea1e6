"""BitLinear layers: `BitLinear` trains fp master weights through fake quantization;
`PackedBitLinear` holds 2-bit packed ternary weights and one scale for inference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitnet158.kernels import bitlinear_forward
from bitnet158.packing import ROWS_PER_BYTE, pack_2bit
from bitnet158.quant.fake import fake_quant_activations, fake_quant_ternary
from bitnet158.quant.weights import quantize_ternary


class BitLinear(nn.Linear):
    """A drop-in `nn.Linear` whose weights (ternary, per tensor) and inputs (int8, per token) are
    fake-quantized, with straight-through gradients to the fp master weights.

    Two attributes the trainer sets (neither is part of the state dict):
    - `quant_strength`: None (fully quantized), or a 0-dim tensor λ in [0, 1] for a quantization
      warm-up, `x + λ·(q(x) - x).detach()`; a tensor, so that changing it in place recompiles nothing.
    - `fused`: None, or a function `(x, weight, bias) -> y` computing the fully quantized layer
      (λ = 1) in fused kernels, such as `bitnet158.training.triton_bitlinear.bitlinear_train`.
    """

    quant_strength: torch.Tensor | None = None
    fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_strength is None:
            if self.fused is not None:
                return self.fused(x, self.weight, self.bias)
            return F.linear(fake_quant_activations(x), fake_quant_ternary(self.weight), self.bias)
        strength = self.quant_strength
        x = fake_quant_activations(x, strength=strength)
        return F.linear(x, fake_quant_ternary(self.weight, strength), self.bias)


class PackedBitLinear(nn.Module):
    """Inference BitLinear. `weight` is uint8 `[ceil(out / 4), in]` in transformers' packed layout and
    `weight_scale` is `s = mean|W|`, so that `W ≈ s * unpack(weight)`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        packed_rows = -(-out_features // ROWS_PER_BYTE)
        self.register_buffer("weight", torch.zeros(packed_rows, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._repacked: dict[str, tuple[tuple, torch.Tensor]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedBitLinear:
        """Quantize and pack a trained linear layer's weight (meta tensors give an empty layer)."""
        has_bias = linear.bias is not None
        layer = cls(linear.in_features, linear.out_features, has_bias, linear.weight.device, linear.weight.dtype)
        if linear.weight.device.type != "meta":
            layer.set_weight(linear.weight.detach())
            if has_bias:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision weight `[out, in]` into this layer."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a {self.in_features}->{self.out_features} layer"
            )
        quantized = quantize_ternary(weight)
        self.weight = pack_2bit(quantized.codes).to(self.weight.device)
        self.weight_scale = quantized.scale.to(self.weight_scale.device)

    def repacked(self, layout: str, repack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`repack(self.weight)` in a kernel's own layout, computed once and kept until the weight changes."""
        # Inference tensors (made under torch.inference_mode) have no version counter; they cannot change.
        version = None if self.weight.is_inference() else self.weight._version
        key = (self.weight.data_ptr(), version, self.weight.device)
        cached = self._repacked.get(layout)
        if cached is None or cached[0] != key:
            cached = (key, repack(self.weight))
            self._repacked[layout] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bitlinear_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
