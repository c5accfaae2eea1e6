"""Fused Triton kernels for training `BitLinear` on CUDA: quantization fused with the matmuls.

The layer computes `y = q8(x) @ q3(W)^T` with straight-through gradients, where `q8` is per-token int8 absmax
(`x ≈ codes_x · absmax/127`) and `q3` ternary absmean (`W ≈ s · codes_w`, codes in {-1, 0, 1}). Instead of
materializing fake-quantized copies of `x` and `W` in bf16 (what the reference does), the forward GEMM
quantizes on the fly:
- forward, `y = (codes_x @ codes_w^T) · absmax/127 · s`: the `x` tiles are rounded to int8 as they are loaded
  and multiplied by the int8 weight codes on int8 tensor cores (int32 accumulation), the scales applied in the
  epilogue. Before it, one pass over `x` finds each row's absmax, and one pass over `W` writes its codes.
- backward (straight through): `dx = dy @ (s · codes_w)` and `dW = dy^T @ q8(x)` on cuBLAS, `q8(x)` made
  by one Triton pass from the saved `x` and its row absmax.
Saved for the backward pass: `x` (as `nn.Linear` saves it), the row absmax and the int8 weight codes.

`bitlinear_train(x, weight, bias)` is what `BitLinear.fused` is set to; it is a `torch.library` custom op, so
`torch.compile` keeps it whole. It matches `F.linear(fake_quant_activations(x), fake_quant_ternary(W))`
computed in the same dtype to within bf16 rounding (see tests/test_training_triton.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

EPS = 1e-5  # as bitnet158.quant.weights.SCALE_EPS
SCALE_EPS = tl.constexpr(EPS)  # the same, for use inside kernels


@triton.jit
def _rint_libdevice(x):
    return libdevice.rint(x)  # round half to even, as torch.round


@triton.jit
def _rint_portable(x):
    """Round half to even without libdevice (which Triton's CPU interpreter lacks)."""
    r = tl.floor(x + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter, for debugging the kernels
_rint = _rint_portable if INTERPRETING else _rint_libdevice


# --- quantization passes -----------------------------------------------------------------------------------------


@triton.jit
def _row_absmax_kernel(x_ptr, out_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    tl.store(out_ptr + row, tl.maximum(tl.max(acc, axis=0), SCALE_EPS))


@triton.jit
def _ternary_codes_kernel(w_ptr, scale_ptr, codes_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.load(scale_ptr)
    codes = tl.minimum(tl.maximum(_rint(w * inv), -1.0), 1.0)
    tl.store(codes_ptr + offs, codes.to(tl.int8), mask=mask)


@triton.jit
def _fake_quant_rows_kernel(x_ptr, absmax_ptr, out_ptr, K, stride_xm, stride_om, BLOCK_K: tl.constexpr):
    """out = round(x · 127/absmax) · absmax/127, row by row: q8(x) as the straight-through backward needs it."""
    row = tl.program_id(0)
    absmax = tl.load(absmax_ptr + row)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(x * (127.0 / absmax)), -128.0), 127.0) * (absmax / 127.0)
        tl.store(out_ptr + row * stride_om + offs, q.to(out_ptr.dtype.element_ty), mask=offs < K)


def fake_quant_rows(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty_like(x)
    _fake_quant_rows_kernel[(m,)](x, absmax, out, k, x.stride(0), out.stride(0),
                                  BLOCK_K=min(triton.next_power_of_2(k), 4096), num_warps=4)  # fmt: skip
    return out


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty(m, device=x.device, dtype=torch.float32)
    _row_absmax_kernel[(m,)](x, out, k, x.stride(0), BLOCK_K=min(triton.next_power_of_2(k), 4096), num_warps=4)
    return out


def ternary_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes `[N, K]` and the scale `s = mean|W|` (a 1-element fp32 tensor)."""
    weight = weight.contiguous()
    scale = weight.float().abs().mean().clamp(min=EPS).reshape(1)
    codes = torch.empty(weight.shape, device=weight.device, dtype=torch.int8)
    block = 4096
    _ternary_codes_kernel[(triton.cdiv(weight.numel(), block),)](weight, scale, codes, weight.numel(), BLOCK=block)
    return codes, scale


# --- GEMMs -------------------------------------------------------------------------------------------------------


def _configs(int8: bool) -> list[triton.Config]:
    block_k = 128 if int8 else 64
    if INTERPRETING:  # one config: the interpreter cannot benchmark
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": block_k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4))
    ]


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order, so that consecutive programs share rows of A in L2."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_configs(int8=True), key=["M", "N", "K"])
@triton.jit
def _forward_kernel(
    x_ptr, absmax_ptr, codes_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_cn, stride_ck, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[m, n] = sum_k round(x[m, k] · 127/absmax[m]) · codes[n, k] · absmax[m]/127 · s (+ bias[n])."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    absmax = tl.load(absmax_ptr + rm, mask=rm < M, other=1.0)
    inv = (127.0 / absmax)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        kk = k + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # fmt: skip
        xq = tl.minimum(tl.maximum(_rint(x.to(tl.float32) * inv), -128.0), 127.0).to(tl.int8)
        w = tl.load(codes_ptr + rn[None, :] * stride_cn + kk[:, None] * stride_ck,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0)  # fmt: skip
        acc = tl.dot(xq, w, acc, out_dtype=tl.int32)
    y = acc.to(tl.float32) * (absmax / 127.0)[:, None] * tl.load(scale_ptr)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))  # fmt: skip


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


# --- the custom op -----------------------------------------------------------------------------------------------


@torch.library.custom_op("bitnet158_train::bitlinear_forward", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, absmax of x's rows, weight codes, weight scale) for 2-D `x` `[M, K]`."""
    m, k = x.shape
    n = weight.shape[0]
    absmax = row_absmax(x)
    codes, scale = ternary_codes(weight)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _forward_kernel[_grid(m, n)](
        x, absmax, codes, scale, bias if bias is not None else scale, y, m, n, k,
        x.stride(0), x.stride(1), codes.stride(0), codes.stride(1), y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
    )  # fmt: skip
    return y, absmax, codes, scale


@_forward.register_fake
def _(x, weight, bias):
    m, n = x.shape[0], weight.shape[0]
    return (x.new_empty(m, n), x.new_empty(m, dtype=torch.float32), weight.new_empty(weight.shape, dtype=torch.int8),
            x.new_empty(1, dtype=torch.float32))  # fmt: skip


@torch.library.custom_op("bitnet158_train::bitlinear_backward", mutates_args=())
def _backward(
    dy: torch.Tensor, x: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW) through the straight-through estimator, on cuBLAS: `dx = dy @ (s · codes_w)` and
    `dW = dy^T @ q8(x)`. (Triton versions of these two GEMMs quantizing on the fly lost to cuBLAS at training
    shapes: dW's output is small and its reduction over tokens long.)"""
    weight_q = codes.to(dy.dtype) * scale.to(dy.dtype)
    dx = torch.mm(dy, weight_q)
    dw = torch.mm(dy.t(), fake_quant_rows(x, absmax)).float()
    return dx, dw


@_backward.register_fake
def _(dy, x, absmax, codes, scale):
    return torch.empty_like(x), codes.new_empty(codes.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    _, absmax, codes, scale = output
    ctx.save_for_backward(x, absmax, codes, scale)
    ctx.weight_dtype = weight.dtype
    ctx.has_bias = bias is not None


def _autograd_backward(ctx, dy, _absmax, _codes, _scale):
    x, absmax, codes, scale = ctx.saved_tensors
    dx, dw = _backward(dy, x, absmax, codes, scale)
    dbias = dy.float().sum(0).to(dy.dtype) if ctx.has_bias else None
    return dx, dw.to(ctx.weight_dtype), dbias


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def bitlinear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`BitLinear`'s training forward (λ = 1) on CUDA, in the autocast dtype when autocast is on."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    with torch.autocast("cuda", enabled=False):
        x2d = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        b = bias.to(dtype) if bias is not None else None
        y = _forward(x2d, weight, b)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])
