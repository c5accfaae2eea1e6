"""M = 2048, the four 2B4T shapes back to back, over the large-M path's launch knobs: the unpacking's block, the
GEMM's group size and its tile config for K = 2,560 (qkv, gate+up; o and down run on the wgmma kernel there).
Each knob is swept with the others at their values in gpu.py; then those and the best of each alternate, with
cuBLAS bf16 beside them. Prints a table and writes JSON."""
import argparse
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
import gpu_kernels as gk  # noqa: E402

from bitnet158.kernels import gpu  # noqa: E402

M = 2048
GPU_GEMM_CONFIG = gpu._gemm_config
CURRENT = {"unpack": gpu.UNPACK_BLOCK, "group_m": gpu.GEMM_GROUP_M, "gemm": gpu._gemm_config(2560)}
CHOICES = {
    "unpack": [(16, 64), (32, 64), (16, 128), (8, 128), (32, 32), (64, 32)],
    "group_m": [4, 8, 16],
    "gemm": [(128, 128, 128, 4, 3), (128, 128, 64, 4, 4), (128, 128, 64, 4, 5), (128, 256, 64, 8, 3),
             (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)],
}


def apply(knobs: dict) -> None:
    gpu.UNPACK_BLOCK, gpu.GEMM_GROUP_M = knobs["unpack"], knobs["group_m"]
    gpu._gemm_config = lambda kp: knobs["gemm"] if kp < 4096 else GPU_GEMM_CONFIG(kp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default=str(gk.DEFAULT_OUTPUT.with_name("gemm_knobs.json")))
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, cublas = gk.sequence_calls(M)

    def timed(knobs: dict, reps: int = 100) -> float:
        apply(knobs)
        return gk.in_sequence_us(ours, reps)

    sweep, best = [], dict(CURRENT)
    for knob, values in CHOICES.items():
        others = [v for v in values if v != CURRENT[knob]]
        results = [(timed(CURRENT), CURRENT[knob])] + [(timed({**CURRENT, knob: v}), v) for v in others]
        sweep += [{"knob": knob, "value": v, "us": t} for t, v in results]
        best[knob] = min(results)[1]
        print(f"{knob:8} " + ", ".join(f"{v}: {t:.1f}" for t, v in results), flush=True)
    rounds = [{"current": timed(CURRENT, 200), "best": timed(best, 200)} for _ in range(3)]
    base = gk.in_sequence_us(cublas, 200)
    print(f"\nbest {best}\n| round | current knobs us | best knobs us |\n| --- | --- | --- |")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r['current']:.1f} | {r['best']:.1f} |")
    fastest = {key: min(r[key] for r in rounds) for key in ("current", "best")}
    print(f"cuBLAS bf16 {base:.1f} us: current {base / fastest['current']:.3f}x, best {base / fastest['best']:.3f}x")
    with open(args.output, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "m": M, "sweep": sweep, "best": best, "rounds": rounds,
                   "cublas_us": base}, f, indent=1)


if __name__ == "__main__":
    main()
