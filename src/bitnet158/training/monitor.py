"""What a run reports: a rich progress bar (loss, tokens/s, ETA), `log.jsonl` and TensorBoard.

Only the first process of a distributed run reports. `log.jsonl` has one JSON object a line: training records
(`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...) and validation records (`val_loss`, `val_perplexity`). On
resume the records past the checkpoint's step are dropped, so the log of a killed-and-resumed run reads like
that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bitnet158.files import write_atomically
from bitnet158.training.config import require


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the torn last line of a killed run
    return records


class Monitor:
    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool,
                 progress: str) -> None:  # fmt: skip
        self.enabled = enabled
        self.log_path = out / "log.jsonl"
        self.writer = None
        self.progress = None
        self.console = Console(file=sys.stdout)
        if not enabled:
            return
        # Keep only what the checkpoint we start from had seen.
        kept = [r for r in read_log(self.log_path) if r.get("step", 0) <= start_step] if start_step else []
        write_atomically(self.log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
        self.log_file = open(self.log_path, "a", encoding="utf-8")
        if tensorboard:
            require("tensorboard", "tensorboard", "TensorBoard logging (turn it off with --no-tensorboard)")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        show_bar = progress == "on" or (progress == "auto" and self.console.is_terminal)
        if show_bar:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            )  # fmt: skip
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-", speed="-")
            self.progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    group = "val" if key.startswith("val_") else "train"
                    self.writer.add_scalar(f"{group}/{key}", value, step)

    def train_step(self, record: dict[str, Any], print_line: bool) -> None:
        self.record(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], loss=f"{record['loss']:.4f}",
                                 speed=f"{record['tokens_per_s']:,.0f}")  # fmt: skip
        elif print_line:
            self.print(f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
                       f"{record['tokens_per_s']:,.0f} tokens/s")  # fmt: skip

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def validation(self, step: int, loss: float) -> None:
        self.record({"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 700))})
        self.print(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        self.log_file.close()
