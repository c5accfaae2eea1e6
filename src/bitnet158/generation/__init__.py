"""Generating text: sampling parameters, batched generation and streaming."""

from bitnet158.generation.generate import generate, generate_tokens, stream
from bitnet158.generation.sampling import SamplingParams

__all__ = ["SamplingParams", "generate", "generate_tokens", "stream"]
