"""Native CPU kernels (csrc/, bitnet158.kernels.cpu): exact agreement with the PyTorch reference.

Inputs are fresh random tensors on every run (the seed is in each failure message); every test runs
on the portable fallback as well as on the best instruction set of the machine, so the fallback is
tested everywhere.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from bitnet158.kernels import bitlinear_forward, cpu, reference
from bitnet158.nn.bitlinear import PackedBitLinear
from bitnet158.packing import pack_2bit
from bitnet158.quant.activations import quantize_activations

if os.environ.get("CI") and not cpu.available():  # CI builds the extension: it must be there
    raise RuntimeError(f"the native CPU kernels did not build or import: {cpu.IMPORT_ERROR}")
pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernels unavailable: {cpu.IMPORT_ERROR}")


@pytest.fixture
def rng() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def _ternary(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=generator)


def _activations(m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, generator=generator) * 4
    x[:, :: max(1, k // 5)] *= 20  # outliers, as real activations have
    return x


# (out, in, rows): 2B4T's shapes, odd sizes (not multiples of 4, 16, 32, 128 or 256), GEMV, small-M and
# prefill; the rows cover every remainder of the tiled kernels' groups of 8 (AVX-512) and 4 (AVX2) rows.
SHAPES = [
    (1, 1, 1), (3, 5, 2), (37, 300, 1), (33, 257, 3), (64, 256, 4), (129, 1000, 5), (45, 77, 6), (17, 1000, 7),
    (16, 16, 8), (31, 513, 9), (250, 130, 17), (70, 300, 32), (2560, 2560, 1), (3840, 2560, 2), (2560, 6912, 1),
    (200, 6912, 33), (33, 190, 20), (100, 1280, 64),
]


def test_quantization_matches_reference_bit_for_bit(isa, rng):
    generator, seed = rng
    for m, k in [(1, 1), (3, 7), (5, 2560), (2, 6912), (4, 1001)]:
        x = _activations(m, k, generator)
        expected = quantize_activations(x)
        codes, scales, sums = cpu.quantize_activations(x)
        assert torch.equal(codes[:, :k], expected.codes), f"seed {seed}, {m}x{k}"
        assert not codes[:, k:].any()
        assert torch.equal(scales, expected.scale[:, 0]), f"seed {seed}"
        assert torch.equal(sums, expected.codes.sum(-1, dtype=torch.int32))


def test_quantization_rounds_half_to_even_like_torch(isa):
    # absmax 127 makes the scale exactly 1: codes are round(x) with ties to even, like torch.round.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 0.0]])
    codes, _, _ = cpu.quantize_activations(x)
    assert codes[0, :9].tolist() == [127, 0, 2, 2, 0, -2, -2, 3, 0]
    assert torch.equal(codes[:, :9], quantize_activations(x).codes)
    # PyTorch scales by (1 / absmax) * 127 (two roundings), not 127 / absmax: here that decides a tie.
    x = torch.tensor([[16.030385971069336, -4.354711532592773]])
    assert x[0, 1] * (127 / x[0, 0]) != x[0, 1] * torch.tensor(127.0).div(x[0, 0])
    assert cpu.quantize_activations(x)[0][0, :2].tolist() == quantize_activations(x).codes[0].tolist() == [127, -34]
    zeros, scales, _ = cpu.quantize_activations(torch.zeros(2, 10))
    assert not zeros.any() and torch.equal(scales, quantize_activations(torch.zeros(2, 10)).scale[:, 0])


@pytest.mark.parametrize("style", cpu.STYLES)
def test_integer_sums_match_reference_exactly(isa, rng, style):
    generator, seed = rng
    for n, k, m in SHAPES:
        codes = _ternary(n, k, generator)
        x = _activations(m, k, generator)
        expected = reference.ternary_matmul(quantize_activations(x).codes, codes)
        actual = cpu.ternary_matmul(x, cpu.repack(pack_2bit(codes), n, style), n, style)
        assert torch.equal(actual, expected), f"seed {seed}, {style} on {isa}, out={n} in={k} rows={m}"


def test_extreme_activations_do_not_overflow(isa):
    # All codes -128 against all -1 weights: the largest sums either style can meet (lut's int16 lanes).
    n, k = 40, 6912
    codes = -torch.ones(n, k, dtype=torch.int8)
    x = -torch.ones(2, k)
    x[:, 0] = -1.0001  # absmax just above the rest: nearly every code is -127, the first -128
    expected = reference.ternary_matmul(quantize_activations(x).codes, codes)
    for style in cpu.STYLES:
        actual = cpu.ternary_matmul(x, cpu.repack(pack_2bit(codes), n, style), n, style)
        assert torch.equal(actual, expected), style


@pytest.mark.parametrize("style", cpu.STYLES)
def test_bitlinear_output_is_the_reference_output(isa, rng, style, monkeypatch):
    """The float output too is bit for bit the reference's: scales are applied in the same order."""
    generator, seed = rng
    monkeypatch.setenv("BITNET158_CPU_STYLE", style)
    for n, k, m, per_row, bias in [(37, 300, 1, False, False), (96, 130, 3, True, True), (129, 1000, 12, True, False)]:
        layer = PackedBitLinear(k, n, bias=bias, dtype=torch.float32)
        layer.weight = pack_2bit(_ternary(n, k, generator))
        layer.weight_scale = torch.rand(n if per_row else 1, generator=generator) + 0.1
        if bias:
            layer.bias = torch.randn(n, generator=generator)
        x = _activations(m, k, generator).view(1, m, k)
        expected = reference.ternary_linear(x, layer.weight, layer.weight_scale, n, layer.bias)
        actual = cpu.bitlinear_forward(layer, x)
        assert actual.shape == (1, m, n)
        assert torch.equal(actual, expected), f"seed {seed}, {style} on {isa}, out={n} in={k}"
        x16 = x.bfloat16()
        half = cpu.bitlinear_forward(layer, x16)
        assert half.dtype == torch.bfloat16
        assert torch.equal(half, reference.ternary_linear(x16, layer.weight, layer.weight_scale, n, layer.bias))


@pytest.mark.parametrize("style", cpu.STYLES)
def test_threads_do_not_change_results(rng, style):
    generator, seed = rng
    n, k, m = 1000, 777, 11
    weight = cpu.repack(pack_2bit(_ternary(n, k, generator)), n, style)
    x = _activations(m, k, generator)
    before = cpu.get_threads()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            cpu.set_threads(threads)
            assert cpu.get_threads() == threads
            results.append(cpu.ternary_matmul(x, weight, n, style))
    finally:
        cpu.set_threads(before)
    assert all(torch.equal(r, results[0]) for r in results), f"seed {seed}, {style}"
    with pytest.raises(ValueError):
        cpu.set_threads(0)


def test_style_choice(monkeypatch):
    monkeypatch.delenv("BITNET158_CPU_STYLE", raising=False)
    assert cpu.choose_style(300, 256, 1) in cpu.STYLES
    assert (300, 256, 1, cpu.isa()) in cpu._style_cache  # timed once, then remembered
    assert cpu.choose_style(300, 256, cpu.GEMV_MAX_M + 1) == cpu.gemm_style()  # a GEMM: not timed
    assert cpu.gemm_style() == ("tiled" if cpu.isa() in ("avx2", "avx512-vnni", "avx512-amx") else "i2")
    monkeypatch.setenv("BITNET158_CPU_STYLE", "lut")
    assert cpu.choose_style(300, 256, 1) == "lut"
    monkeypatch.setenv("BITNET158_CPU_STYLE", "fast")
    with pytest.raises(ValueError, match="style"):
        cpu.choose_style(300, 256, 1)


def test_bad_shapes_are_refused():
    layer = PackedBitLinear(64, 10)
    with pytest.raises(ValueError, match=r"\(2, 63\)"):
        cpu.bitlinear_forward(layer, torch.zeros(2, 63))
    with pytest.raises(ValueError, match="rows"):
        cpu.repack(layer.weight, 13, "i2")


def test_dispatch_uses_native_kernels_on_cpu(monkeypatch):
    layer = PackedBitLinear(64, 8)
    calls = []
    monkeypatch.setattr(cpu, "bitlinear_forward", lambda layer, x: calls.append(x) or torch.zeros(1))
    bitlinear_forward(layer, torch.zeros(1, 64))
    assert len(calls) == 1
    monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")  # switched off: the reference
    assert bitlinear_forward(layer, torch.zeros(1, 64)).shape == (1, 8)
    assert len(calls) == 1


def test_embedded_model_logits_are_the_reference_logits(monkeypatch):
    from bitnet158 import BitNetForCausalLM
    from bitnet158.cli.model_loading import embedded_model_path

    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    ids = torch.tensor([[0, 5, 17, 400, 3, 99, 8000]])
    with torch.no_grad():
        native = model(ids)
        monkeypatch.setenv("BITNET158_CPU_KERNELS", "0")
        assert not cpu.available()
        expected = model(ids)
    assert torch.equal(native, expected)


@pytest.mark.parametrize(("variable", "value"), [("BITNET158_THREADS", "abc"), ("BITNET158_CPU_ISA", "bogus")])
def test_bad_environment_is_one_line_and_exit_1(variable: str, value: str):
    result = subprocess.run([sys.executable, "-m", "bitnet158", "info"], env={**os.environ, variable: value},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert variable in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
