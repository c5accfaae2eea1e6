"""Peak memory and time of loading a packed checkpoint of the 2B4T architecture on the CPU.

Writes a checkpoint with random ternary weights and bf16 embeddings (as Microsoft ships it) with our
`save_pretrained` into a temporary folder, and the same model as GGUF (TQ2_0, F16 embeddings, the
embedded model's tokenizer padded to the vocabulary), then loads each with
`BitNetForCausalLM.from_pretrained` in a fresh Python process per case and reads that process's
peak resident set size (VmHWM in
/proc/self/status: anonymous memory plus the touched pages of memory-mapped files). Each case runs
REPEATS times; the table shows the highest peak and the median load time. The file was just written
(and synced), so it is in the page cache: load times are warm-cache times.

    python benchmarks/load_memory.py [OUTPUT_JSON]     (default benchmarks/results/load_memory.json)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitnet158 import BitNetConfig, BitNetForCausalLM, PackedBitLinear, freeze_
from bitnet158.formats.gguf_export import save_gguf
from bitnet158.tokenizer import Tokenizer

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bitnet-b1.58-2B-4T.config.json"
EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "bitnet158" / "assets" / "embedded"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "load_memory.json"
MiB = 2**20

# Each case loads a file in a fresh process: (label, file, dtype argument of from_pretrained).
CASES = [("safetensors, default dtype", "model.safetensors", None),
         ("safetensors, dtype=float32", "model.safetensors", "float32"),
         ("gguf tq2_0, default dtype", "model.gguf", None)]
REPEATS = 3

# Runs in the child process: argv is (folder, dtype or ""); prints one JSON object.
CHILD = """
import json, sys, time
import torch
from bitnet158 import BitNetForCausalLM

def status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

folder, dtype = sys.argv[1], sys.argv[2]
baseline = status_mib("VmRSS")
started = time.perf_counter()
model = BitNetForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype) if dtype else None)
seconds = time.perf_counter() - started
print(json.dumps({
    "load_s": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": status_mib("VmHWM"),
    "rss_after_mib": status_mib("VmRSS"), "anon_after_mib": status_mib("RssAnon"),
    "file_after_mib": status_mib("RssFile"), "model_dtype": str(model.dtype),
}))
"""

# Bytes whose four 2-bit fields are all valid codes (0, 1, 2 store -1, 0, +1): random ternary weights.
VALID_BYTES = torch.tensor(
    [b for b in range(256) if all((b >> shift) & 3 != 3 for shift in (0, 2, 4, 6))], dtype=torch.uint8
)


@torch.no_grad()
def write_random_checkpoint(folder: Path) -> None:
    """The 2B4T architecture with random packed ternary weights, saved in its config's dtype (bf16)."""
    config = BitNetConfig.from_json(CONFIG)
    with torch.device("meta"):
        model = freeze_(BitNetForCausalLM(config))
    for module in model.modules():
        if isinstance(module, PackedBitLinear):
            picks = torch.randint(len(VALID_BYTES), module.weight.shape)
            module.weight = VALID_BYTES[picks]
            module.weight_scale = torch.rand(1) + 0.5
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        value = torch.randn(param.shape, dtype=torch.bfloat16) * 0.02 if param.dim() == 2 else torch.ones(param.shape)
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    model.tie_weights()
    model.save_pretrained(folder)


def measure(path: Path, dtype: str | None) -> dict:
    runs = [
        json.loads(subprocess.run(
            [sys.executable, "-c", CHILD, str(path), dtype or ""], check=True, capture_output=True, text=True
        ).stdout)
        for _ in range(REPEATS)
    ]
    worst = max(runs, key=lambda run: run["peak_rss_mib"])
    return {**worst, "load_s": statistics.median(run["load_s"] for run in runs),
            "load_s_runs": [run["load_s"] for run in runs]}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor()


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUTPUT
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        write_random_checkpoint(folder)
        model = BitNetForCausalLM.from_pretrained(folder)
        save_gguf(model, Tokenizer.from_pretrained(EMBEDDED), folder / "model.gguf")
        del model
        os.sync()  # loading while the kernel still writes the files back is slower and varies
        print(f"wrote the checkpoints in {time.perf_counter() - started:.1f} s")
        rows = []
        for label, file, dtype in CASES:
            path = folder / file
            file_mib = path.stat().st_size / MiB
            row = {"case": label, "file": file, "file_mib": file_mib, "dtype_argument": dtype,
                   **measure(folder if file.endswith(".safetensors") else path, dtype)}
            row["peak_over_file"] = row["peak_rss_mib"] / file_mib
            row["peak_above_baseline_over_file"] = (row["peak_rss_mib"] - row["baseline_rss_mib"]) / file_mib
            rows.append(row)

    print("2B4T architecture, random packed ternary weights; safetensors: bf16 embeddings, gguf: f16")
    header = ["case", "file MiB", "model dtype", "load s", "baseline MiB", "peak RSS MiB", "peak / file",
              "(peak - baseline) / file"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(
            f"{row['case']} | {row['file_mib']:.0f} | {row['model_dtype']} | {row['load_s']:.2f} | "
            f"{row['baseline_rss_mib']:.0f} | {row['peak_rss_mib']:.0f} | {row['peak_over_file']:.2f} | "
            f"{row['peak_above_baseline_over_file']:.2f}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(),
               "threads": torch.get_num_threads()}
    output.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
