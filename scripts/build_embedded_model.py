"""Rebuild the model that ships in src/bitnet158/assets/embedded/, from the Python standard library alone.

Run from the repository root, one stage at a time (the stages ran on different machines):

    python scripts/build_embedded_model.py corpus   # any CPU, ~15 s: runs/stdlib (tokenizer and tokens)
    python scripts/build_embedded_model.py train    # one CUDA GPU: runs/ternary and its bf16 baseline runs/bf16
    python scripts/build_embedded_model.py install  # any CPU: copy runs/ternary into the package, check it there

`train` runs the ternary model and the bf16 baseline of the same shape side by side on the one GPU, with
the same data, seed and hyperparameters, so with the same token budget (1500 steps of 32 x 1024 tokens).
Without an installed package, put `src` on PYTHONPATH.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bitnet158.generation import SamplingParams, generate
from bitnet158.model import BitNetForCausalLM
from bitnet158.tokenizer import Tokenizer
from bitnet158.training.corpus import build_corpus
from bitnet158.training.trainer import evaluate

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "runs" / "stdlib"
RUNS = {"ternary": ROOT / "runs" / "ternary", "bf16": ROOT / "runs" / "bf16"}
ASSETS = ROOT / "src" / "bitnet158" / "assets" / "embedded"
SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

SEQ_LEN = 1024
TRAIN_FLAGS = [
    "--data", str(DATA), "--model-config", str(ROOT / "scripts" / "embedded_model.json"),
    "--steps", "1500", "--batch-size", "32", "--seq-len", str(SEQ_LEN), "--lr", "1.5e-3", "--warmup", "200",
    "--eval-every", "250", "--seed", "0",
]  # fmt: skip
PROMPT = "def fibonacci(n):"


def corpus() -> None:
    manifest = build_corpus(DATA)
    print(json.dumps({key: value for key, value in manifest.items() if key != "val_files"}, indent=2))


def train() -> None:
    processes = {}
    for precision, out in RUNS.items():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bitnet158", "train", *TRAIN_FLAGS,
                   "--precision", precision, "--out", str(out)]
        log = open(out / "train.log", "w")  # the child writes to it until it exits
        processes[precision] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    failed = [precision for precision, process in processes.items() if process.wait() != 0]
    if failed:
        sys.exit(f"training failed: {', '.join(failed)} (see runs/<precision>/train.log)")
    for precision, out in RUNS.items():
        metrics = json.loads((out / "metrics.json").read_text())
        print(f"{precision}: validation perplexity {metrics['val_perplexity']:.3f} after "
              f"{metrics['tokens_trained']:,} tokens in {metrics['seconds']:.0f} s")


def install() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(RUNS["ternary"] / name, ASSETS / name)
        print(f"{name}: {(ASSETS / name).stat().st_size:,} bytes")

    # The packed model, as users load it, on the CPU in float32.
    model = BitNetForCausalLM.from_pretrained(ASSETS)
    tokenizer = Tokenizer.from_pretrained(ASSETS)
    text = generate(model, tokenizer, [PROMPT], SamplingParams(max_new_tokens=60, temperature=0))[0]
    print(f"greedy continuation:\n{PROMPT}{text}\n")

    start = time.perf_counter()
    val_tokens = np.fromfile(DATA / "val.bin", dtype=np.uint16)
    loss = evaluate(model, val_tokens, batch_size=8, seq_len=SEQ_LEN, device=model.device)
    gpu = json.loads((RUNS["ternary"] / "metrics.json").read_text())
    print(f"validation perplexity of the packed model on the CPU: {math.exp(loss):.3f} "
          f"({time.perf_counter() - start:.0f} s); in training, on {gpu['device']}: {gpu['val_perplexity']:.3f}")


if __name__ == "__main__":
    stages = {"corpus": corpus, "train": train, "install": install}
    if len(sys.argv) != 2 or sys.argv[1] not in stages:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(stages)}}}")
    stages[sys.argv[1]]()
