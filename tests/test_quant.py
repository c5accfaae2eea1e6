"""Weight and activation quantizers, fake quantization with straight-through gradients, error metrics.

Ternary and 8-bit activation codes are compared with transformers' own BitNet functions.
"""

import math

import pytest
import torch
from transformers.integrations import bitnet as hf_bitnet

from bitnet158.quant import (
    cosine_similarity,
    fake_quant_activations,
    fake_quant_ternary,
    mse,
    quantize_absmax,
    quantize_activations,
    quantize_binary,
    quantize_ternary,
    sqnr_db,
    straight_through,
)

WEIGHT_SHAPES = [(1, 1), (5, 3), (7, 13), (64, 96), (33, 1000)]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_codes_and_scale(shape, dtype):
    w = torch.randn(shape).to(dtype)
    q = quantize_ternary(w)

    s = w.float().abs().mean()
    assert q.codes.dtype == torch.int8
    assert set(q.codes.unique().tolist()) <= {-1, 0, 1}
    assert q.scale.shape == (1,)
    torch.testing.assert_close(q.scale, s.reshape(1), rtol=1e-6, atol=0)
    assert torch.equal(q.codes, (w.float() / s).round().clamp(-1, 1).to(torch.int8))
    torch.testing.assert_close(q.dequantize(), q.codes.float() * s)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ternary_codes_match_transformers(shape, dtype, eager_compile):
    w = torch.randn(shape).to(dtype)
    # WeightQuant returns codes / (1 / s): its sign is the code, exactly.
    hf_codes = hf_bitnet.WeightQuant.apply(w.clone()).float().sign().to(torch.int8)
    assert torch.equal(quantize_ternary(w).codes, hf_codes)


def test_ternary_rounds_half_to_even():
    # mean|W| = 2, so W / s = [0.5, 1.5, -0.5, -1.5]: halves round to the even neighbour, then clamp.
    q = quantize_ternary(torch.tensor([1.0, 3.0, -1.0, -3.0]))
    assert q.scale.item() == 2.0
    assert q.codes.tolist() == [0, 1, 0, -1]


def test_ternary_all_zero_weight_has_clamped_scale():
    q = quantize_ternary(torch.zeros(4, 6))
    assert q.scale.item() == pytest.approx(1e-5)
    assert not q.codes.any()


@pytest.mark.parametrize("shape", [(1, 2), (6, 10), (33, 17)])
def test_binary_is_sign_of_centred_weight(shape):
    w = torch.randn(shape) + 0.3
    q = quantize_binary(w)
    assert set(q.codes.unique().tolist()) <= {-1, 1}
    assert torch.equal(q.codes, torch.where(w >= w.mean(), 1, -1).to(torch.int8))
    torch.testing.assert_close(q.scale, w.abs().mean().reshape(1))


def test_binary_known_values():
    q = quantize_binary(torch.tensor([3.0, 1.0, -1.0, 5.0]))  # mean 2: centred [1, -1, -3, 3]
    assert q.codes.tolist() == [1, -1, -1, 1]
    assert q.scale.item() == 2.5
    assert q.dequantize().tolist() == [2.5, -2.5, -2.5, 2.5]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    "granularity, expected_scale_shape", [("tensor", (1,)), ("channel", (12, 1)), ("group", (12, 5))]
)
def test_absmax_codes_and_error_bound(bits, granularity, expected_scale_shape):
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(12, 40)
    q = quantize_absmax(w, bits, granularity, group_size=8)

    assert q.scale.shape == expected_scale_shape
    assert q.codes.dtype == torch.int8
    assert q.codes.abs().max().item() == qmax  # the largest |w| maps to the top code
    scale = q.scale.repeat_interleave(8, dim=-1) if granularity == "group" else q.scale
    assert ((q.dequantize() - w).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(q.codes, (w / scale).round().clamp(-qmax, qmax).to(torch.int8))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_scales_follow_granularity(bits):
    qmax = 2 ** (bits - 1) - 1
    w = torch.randn(6, 20)
    torch.testing.assert_close(quantize_absmax(w, bits, "tensor").scale, w.abs().amax().reshape(1) / qmax)
    torch.testing.assert_close(quantize_absmax(w, bits, "channel").scale, w.abs().amax(1, keepdim=True) / qmax)
    groups = quantize_absmax(w, bits, "group", group_size=5).scale
    torch.testing.assert_close(groups, w.abs().reshape(6, 4, 5).amax(-1) / qmax)


def test_absmax_group_size_must_divide_last_dim():
    with pytest.raises(ValueError, match="group size 8 does not divide the last dimension 20"):
        quantize_absmax(torch.randn(3, 20), 4, "group", group_size=8)


@pytest.mark.parametrize(
    "kwargs, message", [({"bits": 3}, "2, 4 or 8 bits, not 3"), ({"bits": 4, "granularity": "row"}, "'row'")]
)
def test_absmax_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_absmax(torch.randn(3, 8), **kwargs)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 5, 64), (4, 1000)])
def test_activation_codes_match_transformers(shape, eager_compile):
    x = torch.randn(shape) * 3
    q = quantize_activations(x, bits=8)
    layer = hf_bitnet.BitLinear(shape[-1], 4, bias=False, dtype=torch.float32)
    hf_codes, hf_scale = layer.activation_quant(x)
    assert torch.equal(q.codes, hf_codes)
    torch.testing.assert_close(q.scale, 1 / hf_scale)
    torch.testing.assert_close(fake_quant_activations(x), hf_bitnet.ActQuant.apply(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_activations_per_token(bits):
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(3, 7, 33) * torch.rand(3, 7, 1) * 10  # every token at its own scale
    q = quantize_activations(x, bits)

    assert q.scale.shape == (3, 7, 1)
    torch.testing.assert_close(q.scale, x.abs().amax(-1, keepdim=True) / qmax)
    assert q.codes.min().item() >= -qmax - 1
    assert (q.codes.abs().amax(-1) == qmax).all()  # each token's largest value reaches the top code
    assert ((q.dequantize() - x).abs() <= q.scale / 2 + 1e-6).all()


def test_activations_reject_other_widths():
    with pytest.raises(ValueError, match="4 or 8 bits, not 2"):
        quantize_activations(torch.randn(2, 3), bits=2)


@pytest.mark.parametrize(
    "fake_quant", [fake_quant_ternary, fake_quant_activations, lambda x: fake_quant_activations(x, bits=4)]
)
def test_straight_through_gradient_is_identity(fake_quant):
    x = torch.randn(9, 31, requires_grad=True)
    upstream = torch.randn(9, 31)
    out = fake_quant(x)
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)
    assert not torch.equal(out, x)  # the forward pass did quantize


def test_fake_quant_forward_values():
    w, x = torch.randn(8, 16), torch.randn(4, 16)
    torch.testing.assert_close(fake_quant_ternary(w), quantize_ternary(w).dequantize())
    torch.testing.assert_close(fake_quant_activations(x, 4), quantize_activations(x, 4).dequantize())


def test_straight_through_keeps_input_dtype():
    x = torch.randn(5, dtype=torch.bfloat16, requires_grad=True)
    out = straight_through(x, x.detach().float().round())
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_metrics_known_values():
    ref, approx = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert mse(ref, approx) == 1.0
    assert sqnr_db(ref, approx) == pytest.approx(10 * math.log10(30 / 4))
    assert cosine_similarity(ref, approx) == pytest.approx(38 / math.sqrt(30 * 50))


def test_metrics_on_equal_tensors():
    x = torch.randn(7, 3)
    assert mse(x, x) == 0.0
    assert sqnr_db(x, x) == math.inf
    assert cosine_similarity(x, x) == pytest.approx(1.0)


def test_cosine_similarity_direction():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert cosine_similarity(a, -3 * a) == pytest.approx(-1.0)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))


def test_ternary_quantization_error_is_finite_and_bounded():
    w = torch.randn(64, 96)
    approx = quantize_ternary(w).dequantize()
    # a Gaussian weight keeps a cosine above 0.85 and an SQNR of a few dB with three levels
    assert 0.85 < cosine_similarity(w, approx) < 1
    assert 3 < sqnr_db(w, approx) < 10
