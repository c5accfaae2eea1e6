"""Native CPU ternary kernels against PyTorch's fp32 `F.linear`, side by side, and against memory bandwidth.

For the four BitLinear shapes of bitnet-b1.58-2B-4T (out x in: fused qkv, o, fused gate+up, down) it
times, on random weights, the whole BitLinear forward of each kernel style (int8 quantization of the
input, ternary GEMV/GEMM, scales) and torch's fp32 `F.linear` of the same shape, in alternating rounds
so that both see the same machine load; the table shows medians. Rows are GEMV (1 token), small-M GEMM
(4, 8, and 32: a full serving batch) and a prefill GEMM (128 tokens). Up to `GEMV_MAX_M` rows every
style is timed; beyond, i2 and tiled (the lookup tables are no GEMM kernel).

Bandwidth: a copy benchmark (torch `copy_` of a 1 GiB buffer, bytes read + bytes written per second)
gives the machine's memory bandwidth; each GEMV's "share" is its weight bytes per second over it.
Repeated calls find their weights in the caches when they fit (2.4-8.8 MB ternary; the fp32 weights
are 16x larger), so a share above 100% means the weights came from cache, not DRAM.

    python benchmarks/cpu_kernels.py [--threads N] [--output benchmarks/results/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitnet158.kernels import cpu
from bitnet158.packing import pack_2bit

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "cpu_kernels.json"
# (name, out_features, in_features) of bitnet-b1.58-2B-4T (hidden 2560, 20 + 2 * 5 heads of 128, intermediate 6912).
SHAPES = [("qkv", 3840, 2560), ("o", 2560, 2560), ("gate+up", 13824, 2560), ("down", 2560, 6912)]
ROWS = [1, 4, 8, 32, 128]
GB = 1e9


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


def copy_bandwidth(size_bytes: int = 2**30, reps: int = 7) -> float:
    """Bytes read + written per second by a large `copy_` (PyTorch's threads)."""
    src = torch.ones(size_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * size_bytes / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def side_by_side(candidates: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in alternating rounds of `calls` calls."""
    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - started) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_shape(name: str, n: int, k: int, rows: int, generator: torch.Generator) -> dict:
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=generator)
    packed = pack_2bit(codes)
    weights = {style: cpu.repack(packed, n, style) for style in cpu.STYLES}
    scale = torch.tensor([0.7])
    fp32_weight = codes.float() * 0.7
    x = torch.randn(rows, k, generator=generator)
    out = torch.empty(rows, n)
    chosen = cpu.choose_style(n, k, rows)
    candidates = {f"ours_{style}": (lambda s=style: cpu.linear_into(x, weights[s], n, scale, s, out))
                  for style in (cpu.STYLES if rows <= cpu.GEMV_MAX_M else ("i2", "tiled"))}
    candidates["torch_fp32"] = lambda: F.linear(x, fp32_weight)
    big = rows > 8 or n * k > 2e7
    seconds = side_by_side(candidates, rounds=7 if big else 11, calls=3 if big else 10)
    ours = seconds[f"ours_{chosen}"]
    ternary_bytes, fp32_bytes = n * k / 4, n * k * 4
    return {
        "shape": name, "out_features": n, "in_features": k, "rows": rows, "chosen_style": chosen,
        **{f"{key}_us": value * 1e6 for key, value in seconds.items()},
        "speedup_vs_fp32": seconds["torch_fp32"] / ours,
        "ours_weight_gb_s": ternary_bytes / ours / GB, "fp32_weight_gb_s": fp32_bytes / seconds["torch_fp32"] / GB,
        "ours_gops": 2 * rows * n * k / ours / GB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=cpu.default_threads())
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if not cpu.available():
        raise SystemExit(f"native CPU kernels unavailable: {cpu.describe()}")
    torch.set_num_threads(args.threads)
    cpu.set_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    bandwidth = copy_bandwidth()
    print(f"{cpu.describe()}; torch {torch.__version__} with {torch.get_num_threads()} threads; {cpu_name()}")
    print(f"copy bandwidth (read + write): {bandwidth / GB:.1f} GB/s")
    results = [bench_shape(name, n, k, rows, generator) for rows in ROWS for name, n, k in SHAPES]
    for row in results:
        row["ours_bandwidth_share"] = row["ours_weight_gb_s"] * GB / bandwidth
        row["fp32_bandwidth_share"] = row["fp32_weight_gb_s"] * GB / bandwidth

    header = ["shape", "out x in", "rows", "i2 us", "lut us", "tiled us", "chosen", "torch fp32 us", "speedup",
              "ours GB/s (share)", "fp32 GB/s (share)"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in results:
        lut = f"{r['ours_lut_us']:.0f}" if "ours_lut_us" in r else "-"
        print(f"{r['shape']} | {r['out_features']}x{r['in_features']} | {r['rows']} | {r['ours_i2_us']:.0f} | {lut} | "
              f"{r['ours_tiled_us']:.0f} | "
              f"{r['chosen_style']} | {r['torch_fp32_us']:.0f} | {r['speedup_vs_fp32']:.1f}x | "
              f"{r['ours_weight_gb_s']:.1f} ({r['ours_bandwidth_share']:.0%}) | "
              f"{r['fp32_weight_gb_s']:.1f} ({r['fp32_bandwidth_share']:.0%})")
    machine = {"cpu": cpu_name(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads, "kernels": cpu.describe()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(
        {"machine": machine, "copy_bandwidth_gb_s": bandwidth / GB, "results": results}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
