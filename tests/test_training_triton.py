"""The fused Triton BitLinear training kernels against the PyTorch reference (CUDA only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet158.quant.fake import fake_quant_activations, fake_quant_ternary

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
triton_bitlinear = pytest.importorskip("bitnet158.training.triton_bitlinear") if torch.cuda.is_available() else None


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Fake quantization in float32: the exact values the fused kernels approximate in bf16."""
    return F.linear(fake_quant_activations(x.float()), fake_quant_ternary(weight), bias)


@pytest.mark.parametrize(("m", "k", "n", "bias"), [(256, 768, 2048, False), (77, 200, 130, True), (1, 64, 16, False)])
def test_fused_forward_and_backward_match_the_reference(m: int, k: int, n: int, bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda") * 0.02).requires_grad_()
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True) if bias else None
    x_ref = x.detach().float().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    b_ref = b.detach().float().requires_grad_() if bias else None

    y = triton_bitlinear.bitlinear_train(x, w, b)
    y_ref = _reference(x_ref, w_ref, b_ref)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2 * y_ref.abs().max().item())

    grad = torch.randn_like(y_ref)
    y.backward(grad.to(y.dtype))
    y_ref.backward(grad)
    for got, want in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert w.grad.dtype == torch.float32
    if bias:
        # A sum over the rows, returned in bf16: within half a bf16 step of the float32 sum.
        torch.testing.assert_close(b.grad.float(), b_ref.grad, rtol=1e-2, atol=1e-2 * b_ref.grad.abs().max().item())


def test_quantization_passes_are_exact() -> None:
    torch.manual_seed(1)
    w = torch.randn(300, 500, device="cuda")
    codes, scale = triton_bitlinear.ternary_codes(w)
    from bitnet158.quant.weights import quantize_ternary

    expected = quantize_ternary(w)
    assert torch.equal(codes, expected.codes) and torch.equal(scale, expected.scale.to(scale.device))
    x = torch.randn(33, 5000, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(triton_bitlinear.row_absmax(x), x.float().abs().amax(-1), rtol=0, atol=0)


def test_fused_layer_under_autocast_and_compile() -> None:
    from bitnet158.nn import BitLinear

    torch.manual_seed(2)
    layer = BitLinear(128, 96).cuda()
    x = torch.randn(4, 10, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference = layer(x)
        layer.fused = triton_bitlinear.bitlinear_train
        fused = torch.compile(layer)(x)
    assert fused.dtype == torch.bfloat16 and fused.shape == (4, 10, 96)
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)
    fused.float().square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
