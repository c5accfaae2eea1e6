"""Triton kernels for NVIDIA GPUs: ternary weights (2 bits) times int8 activations (W2A8).

Weight layout. A layer's packed weight is transformers' layout, uint8 `[R, K]` with `R = ceil(N / 4)`:
byte `(r, k)` holds the weights of rows `r, r + R, r + 2R, r + 3R` at column `k`, two bits each,
stored as `t + 1`. Our layout (`repack`) is the same bytes with K zero-padded to a multiple of 128,
so the common shapes need no copy at all. It suits both kernels:

- read as int32, one word holds 4 consecutive columns of 4 rows. `(word >> 2i) & 0x03030303` is
  then four int8 codes of row `r + iR`, lined up with the int32 word of the four matching int8
  activations, and one `dp4a` instruction multiplies and adds all four (the GEMV for M <= 4);
- read as uint8 tiles, the four 2-bit fields give four int8 tiles for `tl.dot` on the int8 tensor
  cores (M <= 64). For larger M the tensor cores are the limit, not the weight bytes: the weights
  are unpacked to int8 once per call and a plain int8 GEMM runs on them.

The codes are `t + 1` in {0, 1, 2}; `sum_k (t + 1) * x = sum_k t * x + sum_k x`, so every kernel
subtracts the activation row sum once instead of subtracting 1 from every weight. All integer
sums are exact in int32 (|sum| <= 128 * K < 2^31 for the K we accept); the scales are applied
once in the epilogue, in the same order as `reference.ternary_linear`.

Activations are quantized per token exactly as `quant.activations.quantize_activations` does
(`round(x * (127 / absmax))`, round half to even, absmax clamped to 1e-5; torch evaluates
`127 / absmax` as `reciprocal(absmax) * 127`, and so do we), optionally fused with the
RMSNorm that produces them, in `quantize_rows` and in the GEMV's own prologue (`fused_gemv`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from bitnet158.kernels import gpu_mma, gpu_wgmma
from bitnet158.quant.weights import SCALE_EPS

K_ALIGN = 128  # the K padding of our layout: every BLOCK_K of the tensor-core kernel divides it
MAX_K = 2**24  # |sum| <= 128 * K must stay below 2^31
# One row: the dp4a GEMV, which reads each weight word once and needs no tensor core. From 2 to
# `gpu_mma.MAX_M` rows on Hopper: the CUDA mma kernel (H100, 2B4T, four shapes per call: 34.9 us at 2 rows
# against the GEMV's 36.7, 35.4 at 4 against 49.3). Elsewhere the GEMV up to 4 rows.
GEMV_MAX_M = 4
# Up to 64 rows, tensor cores on weights unpacked in registers (the CUDA kernel on Hopper, Triton's elsewhere);
# above, an int8 GEMM.
MMA_MAX_M = 64
FUSED_MAX_K = 8192  # the fused norm GEMV keeps a whole row in registers
LAYOUT = "triton_w2a8"

# The interpreter (TRITON_INTERPRET=1, for debugging on a CPU) cannot run inline PTX.
_USE_PTX: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@functools.cache
def _early_launch(device: torch.device) -> dict:
    """Launch options that let a decode-step kernel start while the one before it finishes (programmatic
    dependent launch, Hopper and later): it loads what does not depend on its predecessor, then waits."""
    return {"launch_pdl": True} if _USE_PTX and torch.cuda.get_device_capability(device)[0] >= 9 else {}


@triton.jit
def _wait_for_previous_kernel():
    """Block until the kernel before this one has finished and its writes are visible; then let the next start."""
    if _USE_PTX:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _dp4a(a, b, acc):
    """acc + sum of the four signed byte products of int32 words a and b."""
    if _USE_PTX:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        for j in tl.static_range(4):
            acc += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def _rint(x):
    """Round half to even, as torch.round."""
    if _USE_PTX:
        return libdevice.rint(x)
    else:
        r = tl.floor(x + 0.5)
        return tl.where((r - x == 0.5) & (r % 2 != 0), r - 1.0, r)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """Round float32 `x` to `dtype` and back, as torch does after each op in that dtype."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _norm_stats(x_row, norm_ptr, K, eps, BLOCK: tl.constexpr):
    """RMSNorm of one row followed by per-token quantization: (1 / rms, 127 / absmax, absmax / 127).

    `norm(x) = weight * round(x * rsqrt(mean(x^2) + eps))`, each product rounded to x's dtype, as
    `model.bitnet.RMSNorm` computes it."""
    dtype: tl.constexpr = x_row.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        squares += x * x
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(squares, axis=0) / K + eps)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(norm_ptr + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        y = _round_to(w * _round_to(x * inv_rms, dtype), dtype)
        absmax = tl.maximum(absmax, tl.abs(y))
    absmax = tl.maximum(tl.max(absmax, axis=0), 1e-5)
    return inv_rms, tl.math.div_rn(1.0, absmax) * 127.0, absmax / 127.0


@triton.jit
def _plain_stats(x_row, K, BLOCK: tl.constexpr):
    """Per-token quantization of one row without a norm: (127 / absmax, absmax / 127)."""
    offs = tl.arange(0, BLOCK)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    absmax = tl.maximum(tl.max(absmax, axis=0), 1e-5)
    return tl.math.div_rn(1.0, absmax) * 127.0, absmax / 127.0


@triton.jit
def _codes(x, inv_rms, norm_w, qscale, NORM: tl.constexpr, dtype: tl.constexpr):
    """int32 codes in [-128, 127] of float32 activations `x` (normed first when NORM)."""
    if NORM:
        x = _round_to(norm_w * _round_to(x * inv_rms, dtype), dtype)
    codes = _rint(x * qscale)
    return tl.minimum(tl.maximum(codes, -128.0), 127.0).to(tl.int32)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, norm_ptr, codes_ptr, scale_ptr, sum_ptr, K, Kp, stride_x, stride_c, eps,
    NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: int8 codes `[Kp]` (zeros past K), scale and the codes' sum."""
    m = tl.program_id(0)
    x_row = x_ptr + m * stride_x
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    if NORM:
        inv_rms, qscale, scale = _norm_stats(x_row, norm_ptr, K, eps, BLOCK)
    else:
        inv_rms = 1.0
        qscale, scale = _plain_stats(x_row, K, BLOCK)
    offs = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, Kp, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        w = 1.0
        if NORM:
            w = tl.load(norm_ptr + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        codes = tl.where(mask, _codes(x, inv_rms, w, qscale, NORM, dtype), 0)
        total += codes
        tl.store(codes_ptr + m * stride_c + k0 + offs, codes.to(tl.int8), mask=k0 + offs < Kp)
    tl.store(scale_ptr + m, scale)
    tl.store(sum_ptr + m, tl.sum(total, axis=0))


@triton.jit
def _epilogue(
    acc0, acc1, acc2, acc3, m, rows, R, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, res_ptr, out_ptr,
    stride_res, stride_out, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, INT_OUT: tl.constexpr,
):
    """Store the four row blocks `rows + iR` of one output row `m` (acc_i are exact int32 dot products).

    EPILOGUE 0: out = x_scale * w_scale * acc (+ bias); 1: out = residual + that (may be in place);
    2: gate/up of a fused MLP (rows [gate; up], N = 4R): out[:N/2] = relu(gate)^2 * up."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    row_ok = rows < R
    if INT_OUT:
        tl.store(out_ptr + m * stride_out + rows, acc0, mask=row_ok & (rows < N))
        tl.store(out_ptr + m * stride_out + R + rows, acc1, mask=row_ok & (R + rows < N))
        tl.store(out_ptr + m * stride_out + 2 * R + rows, acc2, mask=row_ok & (2 * R + rows < N))
        tl.store(out_ptr + m * stride_out + 3 * R + rows, acc3, mask=row_ok & (3 * R + rows < N))
    else:
        vals0 = _scaled(acc0, rows, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS, dtype)
        vals1 = _scaled(acc1, R + rows, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS, dtype)
        vals2 = _scaled(acc2, 2 * R + rows, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS, dtype)
        vals3 = _scaled(acc3, 3 * R + rows, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS, dtype)
        if EPILOGUE == 2:
            # gate rows r and r + R pair with up rows r + 2R and r + 3R: both in this program.
            h0 = _round_to(_round_to(tl.maximum(vals0, 0.0) * tl.maximum(vals0, 0.0), dtype) * vals2, dtype)
            h1 = _round_to(_round_to(tl.maximum(vals1, 0.0) * tl.maximum(vals1, 0.0), dtype) * vals3, dtype)
            tl.store(out_ptr + m * stride_out + rows, h0.to(dtype), mask=row_ok)
            tl.store(out_ptr + m * stride_out + R + rows, h1.to(dtype), mask=row_ok)
        else:
            _store_block(vals0, rows, row_ok, m, N, res_ptr, out_ptr, stride_res, stride_out, EPILOGUE)
            _store_block(vals1, R + rows, row_ok, m, N, res_ptr, out_ptr, stride_res, stride_out, EPILOGUE)
            _store_block(vals2, 2 * R + rows, row_ok, m, N, res_ptr, out_ptr, stride_res, stride_out, EPILOGUE)
            _store_block(vals3, 3 * R + rows, row_ok, m, N, res_ptr, out_ptr, stride_res, stride_out, EPILOGUE)


@triton.jit
def _store_block(vals, cols, row_ok, m, N, res_ptr, out_ptr, stride_res, stride_out, EPILOGUE: tl.constexpr):
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    ok = row_ok & (cols < N)
    if EPILOGUE == 1:
        res = tl.load(res_ptr + m * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
        vals = _round_to(res + vals, dtype)
    tl.store(out_ptr + m * stride_out + cols, vals.to(dtype), mask=ok)


@triton.jit
def _scaled(acc, cols, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    w_scale = tl.load(w_scale_ptr + cols * w_scale_stride, mask=cols < N, other=0.0)
    vals = acc.to(tl.float32) * (x_scale * w_scale)
    if HAS_BIAS:
        vals += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    return _round_to(vals, dtype)


@triton.jit
def _gemv_kernel(
    x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    R, N, KW, stride_x, stride_out, w_scale_stride,
    HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """out[m, rows + iR] for BLOCK_R packed rows and one activation row m (grid: row blocks x M).

    `w_ptr` is the int32 view `[R, KW]` of our layout, `x_ptr` the int32 view of int8 codes `[M, KW]`
    with their scales at `x_scale_ptr`."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = tl.arange(0, BLOCK_KW)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * KW
    row_ok = rows[:, None] < R
    # Decode is bound by DRAM latency: each step requests the next chunk of weights before using this one,
    # and the first is requested before the kernel that writes the activations has finished.
    w = tl.load(w_rows + offs[None, :], mask=row_ok & (offs[None, :] < KW), other=0)
    _wait_for_previous_kernel()
    acc0 = tl.zeros([BLOCK_R, BLOCK_KW], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_KW], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_KW], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_KW], dtype=tl.int32)
    x_sum = tl.zeros([BLOCK_KW], dtype=tl.int32)
    for k0 in range(0, KW, BLOCK_KW):
        words = k0 + offs
        following = words + BLOCK_KW
        w_next = tl.load(w_rows + following[None, :], mask=row_ok & (following[None, :] < KW), other=0)
        a = tl.load(x_ptr + m * stride_x + words, mask=words < KW, other=0)
        a2 = tl.broadcast_to(a[None, :], [BLOCK_R, BLOCK_KW])
        acc0 = _dp4a(w & 0x03030303, a2, acc0)
        acc1 = _dp4a((w >> 2) & 0x03030303, a2, acc1)
        acc2 = _dp4a((w >> 4) & 0x03030303, a2, acc2)
        acc3 = _dp4a((w >> 6) & 0x03030303, a2, acc3)
        x_sum = _dp4a(tl.full([BLOCK_KW], 0x01010101, tl.int32), a, x_sum)
        w = w_next
    total = tl.sum(x_sum, axis=0)
    _epilogue(
        tl.sum(acc0, axis=1) - total, tl.sum(acc1, axis=1) - total, tl.sum(acc2, axis=1) - total,
        tl.sum(acc3, axis=1) - total, m, rows, R, N, tl.load(x_scale_ptr + m), w_scale_ptr, w_scale_stride,
        bias_ptr, out_ptr, out_ptr, 0, stride_out, HAS_BIAS, 0, INT_OUT,
    )


@triton.jit
def _fused_gemv_kernel(
    x_ptr, norm_ptr, w_ptr, w_scale_ptr, res_ptr, out_ptr,
    R, N, K, KW, stride_x, stride_res, stride_out, w_scale_stride, eps,
    EPILOGUE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """`linear(quantize(rmsnorm(x)))` for BLOCK_R packed rows and one row m of x, the whole row in one
    chunk (KW <= BLOCK_KW). `x_ptr` holds the float activations `[M, K]` before the RMSNorm of weight
    `norm_ptr`. Each program reads that row once (from L2, it is small), computes the norm's statistics
    and the int8 codes itself, so no quantization kernel runs in between."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    words = tl.arange(0, BLOCK_KW)
    # The weights are requested first, even before the kernel that writes x has finished.
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * KW + words[None, :],
                mask=(rows[:, None] < R) & (words[None, :] < KW), other=0)
    _wait_for_previous_kernel()
    byte = tl.arange(0, 4)
    cols = words[:, None] * 4 + byte[None, :]
    ok = cols < K
    x = tl.load(x_ptr + m * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    norm_w = tl.load(norm_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(x * x, axis=1), axis=0) / K + eps)
    y = _round_to(norm_w * _round_to(x * inv_rms, dtype), dtype)
    absmax = tl.maximum(tl.max(tl.max(tl.abs(y), axis=1), axis=0), 1e-5)
    codes = tl.where(ok, _codes(y, 1.0, 1.0, tl.math.div_rn(1.0, absmax) * 127.0, False, dtype), 0)
    a = tl.sum((codes & 0xFF) << (8 * byte[None, :]), axis=1)  # four int8 codes in one word
    a2 = tl.broadcast_to(a[None, :], [BLOCK_R, BLOCK_KW])
    total = tl.sum(_dp4a(tl.full([BLOCK_KW], 0x01010101, tl.int32), a, tl.zeros([BLOCK_KW], tl.int32)), axis=0)
    zero = tl.zeros([BLOCK_R, BLOCK_KW], dtype=tl.int32)
    _epilogue(
        tl.sum(_dp4a(w & 0x03030303, a2, zero), axis=1) - total,
        tl.sum(_dp4a((w >> 2) & 0x03030303, a2, zero), axis=1) - total,
        tl.sum(_dp4a((w >> 4) & 0x03030303, a2, zero), axis=1) - total,
        tl.sum(_dp4a((w >> 6) & 0x03030303, a2, zero), axis=1) - total,
        m, rows, R, N, absmax / 127.0, w_scale_ptr, w_scale_stride, w_scale_ptr, res_ptr, out_ptr,
        stride_res, stride_out, False, EPILOGUE, False,
    )


@triton.jit
def _grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid`, in the usual grouped order: the programs of a group of
    GROUP_M tile rows run together and share their weight tiles through L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _mma_kernel(
    a_ptr, a_scale_ptr, a_sum_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
    M, R, N, Kp, K_SPLIT, stride_a, stride_out, w_scale_stride,
    HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Small M on int8 tensor cores: `[BLOCK_M, BLOCK_K]` codes times four unpacked `[BLOCK_K, BLOCK_R]`
    weight tiles per step, so one program produces `BLOCK_M x 4 BLOCK_R` outputs.

    Program (tile, split) covers K_SPLIT columns of K (a multiple of BLOCK_K). A tile's sums would
    otherwise need one long serial walk over K, so its splits run side by side: each stores its int32
    partial sums, and the last to arrive (a counter per tile, reset for the next call) adds them up
    and writes the output."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    pid_m, pid_r = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(R, BLOCK_R), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = split * K_SPLIT
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a + k_start + offs_k[None, :]
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * Kp + k_start + offs_k[None, :]
    m_ok = offs_m[:, None] < M
    r_ok = rows[:, None] < R
    acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    for _ in range(k_start, tl.minimum(k_start + K_SPLIT, Kp), BLOCK_K):
        a = tl.load(a_ptrs, mask=m_ok, other=0)
        w = tl.load(w_ptrs, mask=r_ok, other=0)
        acc0 = tl.dot(a, tl.trans((w & 3).to(tl.int8)), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(a, tl.trans(((w >> 2) & 3).to(tl.int8)), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(a, tl.trans(((w >> 4) & 3).to(tl.int8)), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(a, tl.trans((w >> 6).to(tl.int8)), acc3, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    last = True
    if splits > 1:
        size: tl.constexpr = BLOCK_M * BLOCK_R
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        own = part_ptr + (split * tl.num_programs(0) + pid).to(tl.int64) * (4 * size)
        tl.store(own + tile, acc0)
        tl.store(own + size + tile, acc1)
        tl.store(own + 2 * size + tile, acc2)
        tl.store(own + 3 * size + tile, acc3)
        # The release/acquire of the counter orders every split's stores before the last one's loads.
        last = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == splits - 1
        if last:
            tl.store(count_ptr + pid, 0)
            acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
            acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
            acc3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
            for s in range(0, splits):
                part = part_ptr + (s * tl.num_programs(0) + pid).to(tl.int64) * (4 * size)
                acc0 += tl.load(part + tile, cache_modifier=".cg")
                acc1 += tl.load(part + size + tile, cache_modifier=".cg")
                acc2 += tl.load(part + 2 * size + tile, cache_modifier=".cg")
                acc3 += tl.load(part + 3 * size + tile, cache_modifier=".cg")
    if last:
        a_sum = tl.load(a_sum_ptr + offs_m, mask=offs_m < M, other=0)[:, None]
        x_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
        out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_out
        ok = m_ok & (rows < R)[None, :]
        _store_tile(acc0 - a_sum, rows, ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, out_rows,
                    HAS_BIAS, INT_OUT)
        _store_tile(acc1 - a_sum, R + rows, ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, out_rows,
                    HAS_BIAS, INT_OUT)
        _store_tile(acc2 - a_sum, 2 * R + rows, ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, out_rows,
                    HAS_BIAS, INT_OUT)
        _store_tile(acc3 - a_sum, 3 * R + rows, ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, out_rows,
                    HAS_BIAS, INT_OUT)


@triton.jit
def _unpack_kernel(w_ptr, out_ptr, R, KW, BLOCK_R: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Our layout `[R, Kp]` to int8 weights `[4R, Kp]` in {-1, 0, 1} (row r + iR from bit field i), four
    bytes per int32 word (`w_ptr`, `out_ptr` are int32 views, KW = Kp / 4): a byte at a time, the kernel
    was bound by its instruction count rather than by its bytes. A field's codes c in {0, 1, 2} become
    c - 1 with no borrow from one byte into the next: c + 127 stays under 256, and flipping its top bit
    subtracts 128."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    words = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    ok = (rows[:, None] < R) & (words[None, :] < KW)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * KW + words[None, :], mask=ok, other=0)
    # The weights were read while the kernel before ends; `out_ptr` may be memory it still reads.
    _wait_for_previous_kernel()
    for i in tl.static_range(4):
        dst = out_ptr + (i * R + rows[:, None]).to(tl.int64) * KW + words[None, :]
        tl.store(dst, (((w >> (2 * i)) & 0x03030303) + 0x7F7F7F7F) ^ -0x7F7F7F80, mask=ok)  # 0x80808080


@triton.jit
def _int8_gemm_kernel(
    a_desc, a_scale_ptr, b_desc, w_scale_ptr, bias_ptr, out_ptr,
    M, NB, N, Kp, stride_out, w_scale_stride, first_tile,
    HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Large M: a plain int8 GEMM of the codes `[M, Kp]` and the unpacked weights `[NB, Kp]` (NB = 4R),
    whose tiles the copy engine (TMA, through the tensor descriptors) brings from memory for the tensor cores;
    the scales in the epilogue. The copy engine fills rows past the end with zeros.

    The output is cut into TILE_M x TILE_N tiles in grouped order. Program p computes one BLOCK_M x BLOCK_N
    piece of tile `first_tile + p // pieces`: one piece per tile in the GEMM's full waves, several in a last,
    short wave (see `_tiles_in_full_waves`)."""
    per_m: tl.constexpr = TILE_M // BLOCK_M
    per_n: tl.constexpr = TILE_N // BLOCK_N
    pid = tl.program_id(0)
    tile_m, tile_n = _grouped_tile(first_tile + pid // (per_m * per_n), tl.cdiv(M, TILE_M), tl.cdiv(NB, TILE_N),
                                   GROUP_M)
    piece = pid % (per_m * per_n)
    first_m = (tile_m * per_m + piece // per_n) * BLOCK_M
    first_n = (tile_n * per_n + piece % per_n) * BLOCK_N
    _wait_for_previous_kernel()  # the unpacking of the weights, or the GEMM's full waves
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, Kp, BLOCK_K):
        acc = tl.dot(a_desc.load([first_m, k]), b_desc.load([first_n, k]).T, acc, out_dtype=tl.int32)
    offs_m = first_m + tl.arange(0, BLOCK_M)
    x_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    out_rows = out_ptr + offs_m[:, None].to(tl.int64) * stride_out
    ok = offs_m[:, None] < M
    _store_tile(acc, first_n + tl.arange(0, BLOCK_N), ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr,
                out_rows, HAS_BIAS, INT_OUT)


@triton.jit
def _store_tile(acc, cols, ok, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, out_rows,
                HAS_BIAS: tl.constexpr, INT_OUT: tl.constexpr):
    cols = cols[None, :]
    ok = ok & (cols < N)
    if INT_OUT:
        tl.store(out_rows + cols, acc, mask=ok)
    else:
        dtype: tl.constexpr = out_rows.dtype.element_ty
        vals = _scaled(acc, cols, N, x_scale, w_scale_ptr, w_scale_stride, bias_ptr, HAS_BIAS, dtype)
        tl.store(out_rows + cols, vals.to(dtype), mask=ok)


# ----------------------------------------------------------------------------------------------
# Python side


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def check_shape(packed: torch.Tensor, out_features: int, in_features: int) -> None:
    """Reject what the 2-bit format cannot hold, before any kernel runs."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed ternary weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if in_features < 1 or out_features < 1:
        raise ValueError(f"a ternary linear needs at least one input and one output, got {in_features}->{out_features}")
    if in_features > MAX_K:
        raise ValueError(f"in_features {in_features} is over {MAX_K}: the int32 sums could overflow")
    if packed.shape[1] != in_features or packed.shape[0] != -(-out_features // 4):
        raise ValueError(
            f"packed weight {tuple(packed.shape)} does not hold a {in_features}->{out_features} layer "
            f"(expected {(-(-out_features // 4), in_features)})"
        )


def repack(packed: torch.Tensor) -> torch.Tensor:
    """Our layout: the packed bytes, contiguous, K zero-padded to a multiple of 128 (a view when it already is)."""
    rows, k = packed.shape
    kp = padded_k(k)
    if kp == k and packed.is_contiguous():
        return packed
    out = torch.zeros(rows, kp, dtype=torch.uint8, device=packed.device)
    out[:, :k] = packed
    return out


def quantize_rows(
    x: torch.Tensor, kp: int | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of `x [M, K]` (after RMSNorm with `norm_weight` if given).

    Returns codes int8 `[M, kp]` (zeros past K), scales float32 `[M]` and the codes' row sums int32 `[M]`.
    """
    m, k = x.shape
    kp = padded_k(k) if kp is None else kp
    x = x.contiguous()
    codes = torch.empty(m, kp, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    sums = torch.empty(m, dtype=torch.int32, device=x.device)
    if m:
        norm = norm_weight.contiguous() if norm_weight is not None else x
        _quantize_rows_kernel[(m,)](
            x, norm, codes, scale, sums, k, kp, x.stride(0), codes.stride(0), eps,
            NORM=norm_weight is not None, BLOCK=1024, num_warps=4,
        )
    return codes, scale, sums


# Block sizes picked by `benchmarks/gpu_kernels.py --sweep` on the H100 for the 2B4T shapes.
def _gemv_config(r: int, kw: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_KW, num_warps) of the plain GEMV."""
    if r >= 2048:  # enough programs to fill the GPU: small chunks, the next one always in flight
        return 2, 256, 2
    # One chunk per row where it fits (K <= 4096), so every weight load of a program is in flight at once.
    return (2, 1024, 4) if kw <= 1024 else (1, 1024, 4)


def _fused_config(r: int, kw: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_KW, num_warps) of the fused GEMV: BLOCK_KW holds the whole row."""
    return 4, triton.next_power_of_2(kw), 4


def _mma_config(m: int, r: int, kp: int, device: torch.device) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_K, num_warps, num_stages, K splits) of the small-M tensor-core kernel:
    enough splits that about `4 (M <= 16) or 2` programs per multiprocessor read weights."""
    block_m, block_r, per_sm = (16, 32, 4) if m <= 16 else (64, 16, 2)
    block_k = 256 if kp % 256 == 0 else 128  # BLOCK_K must divide Kp
    tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    splits = max(1, min(kp // block_k, round(per_sm * _sm_count(device) / tiles)))
    return block_m, block_r, block_k, 4, 1, splits


def _gemm_config(kp: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the large-M int8 GEMM. Long rows take tiles twice
    as wide: more work per tile for each load of activations (H100, 2,048 rows, 2B4T down: 81.1 against 89.6 us;
    gate+up, K = 2,560: 172.6 against 153.1)."""
    return (128, 256, 128, 8, 3) if kp >= 4096 else (128, 128, 128, 4, 3)


# A GEMM whose last wave would hold few tiles runs them as a second grid of smaller pieces spread over all the
# multiprocessors: a tile alone on one runs far below its share of the tensor cores (H200, 2B4T o at 2,048 rows:
# 264 tiles in 14 us, the last 56 in 12 more). With 64 x 64 pieces, 5 loads deep, unpacking included: o 32.7
# against 35.1 us, down 79.1 against 92.4, the four shapes back to back 277.1-277.9 against 291.1-291.3. Cutting
# a fuller last wave lost (qkv's 216 tiles: 51 against 37 us without unpacking).
TAIL_PIECE = 64
TAIL_STAGES = 5
UNPACK_BLOCK = (16, 64)  # (packed rows, int32 words of K) per program of the unpacking
# Token tiles per group in the GEMM's tile order. 16 at 2,048 rows: each weight tile is read from memory once
# per call, not once per group of 8 (H100, the four 2B4T shapes back to back: 287.8-288.4 against 292.7-293.6 us
# with 8, three runs each alternating; 4 took 306.1 in `benchmarks/gemm_knobs.py`).
GEMM_GROUP_M = 16


def _tiles_in_full_waves(tiles: int, config: tuple[int, ...], device: torch.device) -> int:
    """How many of the GEMM's tiles its first grid takes: all of them, unless the GEMM has at least one full wave
    and its last wave would hold at most a tile per two multiprocessors; those are then cut into pieces."""
    block_m, block_n, block_k, _, stages = config
    # Blocks per multiprocessor, as its shared memory allows (the tiles' pipeline, plus 1 KB the GPU reserves).
    per_sm = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor // (
        stages * (block_m + block_n) * block_k + 1024)
    slots = max(1, per_sm) * _sm_count(device)
    last_wave = tiles % slots
    if tiles < slots or 2 * last_wave > _sm_count(device):
        return tiles
    return tiles - last_wave


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Scratch for the split tensor-core kernel, one per (device, stream). Its counters are zero between
# calls: the last program of each tile resets its own. Outgrown scratch is kept, never freed: a CUDA
# graph captured with it replays with it, and freed memory could be reused by the graph for other data.
_split_scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown_scratch: list[tuple[torch.Tensor, torch.Tensor]] = []


def _scratch(device: torch.device, partial_sums: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    held = _split_scratch.get(key)
    if held is None or held[0].numel() < partial_sums or held[1].numel() < tiles:
        if held is not None:  # grow, never shrink
            partial_sums, tiles = max(partial_sums, held[0].numel()), max(tiles, held[1].numel())
            _outgrown_scratch.append(held)
        held = (torch.empty(partial_sums, dtype=torch.int32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
        _split_scratch[key] = held
    return held


def w2a8_matmul(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    code_sums: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: torch.Tensor | None = None,
    int_out: bool = False,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """`codes [M, Kp] (int8) @ W^T` for a weight in our layout `[R, Kp]`, scaled to `out_dtype`
    (or the exact int32 dot products with `int_out`). Picks the CUDA wgmma kernel where `gpu_wgmma.picked` says
    so (Hopper, the 2B4T shapes, 33 rows and up); else the dp4a GEMV for one row, the CUDA mma kernel for 2 to 64
    rows on Hopper (elsewhere the GEMV up to 4 rows and Triton's tensor cores on weights unpacked in registers up
    to 64), and unpacking plus an int8 GEMM above.
    `config` overrides the block sizes of the Triton kernels (for tuning): see `_gemv_config`, `_mma_config`
    and `_gemm_config`."""
    m, kp = codes.shape
    r = weight.shape[0]
    if weight.shape[1] != kp or kp % K_ALIGN or not ROWS_OK(r, out_features):
        raise ValueError(f"codes {tuple(codes.shape)} do not fit a repacked weight {tuple(weight.shape)}")
    out = torch.empty(m, out_features, dtype=torch.int32 if int_out else out_dtype, device=codes.device)
    if m == 0:
        return out
    w_scale_stride = 0 if weight_scale.numel() == 1 else 1
    bias_arg = bias if bias is not None else weight_scale
    wgmma_config = config is None and gpu_wgmma.available(codes.device) and gpu_wgmma.picked(
        m, r, kp, _sm_count(codes.device))
    if wgmma_config:
        return gpu_wgmma.w2a8_wgmma(codes, x_scale, code_sums, weight, weight_scale, out, bias, wgmma_config)
    if config is None and 1 < m <= gpu_mma.MAX_M and gpu_mma.available(codes.device):
        return gpu_mma.w2a8_mma(codes, x_scale, code_sums, weight, weight_scale, out, bias)
    if m <= GEMV_MAX_M:
        block_r, block_kw, warps = config or _gemv_config(r, kp // 4)
        _gemv_kernel[(triton.cdiv(r, block_r), m)](
            codes.view(torch.int32), x_scale, weight.view(torch.int32), weight_scale, bias_arg, out,
            r, out_features, kp // 4, kp // 4, out.stride(0), w_scale_stride,
            HAS_BIAS=bias is not None, INT_OUT=int_out, BLOCK_R=block_r, BLOCK_KW=block_kw, num_warps=warps,
            **_early_launch(codes.device),
        )
        return out
    if m <= MMA_MAX_M:
        block_m, block_r, block_k, warps, stages, splits = config or _mma_config(m, r, kp, codes.device)
        _check_block_k(block_k, kp)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
        k_split = triton.cdiv(kp // block_k, splits) * block_k
        splits = triton.cdiv(kp, k_split)
        partial, counters = _scratch(codes.device, splits * tiles * 4 * block_m * block_r if splits > 1 else 1, tiles)
        _mma_kernel[(tiles, splits)](
            codes, x_scale, code_sums, weight, weight_scale, bias_arg, out, partial, counters,
            m, r, out_features, kp, k_split, codes.stride(0), out.stride(0), w_scale_stride,
            HAS_BIAS=bias is not None, INT_OUT=int_out,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages,
        )
        return out
    # Large M is bound by the tensor cores, not by the weight bytes: unpacking to int8 once per call
    # (4x the bytes, read back from L2 and memory) lets the GEMM feed the tensor cores straight from memory.
    # (A GEMM that unpacks each weight tile in registers took 1.5x as long on the H200.) Each kernel starts
    # while the one before it ends, and waits for it: the unpacking reads its weights during the last wave
    # of the GEMM before it, the GEMM sets up during the unpacking.
    block_m, block_n, block_k, warps, stages = config or _gemm_config(kp)
    _check_block_k(block_k, kp)
    unpacked = torch.empty(4 * r, kp, dtype=torch.int8, device=codes.device)
    unpack_r, unpack_kw = UNPACK_BLOCK
    _unpack_kernel[(triton.cdiv(r, unpack_r), triton.cdiv(kp // 4, unpack_kw))](
        weight.view(torch.int32), unpacked.view(torch.int32), r, kp // 4, BLOCK_R=unpack_r, BLOCK_KW=unpack_kw,
        **_early_launch(codes.device))
    if codes.stride(1) != 1 or codes.stride(0) % 16 or codes.data_ptr() % 16:  # what the copy engine reads
        codes = codes.clone(memory_format=torch.contiguous_format)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(4 * r, block_n)
    full_tiles = _tiles_in_full_waves(tiles, (block_m, block_n, block_k, warps, stages), codes.device)
    meta = dict(HAS_BIAS=bias is not None, INT_OUT=int_out, TILE_M=block_m, TILE_N=block_n, BLOCK_K=block_k,
                GROUP_M=GEMM_GROUP_M, **_early_launch(codes.device))

    def launch(grid: int, first_tile: int, piece_m: int, piece_n: int, num_warps: int, num_stages: int) -> None:
        _int8_gemm_kernel[(grid,)](
            TensorDescriptor.from_tensor(codes, [piece_m, block_k]), x_scale,
            TensorDescriptor.from_tensor(unpacked, [piece_n, block_k]), weight_scale, bias_arg, out,
            m, 4 * r, out_features, kp, out.stride(0), w_scale_stride, first_tile,
            BLOCK_M=piece_m, BLOCK_N=piece_n, num_warps=num_warps, num_stages=num_stages, **meta)

    launch(full_tiles, 0, block_m, block_n, warps, stages)
    if full_tiles < tiles:
        piece_m, piece_n = min(block_m, TAIL_PIECE), min(block_n, TAIL_PIECE)
        pieces = (tiles - full_tiles) * (block_m // piece_m) * (block_n // piece_n)
        launch(pieces, full_tiles, piece_m, piece_n, 4, TAIL_STAGES)
    return out


def _check_block_k(block_k: int, kp: int) -> None:
    if kp % block_k:  # the tensor-core loops read whole BLOCK_K steps
        raise ValueError(f"BLOCK_K {block_k} does not divide the padded K {kp}")


def ROWS_OK(r: int, n: int) -> bool:  # noqa: N802 - reads as a predicate on the shape
    return 4 * (r - 1) < n <= 4 * r


EPILOGUES = {"none": 0, "residual": 1, "relu2_gate_up": 2}


def fused_gemv(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    epilogue: str = "none",
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """One kernel for `linear(quantize(rmsnorm(x)))` on few rows `x [M, K]` (decode), with an epilogue:

    - "none": the linear's output `[M, N]`;
    - "residual": `residual + linear(...)`, written into `out` (which may be `residual` itself);
    - "relu2_gate_up": for a fused gate/up layer (rows `[gate; up]`), `relu(gate)^2 * up`, `[M, N / 2]`.

    `config` overrides the block sizes (for tuning), as in `w2a8_matmul`.
    """
    m, k = x.shape
    r, kp = weight.shape
    code = EPILOGUES[epilogue]
    if code == 2 and out_features % 4:
        raise ValueError(f"the fused gate/up epilogue needs 4 | out_features, got {out_features}")
    if k > FUSED_MAX_K:
        raise ValueError(f"the fused norm GEMV holds rows of at most {FUSED_MAX_K} inputs, got {k}")
    block_r, block_kw, warps = config or _fused_config(r, kp // 4)
    if 4 * block_kw < k:
        raise ValueError(f"BLOCK_KW {block_kw} does not hold a row of {k} inputs")
    if out is None:
        width = out_features // 2 if code == 2 else out_features
        out = torch.empty(m, width, dtype=x.dtype, device=x.device)
    res = residual if residual is not None else out
    _fused_gemv_kernel[(triton.cdiv(r, block_r), m)](
        x, norm_weight, weight.view(torch.int32), weight_scale, res, out,
        r, out_features, k, kp // 4, x.stride(0), res.stride(0), out.stride(0),
        0 if weight_scale.numel() == 1 else 1, eps,
        EPILOGUE=code, BLOCK_R=block_r, BLOCK_KW=block_kw, num_warps=warps, **_early_launch(x.device),
    )
    return out


def layer_weight(layer) -> torch.Tensor:
    """A `PackedBitLinear`'s weight in our layout, repacked once and cached on the layer."""
    check_shape(layer.weight, layer.out_features, layer.in_features)
    return layer.repacked(LAYOUT, repack)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """`PackedBitLinear` forward on a CUDA device: quantize (one kernel), then the W2A8 matmul."""
    weight = layer_weight(layer)
    lead = x.shape[:-1]
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input of width {x.shape[-1]} for a layer of {layer.in_features} inputs")
    flat = x.reshape(-1, layer.in_features)
    codes, scale, sums = quantize_rows(flat, weight.shape[1])
    out = w2a8_matmul(codes, scale, sums, weight, layer.weight_scale, layer.out_features, x.dtype, layer.bias)
    return out.reshape(*lead, layer.out_features)


__all__ = [
    "SCALE_EPS", "check_shape", "fused_gemv",
    "layer_weight", "linear", "quantize_rows", "repack", "w2a8_matmul",
]
