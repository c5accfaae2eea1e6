"""The exact ternary matmul, BitLinear (training) and PackedBitLinear (inference), and the layer swaps."""

import pytest
import torch
from torch import nn

from bitnet158.kernels import ternary_linear, ternary_matmul
from bitnet158.nn import BitLinear, PackedBitLinear, freeze_, quantize_
from bitnet158.packing import pack_2bit, unpack_2bit
from bitnet158.quant import fake_quant_activations, fake_quant_ternary, quantize_activations, quantize_ternary


def random_int8(*shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8)


@pytest.mark.parametrize("k", [1, 3, 17, 1000])
@pytest.mark.parametrize("n", [1, 5, 33])
@pytest.mark.parametrize("batch", [(), (7,), (2, 3)])
def test_ternary_matmul_is_exact(k, n, batch):
    act = random_int8(*batch, k)
    weight = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    out = ternary_matmul(act, weight)
    assert out.dtype == torch.int32
    assert out.shape == (*batch, n)
    assert torch.equal(out.long(), act.long() @ weight.long().T)


def test_ternary_matmul_exact_beyond_float32_integers():
    """A sum past 2^24 that float32 cannot hold (an odd number) must still come out exactly."""
    k = 2**24 // 128 + 1
    act = torch.full((1, k), -128, dtype=torch.int8)
    act[0, 0] = -127
    weight = torch.full((1, k), -1, dtype=torch.int8)
    assert ternary_matmul(act, weight).item() == 128 * k - 1


@pytest.mark.parametrize("shape", [(5, 3, 17), (1, 1, 1), (2, 9, 64)])
def test_ternary_linear_matches_its_definition(shape):
    """out = (x_q @ T^T) * (activation scale * weight scale), with x_q and T the integer codes."""
    *batch, k = shape
    n = 13
    x = torch.randn(shape)
    weight = quantize_ternary(torch.randn(n, k))
    act = quantize_activations(x)
    expected = (act.codes.double() @ weight.codes.double().T) * act.scale.double() * weight.scale.double()
    out = ternary_linear(x, pack_2bit(weight.codes), weight.scale, n)
    assert out.shape == (*batch, n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_features, out_features", [(1, 1), (3, 5), (17, 33), (64, 96), (1000, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_matches_bitlinear(in_features, out_features, bias):
    layer = BitLinear(in_features, out_features, bias=bias).eval()
    packed = PackedBitLinear.from_linear(layer)
    x = torch.randn(2, 7, in_features)

    assert packed.weight.dtype == torch.uint8 and packed.weight.shape == (-(-out_features // 4), in_features)
    quantized = quantize_ternary(layer.weight.detach())
    assert torch.equal(unpack_2bit(packed.weight, out_features), quantized.codes)
    assert torch.equal(packed.weight_scale, quantized.scale)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_bitlinear_gradients_reach_master_weights():
    layer = BitLinear(17, 5, bias=True)
    x = torch.randn(3, 4, 17, requires_grad=True)
    upstream = torch.randn(3, 4, 5)
    layer(x).backward(upstream)

    # Straight through both quantizers: the gradients of F.linear(x_q, W_q) with respect to x_q and W_q.
    x_q, w_q = fake_quant_activations(x.detach()), fake_quant_ternary(layer.weight.detach())
    torch.testing.assert_close(layer.weight.grad, upstream.flatten(0, 1).T @ x_q.flatten(0, 1))
    torch.testing.assert_close(layer.bias.grad, upstream.sum((0, 1)))
    torch.testing.assert_close(x.grad, upstream @ w_q)
    assert layer.weight.grad.abs().sum() > 0


def test_packed_layer_rejects_wrong_weight_shape():
    layer = PackedBitLinear(8, 4)
    with pytest.raises(ValueError, match=r"weight of shape \(8, 4\) does not fit a 8->4 layer"):
        layer.set_weight(torch.randn(8, 4))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.router = nn.Linear(8, 2, bias=False)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj = nn.Linear(8, 8, bias=False)
        self.lm_head = nn.Linear(8, 10, bias=False)


def test_quantize_swaps_linears_except_skipped():
    net = TinyNet()
    params_before = {name: p for name, p in net.named_parameters()}
    quantize_(net, skip=["router", "proj"])

    layers = dict(net.named_modules())
    for name in ["blocks.0.attn", "blocks.1.attn", "blocks.0.mlp.0", "blocks.1.mlp.2"]:
        assert type(layers[name]) is BitLinear, name
    for name in ["blocks.0.router", "blocks.1.router", "proj", "lm_head"]:
        assert type(layers[name]) is nn.Linear, name
    assert type(layers["embed"]) is nn.Embedding
    # the very same parameter objects, so an optimizer built before the swap keeps working
    params_after = dict(net.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[name] is p for name, p in params_before.items())


def test_quantize_skips_a_qualified_name_only():
    net = TinyNet()
    quantize_(net, skip=["blocks.0.attn"])
    assert type(net.blocks[0].attn) is nn.Linear
    assert type(net.blocks[1].attn) is BitLinear


def test_quantized_layer_computes_the_bitlinear_function():
    linear = nn.Linear(8, 16)
    net = nn.Sequential(linear)
    x = torch.randn(3, 8)
    quantize_(net)
    expected = nn.functional.linear(fake_quant_activations(x), fake_quant_ternary(linear.weight), linear.bias)
    assert torch.equal(net(x), expected)


def test_freeze_packs_bitlinears():
    net = quantize_(TinyNet(), skip=["router"]).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = [net.blocks[i].mlp(net.blocks[i].attn(x)) for i in range(2)]
        lm_head_weight = net.lm_head.weight
        attn_bias = net.blocks[0].attn.bias.clone()
        freeze_(net)
        for i in range(2):
            got = net.blocks[i].mlp(net.blocks[i].attn(x))
            torch.testing.assert_close(got, expected[i], rtol=1e-5, atol=1e-5)

    assert not any(isinstance(m, BitLinear) for m in net.modules())
    assert isinstance(net.blocks[0].attn, PackedBitLinear) and isinstance(net.blocks[1].mlp[2], PackedBitLinear)
    assert type(net.blocks[0].router) is nn.Linear
    assert net.lm_head.weight is lm_head_weight
    assert torch.equal(net.blocks[0].attn.bias, attn_bias)


def test_repacked_weight_is_built_once_and_rebuilt_when_the_weight_changes():
    layer = PackedBitLinear.from_linear(torch.nn.Linear(8, 12, bias=False))
    calls = []

    def repack(weight):
        calls.append(1)
        return weight.clone()

    first = layer.repacked("copy", repack)
    assert layer.repacked("copy", repack) is first and len(calls) == 1
    layer.set_weight(torch.randn(12, 8))
    assert torch.equal(layer.repacked("copy", repack), layer.weight) and len(calls) == 2


def test_repacked_works_for_weights_made_in_inference_mode():
    with torch.inference_mode():
        layer = PackedBitLinear.from_linear(torch.nn.Linear(8, 12, bias=False))
    assert torch.equal(layer.repacked("copy", torch.clone), layer.weight)
