"""bitnet158: BitNet b1.58 ternary language models in PyTorch."""

from bitnet158.model import BitNetConfig, BitNetForCausalLM, KVCache
from bitnet158.nn import BitLinear, PackedBitLinear, freeze_, quantize_

__version__ = "0.1.0"

__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "KVCache",
    "PackedBitLinear",
    "freeze_",
    "quantize_",
]
