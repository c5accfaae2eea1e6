"""M = 2048 back to back over the unpacking's block and the GEMM's group size; the best goes to $OUT/best."""
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
import gpu_kernels as gk  # noqa: E402

from bitnet158.kernels import gpu  # noqa: E402

torch.manual_seed(0)
m = 2048
ours, cublas = [], []
for n, k in gk.SHAPES.values():
    weights = [gpu.repack(gk.random_packed(n, k)) for _ in range(gk.sets_for(n * k // 4))]
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(gk.sets_for(2 * n * k))]
    scale = torch.rand(n, device="cuda") + 0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    codes, x_scale, sums = gpu.quantize_rows(x)
    ours.append([lambda w=w, c=codes, s=x_scale, t=sums, v=scale, n=n: gpu.w2a8_matmul(c, s, t, w, v, n)
                 for w in weights])
    cublas.append([lambda w=w, x=x: F.linear(x, w) for w in dense])


def seq(calls_per_shape, reps):
    def layer(i):
        for calls in calls_per_shape:
            calls[i % len(calls)]()
    return gk.median_us([functools.partial(layer, i) for i in range(max(map(len, calls_per_shape)))], reps=reps,
                        sleep_cycles=5 * gk.SLEEP_CYCLES)


def run(variant, reps=100):
    gpu.UNPACK_BLOCK, gpu.GEMM_GROUP_M = variant
    return seq(ours, reps)


current = ((16, 64), 8)
variants = [current, ((32, 64), 8), ((16, 128), 8), ((8, 128), 8), ((32, 32), 8), ((64, 32), 8),
            ((16, 64), 16), ((16, 64), 4)]
timed = sorted((run(v), v) for v in variants)
print("sweep: " + ", ".join(f"{v}: {t:.1f}" for t, v in timed), flush=True)
unpack = min((t, v) for t, v in timed if v[1] == 8)[1][0]
group = min((t, v) for t, v in timed if v[0] == (16, 64))[1][1]
best = (unpack, group)
rows = []
for _ in range(3):
    rows.append((run(current, 200), run(best, 200)))
base = seq(cublas, 200)
print(f"current {current} vs best {best}: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in rows)
      + f"; cuBLAS {base:.1f}: {base / min(a for a, _ in rows):.3f}x / {base / min(b for _, b in rows):.3f}x",
      flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "best"), "w") as f:
    f.write(f"{unpack[0]} {unpack[1]} {group}\n")
