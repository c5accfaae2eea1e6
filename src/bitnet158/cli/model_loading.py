"""Choosing the device and loading a model folder for the CLI, with a progress bar past one second."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bitnet158.errors import UserError
from bitnet158.formats.gguf_import import load_gguf_tokenizer
from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.tokenizer import Tokenizer

PROGRESS_DELAY_S = 1.0


def embedded_model_path() -> Path:
    """The small ternary model that ships inside the package."""
    return Path(str(resources.files("bitnet158") / "assets" / "embedded"))


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def estimated_bytes(config: BitNetConfig, dtype: torch.dtype) -> int:
    """Memory the loaded model will hold: 2 bits per ternary weight, `dtype` for the rest."""
    counts = config.num_parameters()
    return counts["ternary"] // 4 + counts["high_precision"] * dtype.itemsize


def load_tokenizer(path: Path | None) -> Tokenizer:
    """The tokenizer of a model folder or .gguf file (default: the embedded model)."""
    folder = path if path is not None else embedded_model_path()
    if folder.suffix == ".gguf" and folder.is_file():
        return load_gguf_tokenizer(folder)
    if not folder.is_dir():
        raise UserError(f"--model {folder}: no such folder or .gguf file")
    return Tokenizer.from_pretrained(folder)


def load_model(path: Path | None, device: torch.device) -> tuple[BitNetForCausalLM, Tokenizer]:
    """Load a model folder (default: the embedded model) or a .gguf file and its tokenizer, refusing a
    folder too large for the device."""
    folder = path if path is not None else embedded_model_path()
    # float32 on the CPU: the high-precision parts cost little there, and a row's result then does not
    # depend on the rest of the batch (the server relies on it); bf16 elsewhere.
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokenizer = load_tokenizer(folder)
    if folder.is_dir():  # a folder's config says how much memory it needs
        config = BitNetConfig.from_json(folder / "config.json")
        needed, available = estimated_bytes(config, dtype), _available_bytes(device)
        if available is not None and needed > available:
            raise UserError(
                f"--model {folder}: needs about {needed / 2**30:.1f} GiB on {device.type}, "
                f"only {available / 2**30:.1f} GiB is free"
            )

    started = time.monotonic()
    progress = Progress(
        TextColumn("loading {task.description}"), BarColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )
    task = progress.add_task(folder.name, total=None)

    def report(done: int, total: int) -> None:
        if not progress.live.is_started and time.monotonic() - started > PROGRESS_DELAY_S:
            progress.start()
        progress.update(task, completed=done, total=total)

    try:
        model = BitNetForCausalLM.from_pretrained(folder, device=device, dtype=dtype, progress=report)
    finally:
        progress.stop()
    return model, tokenizer
