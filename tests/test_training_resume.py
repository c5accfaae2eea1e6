"""A run killed with SIGKILL mid-training and resumed gives the loss curve of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet158.training.config import TrainConfig
from bitnet158.training.corpus import build_corpus
from bitnet158.training.monitor import read_log
from bitnet158.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 32, "torch_dtype": "float32"}  # fmt: skip
STEPS = 40


def _yaml(tmp_path: Path, out: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for i in range(30):
        (root / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 5}\n\n\nclass C{i}:\n    n = {i}\n")
    build_corpus(tmp_path / "data", root=root, vocab_size=300, val_percent=20)
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(f"""
data: [data]
model_config: model.json
out: {out}
steps: {STEPS}
batch_size: 4
seq_len: 16
lr: 3e-3
warmup: 4
eval_every: 10
save_every: 3
keep_last: 2
log_every: 1
deterministic: true
tensorboard: false
device: cpu
seed: 7
""")
    return path


def test_sigkilled_run_resumes_to_the_same_loss_curve(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    config = _yaml(tmp_path, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "bitnet158", "train", "--config", str(config)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill it once it has trained past a checkpoint but before it ends.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        steps = [r["step"] for r in read_log(killed / "log.jsonl") if "loss" in r]
        if steps and steps[-1] >= 17:
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(r["step"] for r in read_log(killed / "log.jsonl") if "loss" in r)
    assert 17 <= killed_at < STEPS and not (killed / "metrics.json").exists()
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(checkpoints) <= 2  # keep_last

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    # The uninterrupted run, in this process (also one thread, also deterministic).
    reference = tmp_path / "reference"
    metrics = train(TrainConfig.from_sources(config, out=reference))

    def curve(out: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(out / "log.jsonl")]

    assert [step for step, _, _ in curve(killed) if step] == [step for step, _, _ in curve(reference) if step]
    assert curve(killed) == curve(reference)  # bit for bit, validation included
    assert len([r for r in curve(reference) if r[1] is not None]) == STEPS
    assert json.loads((killed / "metrics.json").read_text())["history"] == metrics["history"]
    assert (killed / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
