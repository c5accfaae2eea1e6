"""Shared fixtures: a fixed seed per test and tiny random BitNet models."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import BitNetConfig, BitNetForCausalLM

# hidden 64, 4 query heads sharing 2 key/value heads, head_dim 16.
TINY_CONFIG = {
    "vocab_size": 211,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, norms included, so that a wrongly loaded or ignored tensor shows up
    in the logits; the scale keeps logits of order 1-10, where greedy tokens are well separated."""
    for param in model.parameters():
        if param.dim() == 1:
            param.copy_(1 + 0.2 * torch.randn_like(param))
        else:
            param.normal_(0.0, 0.5)
    return model


@pytest.fixture
def make_model():
    """`make_model(**config_overrides)`: a tiny random BitNet model (fp master weights) in eval mode."""

    def make(**overrides) -> BitNetForCausalLM:
        model = BitNetForCausalLM(BitNetConfig(**{**TINY_CONFIG, **overrides}))
        return randomize_(model).eval()

    return make


@pytest.fixture
def eager_compile():
    """transformers wraps its BitNet quantization helpers in `torch.compile`; compiling them on CPU costs
    seconds per function and shape. Run them eagerly: the same operations, without the compiler."""
    with torch.compiler.set_stance("force_eager"):
        yield
