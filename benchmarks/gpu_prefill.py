"""Prefill on the GPU by prompt length, on the 2B4T architecture with random ternary weights: the model's
ordinary forward, `prefill_layers` run eagerly (generate()'s prefill), and the server's prefill graphs
(`SlotDecoder.prefill`, one per bucket of lengths, the prompt padded to its bucket).

Each pass appends one prompt to an empty cache slot (no `lm_head`). GPU time by CUDA events and the host's
time in the call, medians of REPEATS after two warm-ups. Eagerly the host issues every launch, so below a
few thousand tokens the host time is the pass's time.

    python benchmarks/gpu_prefill.py [OUTPUT_JSON]     (default benchmarks/results/gpu_prefill.json)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from gpu_decode import random_model

from bitnet158 import BitNetForCausalLM
from bitnet158.generation.gpu_decode import prefill_layers
from bitnet158.serve.runner import ModelRunner

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "gpu_prefill.json"
LENGTHS = (64, 100, 128, 512, 1000, 2000, 4000)
REPEATS = 7


def timed(prefill) -> tuple[float, float]:
    """(GPU ms from the first launch to the last kernel's end, host ms in the call) of one call of `prefill`."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    prefill()
    end.record()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    return start.elapsed_time(end), host * 1000


def passes(model: BitNetForCausalLM, runner: ModelRunner, tokens: list[int]) -> dict[str, Callable[[], None]]:
    """Each way to prefill `tokens` into slot 0 of the runner's cache, from empty."""
    cache, ids, length = runner.cache, torch.tensor([tokens], device="cuda"), len(tokens)

    def forward() -> None:
        cache.release(0)
        model.model(ids, cache.batch([0], [length]))

    def eager() -> None:
        cache.release(0)
        prefill_layers(model, ids, cache.batch([0], [length]))

    def graph() -> None:
        cache.release(0)
        runner.decoder.prefill(0, tokens)

    return {"forward": forward, "prefill_layers": eager, "graph": graph}


@torch.inference_mode()
def main(argv: list[str]) -> None:
    output = Path(argv[0]) if argv else DEFAULT_OUTPUT
    torch.manual_seed(0)
    model = random_model(ternary=True)
    runner = ModelRunner(model, 1)  # captures the prefill graphs
    rows = []
    for length in LENGTHS:
        tokens = torch.randint(0, model.config.vocab_size, (length,)).tolist()
        for path, prefill in passes(model, runner, tokens).items():
            prefill(), prefill()
            runs = [timed(prefill) for _ in range(REPEATS)]
            gpu, host = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append({"tokens": length, "path": path, "gpu_ms": round(gpu, 2), "host_ms": round(host, 2)})
    names = list(dict.fromkeys(r["path"] for r in rows))
    print(f"{'tokens':>6} " + " ".join(f"{name + ' gpu / host ms':>30}" for name in names))
    for length in LENGTHS:
        cells = [f"{r['gpu_ms']:.2f} / {r['host_ms']:.2f}" for r in rows if r["tokens"] == length]
        print(f"{length:>6} " + " ".join(f"{cell:>30}" for cell in cells))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "repeats": REPEATS,
        "buckets": runner.decoder.prefill_buckets, "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
