"""Our CUDA kernels at run time: compiling them with NVRTC (`torch.cuda._compile_kernel`), and the few CUDA
driver calls they need beyond it, through ctypes: launching with programmatic dependent launch, raising a
kernel's shared-memory limit, and describing a 2-D tensor to the copy engine (TMA)."""

from __future__ import annotations

import ctypes
import functools
from importlib import resources

import torch


def compile_kernel(source_file: str, kernel_name: str, arch: str):
    """`kernel_name` (a template instance) from `kernels/<source_file>`, compiled for `arch` (e.g. "90a") with the
    shared device helpers of `cuda_common.cuh` in front."""
    kernels = resources.files("bitnet158.kernels")
    source = kernels.joinpath("cuda_common.cuh").read_text() + kernels.joinpath(source_file).read_text()
    return torch.cuda._compile_kernel(source, kernel_name, arch)


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(error: int, call: str) -> None:
    if error:
        raise RuntimeError(f"{call} failed with CUDA driver error {error}")


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_...: may start before the previous kernel ends
_EARLY_START = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)


def launch(kernel, grid: tuple[int, int, int], threads: int, args: list, shared_bytes: int = 0) -> None:
    """`kernel` on the current stream, allowed to start while the kernel before it ends (it waits for it in the
    kernel). `args` are ctypes values (pointers, ints, tensor maps). torch's own launcher costs tens of
    microseconds of host time per call."""
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(arg) for arg in args])
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid), block=(ctypes.c_uint * 3)(threads, 1, 1),
                           shared_bytes=shared_bytes, stream=torch.cuda.current_stream().cuda_stream,
                           attrs=ctypes.pointer(_EARLY_START), num_attrs=1)
    _check(_driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None), "cuLaunchKernelEx")


_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CU_FUNC_ATTRIBUTE_...


def allow_shared_bytes(kernel, shared_bytes: int) -> None:
    """Let `kernel` take `shared_bytes` of dynamic shared memory (past 48 KB a kernel must ask)."""
    _check(_driver().cuFuncSetAttribute(kernel.func, _MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_bytes),
           "cuFuncSetAttribute")


class TensorMap(ctypes.Structure):  # CUtensorMap: 128 opaque bytes, passed to the kernel by value
    _fields_ = [("words", ctypes.c_uint64 * 16)]


_UINT8, _NO_INTERLEAVE, _SWIZZLE_128B, _L2_PROMOTION_256B, _ZERO_FILL = 0, 0, 3, 3, 0


@functools.lru_cache(maxsize=4096)
def byte_tile_map(address: int, rows: int, row_bytes: int, row_stride: int, box_rows: int) -> TensorMap:
    """A uint8 matrix `[rows, row_bytes]` (rows `row_stride` bytes apart) for copies of boxes of `box_rows` x 128
    bytes into 128-byte swizzled shared memory; reads past the matrix give zeros. A pure function of its
    arguments, hence cached (the weights' maps are asked for again at every call)."""
    tensor_map = TensorMap()
    sizes = (ctypes.c_uint64 * 2)(row_bytes, rows)
    strides = (ctypes.c_uint64 * 1)(row_stride)
    box = (ctypes.c_uint32 * 2)(128, box_rows)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    _check(_driver().cuTensorMapEncodeTiled(
        ctypes.byref(tensor_map), _UINT8, 2, ctypes.c_void_p(address), sizes, strides, box, steps,
        _NO_INTERLEAVE, _SWIZZLE_128B, _L2_PROMOTION_256B, _ZERO_FILL), "cuTensorMapEncodeTiled")
    return tensor_map
