"""W2A8 kernels (Triton, and CUDA for few rows on Hopper) and the graph-captured decode step against the
PyTorch reference. Skipped without CUDA.

Fresh random inputs per case; the integer dot products must be exact, odd shapes included."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import BitNetForCausalLM
from bitnet158.cli.model_loading import embedded_model_path
from bitnet158.kernels.reference import ternary_linear, ternary_matmul
from bitnet158.model.bitnet import RMSNorm, apply_rotary, rotary_cos_sin
from bitnet158.packing import pack_2bit
from bitnet158.quant.activations import quantize_activations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [  # (M, K, N): decode, small batches, prefill; odd K and N that are not multiples of 4
    (1, 2560, 3840), (1, 6912, 2560), (1, 333, 65), (2, 129, 7), (5, 1000, 130), (8, 2560, 13824),
    (9, 333, 65), (16, 2560, 2560), (33, 777, 301), (64, 6912, 2560), (300, 2560, 3840), (1000, 130, 1),
]


def _random_layer(n: int, k: int, per_row_scale: bool):
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    scale = torch.rand(n if per_row_scale else 1) + 0.5
    return codes, pack_2bit(codes).cuda(), scale.cuda()


def _random_codes(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 activation codes `[m, k]` (CPU), the same zero-padded to our K on the GPU, and their row sums."""
    from bitnet158.kernels import gpu

    act = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    padded = torch.zeros(m, gpu.padded_k(k), dtype=torch.int8)
    padded[:, :k] = act
    return act, padded.cuda(), act.int().sum(1).int().cuda()


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_w2a8_matmul_is_exact(m: int, k: int, n: int):
    from bitnet158.kernels import gpu

    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, n, int_out=True)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_matches_reference(m: int, k: int, n: int, dtype: torch.dtype):
    from bitnet158.kernels import gpu

    _, packed, scale = _random_layer(n, k, per_row_scale=True)
    x = torch.randn(m, k, device="cuda").to(dtype)
    codes, x_scale, sums = gpu.quantize_rows(x)
    act = quantize_activations(x)
    assert torch.equal(codes[:, :k], act.codes) and not codes[:, k:].any()
    assert torch.equal(x_scale, act.scale[:, 0])
    assert torch.equal(sums, act.codes.int().sum(1))
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    out = gpu.w2a8_matmul(codes, x_scale, sums, gpu.repack(packed), scale, n, dtype)
    expected = ternary_linear(x, packed, scale, n)
    assert not out.isnan().any()
    # Same float operations in the same order: equal up to the last bit of the output dtype.
    torch.testing.assert_close(out, expected, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=0)


def test_shapes_the_format_cannot_take_are_rejected():
    from bitnet158.kernels import gpu

    with pytest.raises(ValueError, match="does not hold"):
        gpu.check_shape(torch.zeros(3, 10, dtype=torch.uint8), 16, 10)
    with pytest.raises(ValueError, match="uint8"):
        gpu.check_shape(torch.zeros(4, 10, dtype=torch.int8), 16, 10)
    with pytest.raises(ValueError, match="int32"):
        gpu.check_shape(torch.zeros(1, 2**24 + 1, dtype=torch.uint8, device="meta"), 4, 2**24 + 1)


GEMV_CONFIGS = [(1, 256, 2), (2, 1024, 4), (4, 2048, 8), (4, 512, 8)]  # (BLOCK_R, BLOCK_KW, warps)


@pytest.mark.parametrize("config", GEMV_CONFIGS)
@pytest.mark.parametrize(("m", "k", "n"), [(1, 333, 65), (3, 6912, 130), (2, 2560, 3840), (1, 9000, 8)])
def test_every_gemv_block_config_is_exact(m: int, k: int, n: int, config: tuple[int, int, int]):
    """One chunk or several per row, rows past R, the next chunk's prefetch past K: all exact."""
    from bitnet158.kernels import gpu

    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, n,
                          int_out=True, config=config)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


# (BLOCK_M, BLOCK_R, BLOCK_K, warps, stages, K splits): one split or several, a last split shorter than
# the others, splits of a single BLOCK_K; rows past M and R.
MMA_CONFIGS = [(16, 32, 256, 4, 1, 1), (16, 32, 128, 4, 1, 3), (64, 16, 128, 4, 2, 7), (16, 16, 128, 4, 1, 64)]


@pytest.mark.parametrize("config", MMA_CONFIGS)
@pytest.mark.parametrize(("m", "k", "n"), [(9, 333, 65), (16, 2560, 3840), (33, 6912, 130), (64, 1000, 7)])
def test_every_split_mma_config_is_exact(m: int, k: int, n: int, config: tuple[int, ...]):
    from bitnet158.kernels import gpu

    if gpu.padded_k(k) % config[2]:
        pytest.skip("BLOCK_K must divide the padded K")
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    weight = gpu.repack(packed)
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, weight, scale, n,
                              int_out=True, config=config)
        assert torch.equal(got.cpu(), ternary_matmul(act, codes))


# (tokens per block, K splits, loads in flight, row groups): one split or the most a cluster takes, a last split
# shorter than the others, more loads in flight than a warp has chunks, one row group to one per warp; rows past M
# and R, several token tiles.
CUDA_MMA_CONFIGS = [(8, 1, 1, 1), (8, 3, 6, 2), (16, 8, 2, 4), (32, 5, 1, 1), (32, 2, 3, 4), (16, 1, 2, 8)]


def _skip_without_cuda_mma() -> None:
    from bitnet158.kernels import gpu_mma

    if not gpu_mma.available(torch.device("cuda")):
        pytest.skip("the CUDA mma kernel needs a Hopper GPU and torch.cuda._compile_kernel")


@pytest.mark.parametrize("config", CUDA_MMA_CONFIGS)
@pytest.mark.parametrize(
    ("m", "k", "n"), [(2, 333, 65), (9, 2560, 3840), (17, 6912, 130), (32, 1000, 7), (50, 2560, 301)])
def test_every_cuda_mma_config_is_exact(m: int, k: int, n: int, config: tuple[int, int, int, int]):
    from bitnet158.kernels import gpu, gpu_mma

    _skip_without_cuda_mma()
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = torch.full((m, n), -1, dtype=torch.int32, device="cuda")
    gpu_mma.w2a8_mma(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, got, config=config)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


def test_every_tuned_cuda_mma_plan_is_exact():
    """The configs tuned for the 2B4T shapes, at the largest batch of each bucket and at an odd one inside it."""
    from bitnet158.kernels import gpu, gpu_mma

    _skip_without_cuda_mma()
    for (r, kp), buckets in gpu_mma.TUNED.items():
        codes, packed, scale = _random_layer(4 * r, kp, per_row_scale=False)
        weight = gpu.repack(packed)
        for m in sorted({m for bucket in buckets for m in (bucket, bucket - 5)}):
            act, padded, sums = _random_codes(m, kp)
            config = gpu_mma.plan(m, r, kp, gpu_mma.TUNED_SM_COUNT)
            got = torch.full((m, 4 * r), -1, dtype=torch.int32, device="cuda")
            gpu_mma.w2a8_mma(padded, torch.ones(m, device="cuda"), sums, weight, scale, got, config=config)
            assert torch.equal(got.cpu(), ternary_matmul(act, codes)), (r, kp, m, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_mma_scales_and_bias_like_the_reference(dtype: torch.dtype):
    from bitnet158.kernels import gpu, gpu_mma

    _skip_without_cuda_mma()
    m, k, n = 13, 777, 301
    _, packed, scale = _random_layer(n, k, per_row_scale=True)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    codes, x_scale, sums = gpu.quantize_rows(x)
    got = gpu_mma.w2a8_mma(codes, x_scale, sums, gpu.repack(packed), scale, torch.empty(m, n, dtype=dtype,
                           device="cuda"), bias)
    # The same float operations in the same order as the reference: equal to the last bit.
    assert torch.equal(got, ternary_linear(x, packed, scale, n, bias))


# (packed rows, tokens, stages, K splits, consumer warpgroups) of the CUDA wgmma kernel: one to four row groups
# per warpgroup, or two to four warpgroups per row group taking turns over K, 64 to 256 tokens, pipelines shorter
# and longer than K (and than a batch of two chunks), clusters of up to 8 blocks.
CUDA_WGMMA_CONFIGS = [(16, 64, 4, 1, 1), (16, 64, 2, 3, 1), (32, 128, 4, 1, 1), (64, 64, 3, 2, 1),
                      (16, 256, 2, 1, 1), (48, 64, 4, 8, 1), (64, 128, 4, 1, 2), (32, 192, 3, 2, 2), (16, 128, 1, 1, 1),
                      (16, 64, 4, 2, 2), (16, 64, 3, 1, 2), (32, 64, 6, 1, 4), (16, 64, 8, 1, 4),
                      (16, 128, 4, 1, 2)]


def _skip_without_cuda_wgmma() -> None:
    from bitnet158.kernels import gpu_wgmma

    if not gpu_wgmma.available(torch.device("cuda")):
        pytest.skip("the CUDA wgmma kernel needs an sm_90 GPU and torch.cuda._compile_kernel")


@pytest.mark.parametrize("config", CUDA_WGMMA_CONFIGS)
@pytest.mark.parametrize(
    ("m", "k", "n"), [(2, 333, 65), (17, 6912, 130), (64, 2560, 3840), (65, 1000, 7), (300, 2560, 3841)])
def test_every_cuda_wgmma_config_is_exact(m: int, k: int, n: int, config: tuple[int, ...]):
    from bitnet158.kernels import gpu, gpu_wgmma

    _skip_without_cuda_wgmma()
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = torch.full((m, n), -1, dtype=torch.int32, device="cuda")
    gpu_wgmma.w2a8_wgmma(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, got, config=config)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


def test_every_picked_cuda_wgmma_config_is_exact():
    """Where w2a8_matmul picks the wgmma kernel: the first and last batch of each range, through w2a8_matmul (past
    256 rows, the reference on the first, middle and last 64 only)."""
    from bitnet158.kernels import gpu, gpu_wgmma

    _skip_without_cuda_wgmma()
    for (r, kp), ranges in gpu_wgmma.PICKED.items():
        codes, packed, scale = _random_layer(4 * r, kp, per_row_scale=False)
        weight = gpu.repack(packed)
        for first, last, config in ranges:
            for m in (first, last):
                act, padded, sums = _random_codes(m, kp)
                got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, weight, scale, 4 * r,
                                      int_out=True).cpu()
                rows = torch.arange(m) if m <= 256 else torch.cat([torch.arange(64), torch.arange(64) + m // 2,
                                                                   torch.arange(m - 64, m)])
                assert torch.equal(got[rows], ternary_matmul(act[rows], codes)), (r, kp, m, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "k", "n"), [(13, 777, 301), (70, 2560, 2560)])  # 8-column stores and single ones
def test_cuda_wgmma_scales_and_bias_like_the_reference(m: int, k: int, n: int, dtype: torch.dtype):
    from bitnet158.kernels import gpu, gpu_wgmma

    _skip_without_cuda_wgmma()
    _, packed, scale = _random_layer(n, k, per_row_scale=True)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    codes, x_scale, sums = gpu.quantize_rows(x)
    got = gpu_wgmma.w2a8_wgmma(codes, x_scale, sums, gpu.repack(packed), scale,
                               torch.empty(m, n, dtype=dtype, device="cuda"), bias)
    assert torch.equal(got, ternary_linear(x, packed, scale, n, bias))


@pytest.mark.parametrize(
    "config", [(128, 128, 128, 4, 3), (128, 256, 128, 8, 3), (64, 256, 128, 8, 3), (128, 64, 256, 4, 2),
               (128, 128, 64, 4, 4), (128, 128, 64, 4, 5), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
               (256, 128, 64, 8, 3)])
@pytest.mark.parametrize(("m", "k", "n"), [(65, 333, 65), (300, 2560, 3841), (1000, 130, 1)])
def test_every_int8_gemm_config_is_exact(m: int, k: int, n: int, config: tuple[int, ...]):
    from bitnet158.kernels import gpu

    if gpu.padded_k(k) % config[2]:
        pytest.skip("BLOCK_K must divide the padded K")
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, n,
                          int_out=True, config=config)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


@pytest.mark.parametrize("layout", ["misaligned", "strided"])
def test_int8_gemm_copies_codes_the_copy_engine_cannot_read(layout: str):
    """The GEMM's tensor descriptors need 16-byte aligned rows: other codes are copied first, with the same sums."""
    from bitnet158.kernels import gpu

    m, k, n = 200, 300, 515
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    kp = padded.shape[1]
    if layout == "misaligned":
        storage = torch.zeros(m * kp + 1, dtype=torch.int8, device="cuda")
        view = storage[1:].view(m, kp)
    else:
        view = torch.zeros(m, kp + 8, dtype=torch.int8, device="cuda")[:, :kp]
    view.copy_(padded)
    got = gpu.w2a8_matmul(view, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, n, int_out=True,
                          config=(128, 128, 128, 4, 3))
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


@pytest.mark.parametrize("k", [333, 4100])  # the narrow and the wide tiles
def test_int8_gemm_with_a_short_last_wave_is_exact(k: int):
    """Tiles for one full wave of the GPU and a few more: those few run as a second grid of smaller pieces."""
    import triton

    from bitnet158.kernels import gpu

    n = 2558  # the last column tile and the last row tile end inside
    config = gpu._gemm_config(gpu.padded_k(k))
    column_tiles = triton.cdiv(4 * -(-n // 4), config[1])
    device = torch.device("cuda")
    m = next(rows * config[0] - 37 for rows in range(2, 400)
             if gpu._tiles_in_full_waves(rows * column_tiles, config, device) < rows * column_tiles)
    codes, packed, scale = _random_layer(n, k, per_row_scale=False)
    act, padded, sums = _random_codes(m, k)
    got = gpu.w2a8_matmul(padded, torch.ones(m, device="cuda"), sums, gpu.repack(packed), scale, n, int_out=True,
                          config=config)
    assert torch.equal(got.cpu(), ternary_matmul(act, codes))


@pytest.mark.parametrize(("block_r", "warps"), [(1, 2), (2, 4), (4, 8), (8, 16)])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 333, 65), (3, 6912, 132), (2, 2560, 3840), (1, 8192, 8)])
def test_every_fused_gemv_block_config_matches_the_reference(m: int, k: int, n: int, block_r: int, warps: int):
    import triton

    from bitnet158.kernels import gpu

    _, packed, scale = _random_layer(n, k, per_row_scale=False)
    weight = gpu.repack(packed)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    norm = RMSNorm(k, 1e-5).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(k))
        expected = ternary_linear(norm(x), packed, scale, n).float()
    config = (block_r, triton.next_power_of_2(weight.shape[1] // 4), warps)
    got = gpu.fused_gemv(x, norm.weight, 1e-5, weight, scale, n, config=config).float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_fused_gemv_rejects_rows_it_cannot_hold():
    from bitnet158.kernels import gpu

    _, packed, scale = _random_layer(8, 9000, per_row_scale=False)
    x = torch.randn(1, 9000, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 8192"):
        gpu.fused_gemv(x, torch.ones(9000, device="cuda"), 1e-5, gpu.repack(packed), scale, 8)
    _, packed, scale = _random_layer(8, 2560, per_row_scale=False)
    x = torch.randn(1, 2560, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="does not hold"):
        gpu.fused_gemv(x, torch.ones(2560, device="cuda"), 1e-5, gpu.repack(packed), scale, 8, config=(1, 256, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 2560, 3840), (3, 333, 64), (1, 6912, 2560)])
def test_fused_norm_gemv_epilogues(m: int, k: int, n: int, dtype: torch.dtype):
    from bitnet158.kernels import gpu

    _, packed, scale = _random_layer(n, k, per_row_scale=True)
    weight = gpu.repack(packed)
    norm = RMSNorm(k, 1e-5).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(k))
        x = torch.randn(m, k, device="cuda").to(dtype)
        normed = norm(x)
    codes, x_scale, _ = gpu.quantize_rows(x, None, norm.weight, 1e-5)
    act = quantize_activations(normed)
    # rsqrt and summation order may differ in the last bit: a code may move by one, rarely.
    diff = (codes[:, :k].int() - act.codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3
    torch.testing.assert_close(x_scale, act.scale[:, 0], rtol=1e-2, atol=0)
    expected = ternary_linear(normed, packed, scale, n).float()
    tol = {"rtol": 2e-2, "atol": 2e-2 * expected.abs().max().item()}
    torch.testing.assert_close(gpu.fused_gemv(x, norm.weight, 1e-5, weight, scale, n).float(), expected, **tol)
    residual = torch.randn(m, n, device="cuda").to(dtype)
    out = gpu.fused_gemv(x, norm.weight, 1e-5, weight, scale, n, "residual", residual.clone(), None)
    torch.testing.assert_close(out.float(), residual.float() + expected, **tol)
    in_place = residual.clone()
    gpu.fused_gemv(x, norm.weight, 1e-5, weight, scale, n, "residual", in_place, in_place)
    assert torch.equal(in_place, out)
    gate, up = expected.chunk(2, dim=-1)
    relu2 = (torch.relu(gate).square() * up)
    torch.testing.assert_close(
        gpu.fused_gemv(x, norm.weight, 1e-5, weight, scale, n, "relu2_gate_up").float(), relu2,
        rtol=5e-2, atol=5e-2 * relu2.abs().max().item(),
    )


def _attention_reference(qkv, keys, values, lengths, padding, slots, num_heads: int, theta: float) -> torch.Tensor:
    """Per row: rotate the new q and k at position length - padding, attend to the slot's keys in
    [padding, length) and the new key, grouped query heads; float32 on the CPU."""
    kv_heads, head_dim = keys.shape[1], keys.shape[3]
    group = num_heads // kv_heads
    out = []
    for b in range(qkv.shape[0]):
        length, pad, slot = int(lengths[b]), int(padding[b]), int(slots[b])
        q, k, v = qkv[b].float().split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        cos, sin = rotary_cos_sin(torch.tensor([[length - pad]]), head_dim, theta, torch.float32)
        q = apply_rotary(q.view(1, num_heads, 1, head_dim), cos, sin).view(kv_heads, group, head_dim)
        k = apply_rotary(k.view(1, kv_heads, 1, head_dim), cos, sin).view(kv_heads, 1, head_dim)
        all_k = torch.cat([keys[slot, :, pad:length].float(), k], dim=1)
        all_v = torch.cat([values[slot, :, pad:length].float(), v.view(kv_heads, 1, head_dim)], dim=1)
        weights = torch.softmax(q @ all_k.transpose(1, 2) * head_dim**-0.5, dim=-1)
        out.append((weights @ all_v).reshape(-1))
    return torch.stack(out)


def test_decode_attention_matches_the_reference_over_every_split():
    """Rows of many lengths (no cached key, one block, a few splits, all 16), left padding, rows in any slots;
    each call writes the new key and value at the row's length. Twice, so the split counters' reset is used."""
    from bitnet158.kernels import gpu_attention

    num_heads, kv_heads, head_dim, theta = 8, 2, 64, 10000.0
    lengths = torch.tensor([0, 5, 100, 700, 1500, 2000])
    padding = torch.tensor([0, 2, 0, 30, 100, 0])
    slots = torch.tensor([3, 0, 5, 1, 2, 4])
    keys = torch.randn(6, kv_heads, 2048, head_dim)
    values = torch.randn(6, kv_heads, 2048, head_dim)
    qkv = torch.randn(6, (num_heads + 2 * kv_heads) * head_dim)
    want = _attention_reference(qkv, keys, values, lengths, padding, slots, num_heads, theta)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cuda_keys, cuda_values = keys.cuda(), values.cuda()
    for _ in range(2):
        got = gpu_attention.decode_attention(qkv.cuda(), cuda_keys, cuda_values, inv_freq.cuda(), lengths.cuda(),
                                             padding.cuda(), slots.cuda(), num_heads)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    new_v = qkv[:, (num_heads + kv_heads) * head_dim:].view(6, kv_heads, head_dim)
    for b in range(6):
        torch.testing.assert_close(cuda_values[slots[b], :, lengths[b]].cpu(), new_v[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_matches_the_model_forward(dtype: torch.dtype, assert_logits_match):
    from bitnet158.generation.gpu_decode import GPUDecoder
    from bitnet158.model import KVCache

    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda", dtype=dtype)
    prompts = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    padding = torch.tensor([0, 5])
    decoder = GPUDecoder(model, 2, 64)
    decoder.reset(padding)
    reference = KVCache(model.config, 2, 64, "cuda", dtype)
    reference.set_padding(padding)
    with torch.no_grad():
        # The prefill's norm-and-quantization kernel sums in another order than torch's RMSNorm: over 30 positions
        # and all layers some activation code moves by one step, so the logits agree to a few percent, and the
        # greedy token wherever the top two are apart.
        got, want = decoder.prefill(prompts[:, :30]), model(prompts[:, :30], reference)[:, -1]
        scale = want.abs().max()
        diff = (got - want).abs().amax(-1)
        assert diff.max() < 5e-2 * scale
        top2 = want.topk(2, dim=-1).values
        decisive = top2[:, 0] - top2[:, 1] > 2 * diff
        assert torch.equal(got.argmax(-1)[decisive], want.argmax(-1)[decisive])
        # The decode steps from the same cache.
        reference.keys.copy_(decoder.cache.keys)
        reference.values.copy_(decoder.cache.values)
        for t in range(30, 40):
            got = decoder.decode(prompts[:, t]).clone()
            want = model(prompts[:, t : t + 1], reference)[:, -1]
            if dtype == torch.float32:
                assert_logits_match(got.cpu()[:, None], want.cpu()[:, None])
            else:
                assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.5
                torch.testing.assert_close(got.float(), want.float(), rtol=0.1, atol=0.1 * want.abs().max().item())


def test_a_prefill_graph_computes_what_the_eager_prefill_computes():
    """`GPUDecoder.prefill` runs eagerly at a length's first prompt, captures at the second and replays after:
    each time the logits, the cache and the next decode step are those of the eager decoder, bit for bit."""
    from bitnet158.generation.gpu_decode import GPUDecoder

    model = BitNetForCausalLM.from_pretrained(embedded_model_path(), device="cuda")
    graphed, eager = GPUDecoder(model, 2, 64), GPUDecoder(model, 2, 64, use_graph=False)
    for _ in range(3):
        prompts = torch.randint(0, model.config.vocab_size, (2, 21), device="cuda")
        padding = torch.randint(0, 21, (2,))
        outputs = []
        for decoder in (graphed, eager):
            decoder.reset(padding)
            logits = decoder.prefill(prompts).clone()
            outputs.append((logits, decoder.decode(logits.argmax(-1)).clone(), decoder.cache.length))
        (got, got_next, got_length), (want, want_next, want_length) = outputs
        assert torch.equal(got, want) and torch.equal(got_next, want_next) and got_length == want_length == 22
        assert torch.equal(graphed.cache.keys[:, :, :, :22], eager.cache.keys[:, :, :, :22])
    assert list(graphed.prefill_graphs) == [21] and not eager.prefill_graphs
