"""The BitNet b1.58 model, its configuration, KV cache and Hugging Face checkpoint I/O."""

from bitnet158.model.bitnet import BitNetForCausalLM
from bitnet158.model.config import BitNetConfig
from bitnet158.model.kv_cache import KVCache

__all__ = ["BitNetConfig", "BitNetForCausalLM", "KVCache"]
