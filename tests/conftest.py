"""Shared fixtures: a fixed seed per test and tiny random BitNet models."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import BitNetConfig, BitNetForCausalLM
from bitnet158.kernels import cpu

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
def randomize():
    """`randomize(model)`: the random weights of `make_model`, for models built elsewhere (transformers')."""
    return randomize_


@pytest.fixture
def make_model():
    """`make_model(**config_overrides)`: a tiny random BitNet model (fp master weights) in eval mode."""

    def make(**overrides) -> BitNetForCausalLM:
        model = BitNetForCausalLM(BitNetConfig(**{**TINY_CONFIG, **overrides}))
        return randomize_(model).eval()

    return make


def _assert_logits_match(actual: torch.Tensor, expected: torch.Tensor, tight_share: float = 0.5) -> None:
    """Two float32 computations of one quantized model agree, position by position.

    Activations are rounded to integer codes, so a last-bit difference just before a rounding can move
    one code by one step: that shifts the logits of its token (and, through attention, of later tokens)
    by up to a few percent of their scale. So every position must agree to 5% of the logit scale, at
    least `tight_share` of them (half) to float32 rounding (1e-5 of the scale), and the greedy token must be the same
    wherever the difference is too small to reorder the top two logits.
    """
    scale = expected.abs().max()
    diff = (actual - expected).abs().amax(dim=-1) / scale
    assert diff.max() < 5e-2, f"logits differ by {diff.max():.2e} of their scale"
    tight = (diff < 1e-5).float().mean()
    assert tight >= tight_share, f"only {tight:.0%} of positions agree to float32 rounding (worst {diff.max():.2e})"
    top2 = expected.topk(2, dim=-1).values
    decisive = top2[..., 0] - top2[..., 1] > 2 * diff * scale
    assert torch.equal(actual.argmax(-1)[decisive], expected.argmax(-1)[decisive])


@pytest.fixture
def assert_logits_match():
    return _assert_logits_match


@pytest.fixture
def eager_compile():
    """transformers wraps its BitNet quantization helpers in `torch.compile`; compiling them on CPU costs
    seconds per function and shape. Run them eagerly: the same operations, without the compiler."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: their ops are faster than waking a second thread, and on a busy
    two-core machine handing work between threads dominates (tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cpu_isas() -> list[str]:
    """Every instruction set of the native CPU kernels this machine can run (the portable one everywhere)."""
    if cpu._cpu is None:
        return ["portable"]
    best = cpu._cpu.detected_isa()
    x86 = ["portable", "avx2", "avx512-vnni", "avx512-amx"]
    return x86[: x86.index(best) + 1] if best in x86 else ["portable", best]


@pytest.fixture(params=_cpu_isas())
def isa(request):
    """Runs a test once per instruction set of the native CPU kernels, then restores the ISA and threads."""
    before, threads = cpu.isa(), cpu.get_threads()
    assert cpu.set_isa(request.param) == request.param
    yield request.param
    cpu.set_isa(before)
    cpu.set_threads(threads)
