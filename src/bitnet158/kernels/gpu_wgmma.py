"""The W2A8 kernel on Hopper's warpgroup tensor cores (`w2a8_wgmma.cu`): the copy engine brings packed
weights and int8 activations into shared memory, each lane unpacks its A fragment from there into registers,
and wgmma multiplies it with the activations in shared memory; the splits of K of a tile add up through the
shared memory of a thread-block cluster. Each (rows, tokens, stages, splits, warpgroups) variant is compiled the
first time it is used, by NVRTC, for sm_90a (wgmma exists on no other target)."""

from __future__ import annotations

import ctypes
import functools

import torch

from bitnet158.kernels import cuda_driver
from bitnet158.kernels.gpu_mma import OUT_KINDS

CHUNK = 128  # bytes of K per pipeline stage: the padded K must be a multiple


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run here: wgmma needs compute capability 9.0 exactly (sm_90a code), and the NVRTC
    entry point (`torch.cuda._compile_kernel`) a recent PyTorch."""
    return (device.type == "cuda" and hasattr(torch.cuda, "_compile_kernel")
            and torch.cuda.get_device_capability(device) == (9, 0))


def threads(warpgroups: int) -> int:
    """The consumer warpgroups and the producer warp."""
    return 128 * warpgroups + 32


def shared_bytes(rows: int, tokens: int, stages: int) -> int:
    """Dynamic shared memory of a block (as `w2a8_wgmma.cu` lays it out): the pipeline's stages, or the int32
    sums tile that reuses them, 1 KB to align them, the barriers, and the scales of the output."""
    data = max(stages * (rows + tokens) * CHUNK, tokens * (4 * rows + 4) * 4)
    return data + 1024 + 16 * stages + (8 * rows + 2 * tokens) * 4


Config = tuple[int, int, int, int, int]


@functools.cache
def _kernel(rows: int, tokens: int, stages: int, splits: int, warpgroups: int):
    name = f"w2a8_wgmma<{rows}, {tokens}, {stages}, {splits}, {warpgroups}>"
    kernel = cuda_driver.compile_kernel("w2a8_wgmma.cu", name, "90a")
    cuda_driver.allow_shared_bytes(kernel, shared_bytes(rows, tokens, stages))
    return kernel


def plan(m: int, r: int, kp: int) -> Config:
    """(packed rows per block, tokens per block, stages, K splits, consumer warpgroups) where no config is given
    or picked: up to 64 rows, blocks of 16 packed rows with K split about as far as fills 132 multiprocessors;
    above, blocks of 16 packed rows and 128 tokens (several to a multiprocessor)."""
    if m <= 64:
        return 16, 64, 4, max(1, min(8, round(132 / -(-r // 16)), kp // CHUNK // 4)), 1
    return 16, 128, 4, 1, 1


# Where w2a8_matmul picks this kernel: (packed rows, padded K) of a 2B4T shape -> [(fewest rows, most rows,
# config)], on GPUs of 132 multiprocessors (H100, H200). Chosen with the four shapes back to back (H100): from 33
# to 64 rows all four on this kernel beat the mma.sync kernel (M = 64 37.3 against 44.5 us, M = 33 37.4 against
# 38.2), each shape alone lost at 32 rows and below; above 64 rows it beat unpacking plus the int8 GEMM on every
# shape at 128 and 512 rows, on o and down only at 2,048 and on none at 8,192 (`benchmarks/gpu_kernels.py
# --wgmma-pick`; the configs from `--sweep`). down at 33 to 64 rows: two warpgroups taking turns over K in each of
# 2 splits, where one warpgroup in each of 4 splits was picked before (M = 64 back to back 36.90, 37.01 against
# 37.34, 37.42 us; M = 33 38.38, 38.21 against 38.46, 38.50; alternating in one H100 call).
PICKED: dict[tuple[int, int], list[tuple[int, int, Config]]] = {
    (960, 2560): [(33, 64, (16, 64, 4, 2, 1)), (65, 1024, (16, 128, 4, 1, 1))],  # qkv
    (640, 2560): [(33, 64, (16, 64, 4, 2, 1)), (65, 2048, (16, 128, 4, 1, 1))],  # o
    (3456, 2560): [(33, 64, (16, 64, 4, 1, 1)), (65, 1024, (16, 128, 4, 1, 1))],  # gate+up
    (640, 6912): [(33, 64, (16, 64, 8, 2, 2)), (65, 2048, (16, 128, 4, 1, 1))],  # down
}
PICKED_SM_COUNT = 132


def picked(m: int, r: int, kp: int, sm_count: int) -> Config | None:
    """The config to run `m` rows of this weight with, where this kernel is the pick."""
    if sm_count != PICKED_SM_COUNT:
        return None
    return next((config for first, last, config in PICKED.get((r, kp), []) if first <= m <= last), None)


def w2a8_wgmma(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    code_sums: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """Fill `out [M, N]` (int32: the exact sums; else scaled, in its dtype) with `codes [M, Kp] @ W^T`.
    `config` = (packed rows per block, tokens per block, stages, K splits, consumer warpgroups) overrides `plan`
    (for tuning)."""
    m, kp = codes.shape
    r = weight.shape[0]
    rows, tokens, stages, splits, warpgroups = config or plan(m, r, kp)
    kernel = _kernel(rows, tokens, stages, splits, warpgroups)
    weight_map = cuda_driver.byte_tile_map(weight.data_ptr(), r, kp, weight.stride(0), rows)
    codes_map = cuda_driver.byte_tile_map(codes.data_ptr(), m, kp, codes.stride(0), tokens)
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    cuda_driver.launch(kernel, (-(-r // rows), -(-m // tokens), splits), threads(warpgroups), [
        weight_map, codes_map, pointer(x_scale.data_ptr()), pointer(code_sums.data_ptr()),
        pointer(weight_scale.data_ptr()), integer(0 if weight_scale.numel() == 1 else 1),
        pointer((weight_scale if bias is None else bias).data_ptr()), integer(bias is not None),
        pointer(out.data_ptr()), integer(OUT_KINDS[out.dtype]), integer(m), integer(r), integer(out.shape[1]),
        integer(kp), integer(out.stride(0)),
    ], shared_bytes(rows, tokens, stages))
    return out
