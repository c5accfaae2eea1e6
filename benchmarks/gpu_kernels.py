"""W2A8 kernels against cuBLAS bf16 on the four linear shapes of bitnet-b1.58-2B-4T, side by side.

For each shape (N out x K in) and batch M: our W2A8 matmul on int8 activation codes (what Microsoft's
kernel takes), the same with per-token quantization of bf16 activations in front (`+quant`), and
cuBLAS bf16 (`F.linear`). Each call is timed alone with CUDA events, after a sleep kernel that keeps
the GPU busy while the host queues it (~200 us) (so launch cost stays out, as in `triton.testing.do_bench`);
the table shows medians of REPS calls. Calls rotate over enough weight sets (>= 4, >= 200 MB) that
no weight is in the 50 MB L2 when it is read. Microsoft's M=1 times are from
../shared/reference/anchors.md (same card, same method).

A layer runs the four shapes one after another, and there each kernel's start overlaps the end of the one
before: the `in sequence` rows time the four calls queued back to back between one pair of events (ours,
and cuBLAS the same way), beside the sum of the four lone calls.

The floor of each shape is the time, by the same method, of a kernel that only reads its packed
weights (and stores one sum per program): no kernel that reads those bytes can be faster. An empty
kernel's time is reported too: the part of every call that does not depend on the bytes at all.

    python benchmarks/gpu_kernels.py [--sweep | --sweep-sequence | --wgmma-pick] [OUTPUT_JSON]
        (default output: benchmarks/results/gpu_kernels.json)
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bitnet158.kernels import gpu, gpu_mma, gpu_wgmma

SHAPES = {"qkv": (3840, 2560), "o": (2560, 2560), "gate+up": (13824, 2560), "down": (2560, 6912)}
MICROSOFT_M1_US = {"qkv": 9.1, "o": 9.0, "gate+up": 12.4, "down": 15.5}
BATCHES = [1, 16, 64, 2048]
REPS = 200
ROTATE_BYTES = 200 * 2**20
PEAK_TBS = 3.0
SLEEP_CYCLES = 400_000  # about 200 us at 1.98 GHz, more than the host needs to launch one call
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "gpu_kernels.json"


def median_us(calls: list, reps: int = REPS, sleep_cycles: int = SLEEP_CYCLES) -> float:
    """Median device time of `calls[i % len(calls)]()`, each call timed alone with events."""
    for call in calls[:2]:
        call()  # compile / pick kernels
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        torch.cuda._sleep(sleep_cycles)  # GPU busy while the host queues the call: launch cost stays out
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000 for s, e in zip(starts, ends, strict=True))


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _read_kernel(w_ptr, out_ptr, n_words, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.load(w_ptr + offs, mask=offs < n_words, other=0), axis=0))


def read_floor_us(nbytes: int) -> float:
    """Median time of a kernel that reads `nbytes` of weights (int32 words, 1024 per program) and nothing else."""
    words = nbytes // 4
    sets = [torch.randint(0, 2**30, (words,), dtype=torch.int32, device="cuda") for _ in range(sets_for(nbytes))]
    sums = torch.empty(triton.cdiv(words, 1024), dtype=torch.int32, device="cuda")
    return median_us([lambda w=w: _read_kernel[(sums.numel(),)](w, sums, words, BLOCK=1024) for w in sets])


def sets_for(nbytes: int) -> int:
    return max(4, -(-ROTATE_BYTES // nbytes))


def random_packed(n: int, k: int) -> torch.Tensor:
    """Random ternary weights in transformers' packed layout: each 2-bit field 0, 1 or 2."""
    fields = torch.randint(0, 3, (4, -(-n // 4), k), dtype=torch.uint8, device="cuda")
    return fields[0] | fields[1] << 2 | fields[2] << 4 | fields[3] << 6


def bench_shape(name: str, n: int, k: int, m: int, floor_us: float, config=None) -> dict:
    weight_bytes = n * k // 4
    weights = [gpu.repack(random_packed(n, k)) for _ in range(sets_for(weight_bytes))]
    scale = torch.rand(n, device="cuda") + 0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes, x_scale, sums = gpu.quantize_rows(x)
    ours = median_us([lambda w=w: gpu.w2a8_matmul(codes, x_scale, sums, w, scale, n, config=config) for w in weights])
    # Two launches, four at 2,048 rows (unpacking, the GEMM in two grids): up to 0.3 ms of host time per call, so
    # the longer sleep of `bench_sequence`.
    with_quant = median_us([
        lambda w=w: gpu.w2a8_matmul(*gpu.quantize_rows(x), w, scale, n, config=config) for w in weights
    ], sleep_cycles=5 * SLEEP_CYCLES)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets_for(2 * n * k))]
    cublas = median_us([lambda w=w: F.linear(x, w) for w in dense])
    del weights, dense
    return {
        "shape": name, "N": n, "K": k, "M": m, "w2a8_us": ours, "w2a8_with_quant_us": with_quant,
        "cublas_bf16_us": cublas, "speedup_vs_cublas": cublas / ours, "read_floor_us": floor_us,
        "weight_GBps": weight_bytes / ours / 1e3, "share_of_3TBps": weight_bytes / ours / 1e6 / PEAK_TBS,
        "tops": 2 * m * n * k / ours / 1e6, "microsoft_us": MICROSOFT_M1_US[name] if m == 1 else None,
    }


def sequence_calls(m: int) -> tuple[list[list], list[list]]:
    """Per shape, `w2a8_matmul` on each of its rotated weight sets, and cuBLAS bf16 `F.linear` on each of its."""
    ours, cublas = [], []
    for n, k in SHAPES.values():
        weights = [gpu.repack(random_packed(n, k)) for _ in range(sets_for(n * k // 4))]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets_for(2 * n * k))]
        scale = torch.rand(n, device="cuda") + 0.5
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        codes, x_scale, sums = gpu.quantize_rows(x)
        ours.append([functools.partial(gpu.w2a8_matmul, codes, x_scale, sums, w, scale, n) for w in weights])
        cublas.append([functools.partial(F.linear, x, w) for w in dense])
    return ours, cublas


def in_sequence_us(calls_per_shape: list[list], reps: int = REPS) -> float:
    """One call per shape back to back, timed as one span (the weight sets rotating)."""
    def layer(i: int) -> None:
        for calls in calls_per_shape:
            calls[i % len(calls)]()
    # Four launches to queue: a longer sleep (about 1 ms), so that the GPU never waits for the host.
    return median_us([functools.partial(layer, i) for i in range(max(map(len, calls_per_shape)))], reps=reps,
                     sleep_cycles=5 * SLEEP_CYCLES)


def bench_sequence(m: int) -> dict:
    """The four shapes called back to back, timed as one span: ours against cuBLAS bf16."""
    ours, cublas = sequence_calls(m)
    ours_us, cublas_us = in_sequence_us(ours), in_sequence_us(cublas)
    return {"w2a8_us": ours_us, "cublas_bf16_us": cublas_us, "speedup_vs_cublas": cublas_us / ours_us}


def _time_config(codes, x_scale, sums, weights, scale, n, config) -> float:
    return median_us([lambda w=w: gpu.w2a8_matmul(codes, x_scale, sums, w, scale, n, config=config) for w in weights],
                     reps=60)


def _time_cuda(codes, x_scale, sums, weights, scale, out, config) -> float:
    calls = [lambda w=w: gpu_mma.w2a8_mma(codes, x_scale, sums, w, scale, out, config=config) for w in weights]
    return median_us(calls, reps=60)


def _time_wgmma(codes, x_scale, sums, weights, scale, out, config) -> float:
    calls = [lambda w=w: gpu_wgmma.w2a8_wgmma(codes, x_scale, sums, w, scale, out, config=config) for w in weights]
    return median_us(calls, reps=60)


# The epilogue each shape has in the decode step (`generation.gpu_decode`).
FUSED_EPILOGUES = {"qkv": "none", "o": "residual", "gate+up": "relu2_gate_up", "down": "residual"}


def _time_fused(weights, scale, n, k, epilogue, config) -> float:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) if epilogue == "residual" else None
    calls = [lambda w=w: gpu.fused_gemv(x, norm, 1e-5, w, scale, n, epilogue, residual, residual, config=config)
             for w in weights]
    return median_us(calls, reps=60)


def _report(title: str, timed: list) -> None:
    timed.sort(key=lambda pair: pair[0])
    print(f"{title}: " + ", ".join(f"{c}={t:.2f}" for t, c in timed[:4]), flush=True)


def sweep_gemv() -> None:
    """Time each GEMV block configuration at M = 1, plain and fused with RMSNorm (to pick `_gemv_config`
    and `_fused_config`; the fused kernel's BLOCK_KW always holds the whole row)."""
    configs = [(br, bkw, w) for br in (1, 2, 4) for bkw in (256, 512, 1024, 2048) for w in (2, 4, 8)
               if br * bkw <= 4096]
    for name, (n, k) in SHAPES.items():
        weights = [gpu.repack(random_packed(n, k)) for _ in range(sets_for(n * k // 4))]
        scale = torch.rand(n, device="cuda") + 0.5
        codes, x_scale, sums = gpu.quantize_rows(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
        _report(f"sweep M=1 {name}", [(_time_config(codes, x_scale, sums, weights, scale, n, c), c) for c in configs])
        row = triton.next_power_of_2(gpu.padded_k(k) // 4)
        fused = [(br, row, w) for br in (1, 2, 4, 8) for w in (2, 4, 8, 16)]
        _report(f"sweep fused {name}",
                [(_time_fused(weights, scale, n, k, FUSED_EPILOGUES[name], c), c) for c in fused])
        del weights


def _cuda_configs(token_options: set[int]) -> list[tuple[int, int, int, int]]:
    """Every CUDA kernel config (tokens per block, K splits, loads in flight, row groups) that fits its shared
    memory."""
    return [(tokens, splits, depth, groups) for tokens in sorted(token_options) for splits in range(1, 9)
            for depth in range(1, gpu_mma.MAX_DEPTH + 1) for groups in (1, 2, 4, 8) if gpu_mma.fits(tokens, groups)]


def _shape_inputs(n: int, k: int, m: int) -> tuple:
    """Rotated packed weights of one shape, their scales, `m` rows of quantized activations, and a bf16 output."""
    weights = [gpu.repack(random_packed(n, k)) for _ in range(sets_for(n * k // 4))]
    codes, x_scale, sums = gpu.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    return weights, torch.rand(n, device="cuda") + 0.5, codes, x_scale, sums, out


def sweep_cuda_mma(batches: list[int]) -> None:
    """Time the CUDA kernel's configs per shape and batch (to pick `gpu_mma.plan`)."""
    for m in batches:
        for name, (n, k) in SHAPES.items():
            weights, scale, codes, x_scale, sums, out = _shape_inputs(n, k, m)
            planned = gpu_mma.plan(m, *weights[0].shape, torch.cuda.get_device_properties(0).multi_processor_count)[0]
            configs = _cuda_configs({planned, min(planned, 16)})
            _report(f"sweep CUDA M={m} {name}",
                    [(_time_cuda(codes, x_scale, sums, weights, scale, out, c), c) for c in configs])
            del weights


def _wgmma_configs(m: int) -> list[gpu_wgmma.Config]:
    """The CUDA wgmma kernel's configs (packed rows, tokens, stages, K splits, consumer warpgroups) whose sums fit
    128 registers per thread and whose block fits the shared memory. Up to 64 rows, also two warpgroups per row
    group, taking turns over K."""
    if m <= 64:
        space = [(rows, 64, stages, splits, groups) for rows in (16, 32, 64) for stages in (3, 4, 8)
                 for splits in (1, 2, 4, 8) for groups in (1, 2, 4)]
    else:
        space = [(rows, tokens, stages, 1, groups) for rows in (16, 32, 64) for tokens in (64, 128, 256)
                 for stages in (3, 4, 5) for groups in (1, 2)]

    def fits(rows: int, tokens: int, stages: int, splits: int, groups: int) -> bool:
        row_groups = rows // 16
        shares = groups // row_groups if groups > row_groups else 1
        return ((row_groups % groups == 0 or groups == shares * row_groups) and stages >= shares
                and max(1, row_groups // groups) * tokens // 2 <= 128
                and gpu_wgmma.shared_bytes(rows, tokens, stages)
                <= torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    return [c for c in space if fits(*c)]


def sweep_wgmma(batches: list[int]) -> None:
    """Time the CUDA wgmma kernel's configs per shape and batch (to pick the configs of `gpu_wgmma.PICKED`)."""
    for m in batches:
        for name, (n, k) in SHAPES.items():
            weights, scale, codes, x_scale, sums, out = _shape_inputs(n, k, m)
            timed = [(_time_wgmma(codes, x_scale, sums, weights, scale, out, c), c) for c in _wgmma_configs(m)]
            _report(f"sweep CUDA wgmma M={m} {name}", timed)
            del weights


def compare_wgmma_pick(batches: list[int]) -> None:
    """The four shapes back to back through `w2a8_matmul`, with the wgmma kernel where `gpu_wgmma.PICKED` puts it
    and without it (the mma kernel up to 64 rows, unpacking plus the int8 GEMM above), alternating twice (to pick
    `gpu_wgmma.PICKED`)."""
    picked = dict(gpu_wgmma.PICKED)
    for m in batches:
        for _ in range(2):
            gpu_wgmma.PICKED.clear()
            without = bench_sequence(m)["w2a8_us"]
            gpu_wgmma.PICKED.update(picked)
            print(f"M={m} back to back: without the wgmma kernel {without:.2f} us, with its picks "
                  f"{bench_sequence(m)['w2a8_us']:.2f} us", flush=True)


def _sequence_us(layers: list, inputs: list, configs: list, reps: int = 40) -> float:
    """The CUDA kernel on each layer's weights (rotated) and inputs, with its config, back to back."""
    def layer(i: int) -> None:
        for (_, weights, scale), (codes, x_scale, sums, out), config in zip(layers, inputs, configs, strict=True):
            gpu_mma.w2a8_mma(codes, x_scale, sums, weights[i % len(weights)], scale, out, config=config)
    return median_us([functools.partial(layer, i) for i in range(max(len(w) for _, w, _ in layers))],
                     reps=reps, sleep_cycles=5 * SLEEP_CYCLES)


def sweep_sequence(batches: list[int]) -> None:
    """Time each CUDA kernel config of one shape with the four shapes called back to back, the other three as
    planned (to pick `gpu_mma.TUNED`: in sequence each kernel starts while the one before ends)."""
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    layers = [(n, [gpu.repack(random_packed(n, k)) for _ in range(sets_for(n * k // 4))], torch.rand(n, device="cuda"))
              for n, k in SHAPES.values()]
    for m in batches:
        inputs = [(*gpu.quantize_rows(torch.randn(m, w[0].shape[1], device="cuda", dtype=torch.bfloat16)),
                   torch.empty(m, n, dtype=torch.bfloat16, device="cuda")) for n, w, _ in layers]
        planned = [gpu_mma.plan(m, *w[0].shape, sm_count) for _, w, _ in layers]
        for index, name in enumerate(SHAPES):
            configs = _cuda_configs({planned[index][0], 8 if m <= 8 else 16, 32 if m > 16 else 16})
            _report(f"sweep sequence M={m} {name} (planned {planned[index]})",
                    [(_sequence_us(layers, inputs, planned[:index] + [c] + planned[index + 1:]), c) for c in configs])
        print(f"sweep sequence M={m}: planned {_sequence_us(layers, inputs, planned, REPS):.2f} us", flush=True)


def sweep_mma(batches: list[int]) -> None:
    """Time Triton tensor-core block configurations per shape and batch (to pick `_mma_config` and `_gemm_config`).
    Small M: (BLOCK_M, BLOCK_R, BLOCK_K, warps, stages, K splits); large M: (BLOCK_M, BLOCK_N, BLOCK_K, warps,
    stages) of the int8 GEMM after unpacking."""
    small = [(bm, br, 256, 4, 1, splits) for bm, br in ((16, 16), (16, 32), (64, 16), (64, 32))
             for splits in (1, 2, 4, 8, 10)]
    configs = {
        64: [c for c in small if c[0] == 64],
        2048: [
            (128, 128, 128, 4, 3), (128, 128, 128, 4, 2), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
            (128, 64, 128, 4, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 3), (64, 128, 128, 4, 4),
            (64, 64, 128, 4, 4), (128, 64, 256, 4, 3), (64, 256, 128, 4, 3), (256, 64, 128, 8, 3),
            (256, 128, 128, 8, 3), (128, 128, 64, 4, 5), (64, 128, 256, 4, 3)],
    }
    for m in batches:
        for name, (n, k) in SHAPES.items():
            weights = [gpu.repack(random_packed(n, k)) for _ in range(sets_for(n * k // 4))]
            scale = torch.rand(n, device="cuda") + 0.5
            codes, x_scale, sums = gpu.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            timed = []
            for config in configs[m]:
                try:
                    timed.append((_time_config(codes, x_scale, sums, weights, scale, n, config), config))
                except Exception as error:  # noqa: BLE001 - a config that does not compile is just skipped
                    print(f"  {config}: {type(error).__name__}")
            _report(f"sweep M={m} {name}", timed)
            del weights


def main(argv: list[str]) -> None:
    if "--wgmma-pick" in argv:
        compare_wgmma_pick([32, 33, 64, 128, 512, 2048, 8192])
        return
    if "--sweep-sequence" in argv:
        sweep_sequence([2, 4, 8, 16, 24, 32, 48, 64])
        return
    if "--sweep" in argv:
        sweep_gemv()
        sweep_cuda_mma([2, 8, 16, 32, 64])
        sweep_wgmma([64, 512, 2048])
        sweep_mma([64, 2048])
        return
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    flag = torch.zeros(1, device="cuda")
    empty_us = median_us([lambda: _empty_kernel[(1,)](flag)])
    floors = {name: read_floor_us(n * k // 4) for name, (n, k) in SHAPES.items()}
    rows = [bench_shape(name, n, k, m, floors[name]) for m in BATCHES for name, (n, k) in SHAPES.items()]
    sequences = {m: bench_sequence(m) for m in BATCHES}
    header = (f"{'shape':8} {'M':>5} {'W2A8 us':>8} {'+quant':>7} {'cuBLAS':>8} {'x cuBLAS':>8} "
              f"{'GB/s':>6} {'of 3TB/s':>8} {'floor':>6} {'MSFT us':>7}")
    lines = [header]
    for r in rows:
        msft = f"{r['microsoft_us']:7.1f}" if r["microsoft_us"] else f"{'':7}"
        lines.append(f"{r['shape']:8} {r['M']:5} {r['w2a8_us']:8.2f} {r['w2a8_with_quant_us']:7.2f} "
                     f"{r['cublas_bf16_us']:8.2f} {r['speedup_vs_cublas']:8.2f} {r['weight_GBps']:6.0f} "
                     f"{r['share_of_3TBps']:8.0%} {r['read_floor_us']:6.2f} {msft}")
    sums = {}
    for m in BATCHES:
        part = [r for r in rows if r["M"] == m]
        sums[m] = {"w2a8_us": sum(r["w2a8_us"] for r in part), "cublas_bf16_us": sum(r["cublas_bf16_us"] for r in part),
                   "read_floor_us": sum(floors.values())}
        lines.append(f"{'sum':8} {m:5} {sums[m]['w2a8_us']:8.2f} {'':7} {sums[m]['cublas_bf16_us']:8.2f} "
                     f"{sums[m]['cublas_bf16_us'] / sums[m]['w2a8_us']:8.2f} {'':6} {'':8} "
                     f"{sums[m]['read_floor_us']:6.2f}")
        seq = sequences[m]
        lines.append(f"{'in seq.':8} {m:5} {seq['w2a8_us']:8.2f} {'':7} {seq['cublas_bf16_us']:8.2f} "
                     f"{seq['speedup_vs_cublas']:8.2f}")
    lines.append(f"empty kernel: {empty_us:.2f} us per call")
    print("\n".join(lines))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "reps": REPS, "method": "CUDA events per call after a sleep kernel, median; weights rotated over >= 200 MB",
        "empty_kernel_us": empty_us, "rows": rows, "sums_per_layer": sums, "in_sequence_per_layer": sequences,
        "microsoft_m1_sum_us": sum(MICROSOFT_M1_US.values()),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
