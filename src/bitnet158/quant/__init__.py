"""Quantizers (integer codes + scales), fake quantization for training, and error metrics."""

from bitnet158.quant.activations import quantize_activations
from bitnet158.quant.fake import fake_quant_activations, fake_quant_ternary, straight_through
from bitnet158.quant.metrics import cosine_similarity, mse, sqnr_db
from bitnet158.quant.quantized import Quantized
from bitnet158.quant.weights import quantize_absmax, quantize_binary, quantize_ternary

__all__ = [
    "Quantized",
    "cosine_similarity",
    "fake_quant_activations",
    "fake_quant_ternary",
    "mse",
    "quantize_absmax",
    "quantize_activations",
    "quantize_binary",
    "quantize_ternary",
    "sqnr_db",
    "straight_through",
]
