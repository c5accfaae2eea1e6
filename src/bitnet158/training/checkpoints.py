"""Training checkpoints: `out/checkpoints/step_XXXXXXXX/` folders, each written whole or not at all.

A checkpoint is written into a hidden temporary folder and renamed into place when complete, so a run killed
at any moment (SIGKILL included) leaves only complete checkpoints; `state.json` is the last file written in
the folder. Only the newest `keep_last` are kept. The files:
- `model.safetensors`: the fp master weights (the tied `lm_head.weight` left out), loadable on its own;
- `optimizer.pt`: the optimizer's state, keyed by parameter name (torch.distributed.checkpoint's full state
  dict, so DDP, FSDP and single-process runs read each other's checkpoints);
- `state.json`: the step, samples and tokens consumed, and the run's config.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bitnet158.errors import UserError
from bitnet158.files import read_json_object, write_json

NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) CPU state dicts of the model and the optimizer; every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def save_checkpoint(
    out: Path, step: int, model_state: dict, optimizer_state: dict, state: dict[str, Any], keep_last: int,
    tied: bool,
) -> Path:  # fmt: skip
    """Write checkpoint `step` (see the module docstring) and delete all but the newest `keep_last`."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.contiguous() for name, t in model_state.items() if not (tied and name == "lm_head.weight")}
    save_file(tensors, tmp / "model.safetensors", {"format": "pt"})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    write_json(tmp / "state.json", {**state, "step": step})
    _fsync_dir(tmp)
    if final.exists():  # the same step written again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first; leftover temporary folders of a killed run are removed."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(".step_") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
        elif NAME.match(path.name) and (path / "state.json").is_file():
            found.append(path)
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, tied: bool) -> dict:
    """Put the checkpoint's weights and optimizer state into (possibly DDP- or FSDP-wrapped) `model` and
    `optimizer`; return its `state.json`."""
    state = read_json_object(folder / "state.json")
    try:
        model_state = load_file(folder / "model.safetensors")
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"{folder}: unreadable checkpoint ({err})") from None
    if tied:
        model_state["lm_head.weight"] = model_state["model.embed_tokens.weight"]
    try:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))  # fmt: skip
    except (RuntimeError, KeyError, ValueError) as err:
        raise UserError(f"{folder}: the checkpoint does not fit this model ({str(err).splitlines()[0]})") from None
    return state
