"""The W2A8 kernel for 2 to 64 rows on Hopper (`w2a8_mma.cu`): int8 mma.sync fed straight from the packed
weights in registers, the splits of K of a tile added up through the shared memory of a thread-block
cluster. Each (tokens, splits, depth) variant is compiled the first time it is used, for the GPU in use, by
NVRTC, which PyTorch's CUDA builds ship: no nvcc, no build step.

Why not Triton: its tensor-core dot takes operands in its own register order, reached through shared memory;
here each lane unpacks its 16-byte load straight into its mma fragment (on the H100, the four 2B4T shapes at
16 rows: 39.7 us against 54.4 for the Triton kernel)."""

from __future__ import annotations

import ctypes
import functools

import torch

from bitnet158.kernels import cuda_driver

ROWS_PER_GROUP = 16  # packed rows (64 output rows) per row group of a block
CHUNK = 64  # bytes of K per warp step: the padded K must be a multiple
WARPS = 8
THREADS = 32 * WARPS
MAX_DEPTH = 6
MAX_M = 64  # past 16 rows, blocks of 16 or 32 tokens side by side (a 64-token block was slower)
OUT_KINDS = {torch.int32: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


@functools.cache
def available(device: torch.device) -> bool:
    """Whether the kernel can run here: thread-block clusters need compute capability 9.0, and the NVRTC
    entry point (`torch.cuda._compile_kernel`) a recent PyTorch."""
    return (device.type == "cuda" and hasattr(torch.cuda, "_compile_kernel")
            and torch.cuda.get_device_capability(device) >= (9, 0))


def fits(tokens: int, groups: int) -> bool:
    """Whether a block of `tokens` and `groups` row groups has room for its partial sums: 32 KB of shared memory,
    four slots of 2 KB per 8 tokens (one per group past four groups)."""
    return tokens // 8 * max(4, groups) <= 16


@functools.cache
def _kernel(tokens: int, splits: int, depth: int, groups: int, capability: tuple[int, int]):
    name = f"w2a8_mma<{tokens // 8}, {depth}, {splits}, {groups}>"
    return cuda_driver.compile_kernel("w2a8_mma.cu", name, f"{capability[0]}{capability[1]}")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# (tokens per block, K splits, loads in flight, row groups) for the 2B4T shapes (packed rows, padded K) on a GPU of 132
# multiprocessors (H100, H200), by the largest batch of a bucket: the fastest config with the four shapes timed
# back to back, one shape's config varied at a time (`benchmarks/gpu_kernels.py --sweep-sequence`, H100).
# In sequence each kernel starts while the one before ends, which favours fewer loads in flight per lane (fewer
# registers, more blocks resident early) than calls timed alone. Row groups were swept later, over a smaller space
# (splits 1-2, 1-3 loads, 1-4 groups): only gate+up gained. Other shapes and GPUs take `plan`'s rule.
TUNED_SM_COUNT = 132
TUNED = {
    # qkv, o, gate+up, down
    (960, 2560): {8: (8, 2, 3, 1), 16: (16, 2, 3, 1), 32: (16, 1, 5, 1), 48: (16, 1, 5, 1), 64: (16, 1, 5, 1)},
    (640, 2560): {8: (8, 3, 3, 1), 16: (16, 3, 1, 1), 32: (16, 4, 1, 1), 48: (16, 2, 3, 1), 64: (16, 1, 5, 1)},
    (3456, 2560): {8: (8, 2, 1, 1), 16: (16, 1, 5, 1), 32: (32, 1, 1, 1), 48: (16, 1, 2, 2), 64: (32, 1, 1, 2)},
    (640, 6912): {8: (8, 4, 1, 1), 16: (16, 5, 3, 1), 32: (16, 4, 2, 1), 48: (16, 2, 4, 1), 64: (16, 2, 2, 1)},
}


def plan(m: int, r: int, kp: int, sm_count: int) -> tuple[int, int, int, int]:
    """(tokens per block, K splits, loads in flight per lane, row groups per block): the tuned config where
    there is one, else about 1.5 blocks per multiprocessor (splits of K: at most 8, a portable cluster), every
    lane's loads in flight at once and one row group."""
    tuned = TUNED.get((r, kp)) if sm_count == TUNED_SM_COUNT else None
    if tuned:
        return tuned[next(bucket for bucket in sorted(tuned) if m <= bucket)]
    row_blocks = -(-r // ROWS_PER_GROUP)
    tokens = 8 if m <= 8 else 16
    if m > 16 and -(-m // 32) * 32 == -(-m // 16) * 16 and row_blocks * -(-m // 16) > 2 * sm_count:
        # 32-token blocks only where they pad no more than 16-token ones and the latter would fill the GPU more
        # than twice: each 16-token block keeps several loads in flight where a 32-token block holds one (H100,
        # 48 rows, gate+up in sequence: 39.4 against 42.4 us; 64 rows: 49.3 against 46.3).
        tokens = 32
    tiles = row_blocks * -(-m // tokens)
    chunks = kp // CHUNK
    splits = max(1, min(round(1.5 * sm_count / tiles), chunks // 8, 8))
    per_warp = -(-chunks // (splits * WARPS))
    # Each load in flight holds 8 + 4 * tokens / 8 registers per lane: past 5 (16 tokens) or 1 (32 tokens) the
    # block's registers cost a block per multiprocessor (H200, 64 rows, down: 16.6 us at 6 against 15.3 at 5).
    return tokens, splits, min(per_warp, {8: MAX_DEPTH, 16: 5, 32: 1}[tokens]), 1


def w2a8_mma(
    codes: torch.Tensor,
    x_scale: torch.Tensor,
    code_sums: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Fill `out [M, N]` (int32: the exact sums; else scaled, in its dtype) with `codes [M, Kp] @ W^T`.
    `config` = (tokens per block, K splits, loads in flight, row groups) overrides `plan` (for tuning)."""
    m, kp = codes.shape
    r = weight.shape[0]
    tokens, splits, depth, groups = config or plan(m, r, kp, _sm_count(codes.device))
    kernel = _kernel(tokens, splits, depth, groups, torch.cuda.get_device_capability(codes.device))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    cuda_driver.launch(kernel, (-(-r // (ROWS_PER_GROUP * groups)), -(-m // tokens), splits), THREADS, [
        pointer(codes.data_ptr()), pointer(x_scale.data_ptr()), pointer(code_sums.data_ptr()),
        pointer(weight.data_ptr()), pointer(weight_scale.data_ptr()), integer(0 if weight_scale.numel() == 1 else 1),
        pointer((weight_scale if bias is None else bias).data_ptr()), integer(bias is not None),
        pointer(out.data_ptr()), integer(OUT_KINDS[out.dtype]), integer(m), integer(r), integer(out.shape[1]),
        integer(kp), integer(codes.stride(0)), integer(out.stride(0)),
    ])
    return out
