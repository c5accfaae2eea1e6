"""BitLinear layers and the functions that swap them into a model."""

from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear
from bitnet158.nn.convert import freeze_, quantize_

__all__ = ["BitLinear", "PackedBitLinear", "freeze_", "quantize_"]
