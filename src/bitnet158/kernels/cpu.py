"""Native CPU backend: the `bitnet158._cpu` extension (csrc/) behind `bitlinear_forward`.

Three kernel styles compute the same exact int32 sums (see csrc/kernels.h): "i2" multiplies decoded
2-bit weights with int8 activations (like bitnet.cpp's I2_S), "lut" looks pairs of weights up in
tables of pre-summed activations (like TL1), "tiled" interleaves the 2-bit weights 16 output rows at a
time so that each decoded weight vector serves up to 8 batch rows (a small-M GEMM, x86 SIMD). For each
weight shape and batch size up to `GEMV_MAX_M` the first call times the styles on random weights of
that shape and keeps the fastest (`choose_style`); larger batches are a GEMM: tiled on x86 SIMD, else i2.

Environment:
- BITNET158_THREADS: kernel threads (default: the CPUs this process may run on).
- BITNET158_CPU_ISA: portable, avx2, avx512-vnni, avx512-amx or neon (at most what the CPU has); "portable"
  forces the plain C++ fallback.
- BITNET158_CPU_STYLE: i2 or lut, instead of timing both.
- BITNET158_CPU_KERNELS=0: do not use the extension at all (PyTorch reference kernels).
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import TYPE_CHECKING

import torch

from bitnet158.errors import UserError
from bitnet158.packing import pack_2bit

if TYPE_CHECKING:
    from bitnet158.nn.bitlinear import PackedBitLinear

try:
    from bitnet158 import _cpu
except ImportError as error:  # not built (no compiler at install time) or broken: reference kernels
    _cpu = None
    IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None

STYLES = ("i2", "lut", "tiled")
LAYOUTS = {"i2": "cpu_i2_k256", "lut": "cpu_lut_r32", "tiled": "cpu_tiled_16x4"}
# Batches of at most this many rows choose a style by timing; larger ones are a GEMM (`gemm_style`).
GEMV_MAX_M = 8
# Where the tiled style has SIMD kernels; elsewhere it runs the portable loops.
_TILED_ISAS = ("avx2", "avx512-vnni", "avx512-amx")

_style_cache: dict[tuple[int, int, int, str], str] = {}


def available() -> bool:
    """Whether the native kernels are built, importable and not switched off. A bad BITNET158_THREADS
    or BITNET158_CPU_ISA is a `UserError` here, at first use, rather than a traceback at import."""
    if _ENVIRONMENT_ERROR is not None:
        raise UserError(_ENVIRONMENT_ERROR)
    return _cpu is not None and os.environ.get("BITNET158_CPU_KERNELS", "1") != "0"


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_threads(threads: int) -> None:
    """Threads for the native kernels (the calling thread included)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    if _cpu is not None:
        _cpu.set_threads(threads)


def configure_threads(threads: int | None) -> None:
    """The CLI's `--threads`: native kernel threads and PyTorch's intra-op threads (None: leave the
    defaults, BITNET158_THREADS or every CPU this process may use)."""
    if threads is None:
        return
    set_threads(threads)
    torch.set_num_threads(threads)


def get_threads() -> int:
    return _cpu.threads() if _cpu is not None else 1


def isa() -> str:
    """The instruction set the kernels use now ("unavailable" without the extension)."""
    return _cpu.isa() if _cpu is not None else "unavailable"


def set_isa(name: str) -> str:
    """Use `name` (portable, avx2, avx512-vnni, avx512-amx, neon) where the CPU has it; returns the one in effect."""
    if _cpu is None:
        raise RuntimeError(f"the native CPU kernels are not available ({IMPORT_ERROR})")
    _style_cache.clear()  # timings belong to an instruction set
    return _cpu.set_isa(name)


def describe() -> str:
    """One line for `bitnet158 info`."""
    if _cpu is None:
        return f"unavailable, using the PyTorch reference kernels ({IMPORT_ERROR})"
    if not available():
        return "switched off by BITNET158_CPU_KERNELS=0, using the PyTorch reference kernels"
    return f"native, {_cpu.isa()} (CPU has {_cpu.detected_isa()}), {_cpu.threads()} threads"


def _configure_from_environment() -> str | None:
    """Apply BITNET158_THREADS and BITNET158_CPU_ISA; the problem with them, if any."""
    if _cpu is None:
        return None
    threads = os.environ.get("BITNET158_THREADS")
    try:
        set_threads(int(threads) if threads else default_threads())
    except ValueError:
        return f"BITNET158_THREADS={threads!r}: expected a positive integer"
    wanted = os.environ.get("BITNET158_CPU_ISA")
    if wanted:
        try:
            set_isa(wanted)
        except ValueError as error:
            return f"BITNET158_CPU_ISA={wanted!r}: {error}"
    return None


_ENVIRONMENT_ERROR = _configure_from_environment()


# --- weights ---------------------------------------------------------------------------------------


def _style_id(style: str) -> int:
    if style not in STYLES:
        raise ValueError(f"kernel style must be one of {STYLES}, not {style!r}")
    return STYLES.index(style)


def repack(packed: torch.Tensor, out_features: int, style: str) -> torch.Tensor:
    """Transformers-layout packed weights (uint8 `[ceil(out / 4), in]`) in a kernel style's own layout."""
    rows, in_features = packed.shape
    if packed.dtype != torch.uint8 or rows != -(-out_features // 4):
        raise ValueError(f"packed weight {packed.dtype} {tuple(packed.shape)} does not hold {out_features} rows")
    packed = packed.contiguous()
    out = torch.empty(_cpu.layout_bytes(_style_id(style), out_features, in_features), dtype=torch.uint8)
    _cpu.repack(_style_id(style), packed.data_ptr(), out_features, in_features, out.data_ptr())
    return out


def layer_weight(layer: PackedBitLinear, style: str) -> torch.Tensor:
    """`layer`'s weight in `style`'s layout, repacked once and cached on the layer."""
    if layer.weight.is_inference():  # no version counter to key `repacked`'s cache: key on the tensor itself
        cache = layer.__dict__.setdefault("_cpu_inference_repacked", {})
        cached = cache.get(style)
        if cached is None or cached[0] is not layer.weight:
            cached = cache[style] = (layer.weight, repack(layer.weight, layer.out_features, style))
        return cached[1]
    return layer.repacked(LAYOUTS[style], partial(repack, out_features=layer.out_features, style=style))


# --- activations ---------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row int8 absmax codes of `x [m, k]` (padded with zeros to the kernels' row length), their
    scales `[m]` and sums `[m]`: the same codes and scales as `bitnet158.quant.quantize_activations`."""
    x = x.float().contiguous()
    m, k = x.shape
    kp = _cpu.padded_k(k)
    codes = torch.empty(m, kp, dtype=torch.int8)
    scales = torch.empty(m, dtype=torch.float32)
    sums = torch.empty(m, dtype=torch.int32)
    _cpu.quantize(x.data_ptr(), m, k, k, codes.data_ptr(), kp, scales.data_ptr(), sums.data_ptr())
    return codes, scales, sums


def ternary_matmul(x: torch.Tensor, weight: torch.Tensor, out_features: int, style: str) -> torch.Tensor:
    """Exact int32 sums `codes(x) @ W^T` `[m, out]` from `weight` in `style`'s layout (for tests and benchmarks)."""
    codes, scales, sums = quantize_activations(x)
    m, k = x.shape
    out = torch.empty(m, out_features, dtype=torch.int32)
    _cpu.gemm(_style_id(style), codes.data_ptr(), sums.data_ptr(), scales.data_ptr(), m, k, weight.data_ptr(),
              out_features, 0, 1, 0, 0, out.data_ptr(), out_features)
    return out


def linear_into(
    x: torch.Tensor, weight: torch.Tensor, out_features: int, weight_scale: torch.Tensor, style: str,
    out: torch.Tensor, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out [m, out_features] = BitLinear(x [m, k])` from a repacked weight; float32, contiguous tensors."""
    m, k = x.shape
    _cpu.linear(_style_id(style), x.data_ptr(), m, k, weight.data_ptr(), out_features, weight_scale.data_ptr(),
                weight_scale.numel(), 0 if bias is None else bias.data_ptr(), out.data_ptr())
    return out


# --- style choice ----------------------------------------------------------------------------------


def _time_style(style: str, weight: torch.Tensor, x: torch.Tensor, n: int, scale: torch.Tensor, reps: int) -> float:
    out = torch.empty(x.shape[0], n)
    linear_into(x, weight, n, scale, style, out)  # warm up (caches, thread pool)
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        linear_into(x, weight, n, scale, style, out)
        best = min(best, time.perf_counter() - started)
    return best


def gemm_style() -> str:
    """The style of batches larger than `GEMV_MAX_M`: tiled where it has SIMD kernels, else i2."""
    return "tiled" if _cpu.isa() in _TILED_ISAS else "i2"


def choose_style(out_features: int, in_features: int, rows: int) -> str:
    """The faster style for this shape, timed once per process on random weights (or BITNET158_CPU_STYLE)."""
    forced = os.environ.get("BITNET158_CPU_STYLE")
    if forced:
        _style_id(forced)
        return forced
    if rows > GEMV_MAX_M:
        return gemm_style()
    key = (out_features, in_features, rows, _cpu.isa())
    style = _style_cache.get(key)
    if style is None:
        generator = torch.Generator().manual_seed(0)
        packed = pack_2bit(torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, generator=generator))
        x = torch.randn(rows, in_features, generator=generator)
        scale = torch.ones(1)
        reps = 5 if out_features * in_features < 2**24 else 3
        times = {s: _time_style(s, repack(packed, out_features, s), x, out_features, scale, reps) for s in STYLES}
        style = min(times, key=times.get)
        _style_cache[key] = style
    return style


# --- the BitLinear backend -------------------------------------------------------------------------


def bitlinear_forward(layer: PackedBitLinear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)` for a CPU tensor `x [..., in]`: the same result as `reference.ternary_linear`."""
    in_features, out_features = layer.in_features, layer.out_features
    if x.shape[-1] != in_features:
        raise ValueError(f"input of shape {tuple(x.shape)} does not fit a {in_features}->{out_features} layer")
    rows = x.reshape(-1, in_features)
    if rows.dtype != torch.float32 or not rows.is_contiguous():
        rows = rows.float().contiguous()
    m = rows.shape[0]
    out = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        style = choose_style(out_features, in_features, m)
        scale = layer.weight_scale
        if scale.dtype != torch.float32 or not scale.is_contiguous():
            scale = scale.float().contiguous()
        if scale.numel() not in (1, out_features):
            raise ValueError(f"weight_scale of shape {tuple(scale.shape)} fits neither 1 nor {out_features} rows")
        bias = None if layer.bias is None else layer.bias.float().contiguous()
        linear_into(rows, layer_weight(layer, style), out_features, scale, style, out, bias)
    out = out.view(*x.shape[:-1], out_features)
    return out if x.dtype == torch.float32 else out.to(x.dtype)
