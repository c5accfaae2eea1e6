"""Token files: batches of random windows for training, and every window in order for evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bitnet158.errors import UserError


def load_tokens(path: Path, min_length: int) -> np.ndarray:
    """A uint16 token file, memory-mapped; it must hold at least `min_length` tokens."""
    if not path.is_file():
        raise UserError(f"{path}: no such token file")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) < min_length:
        raise UserError(f"{path}: {len(tokens)} tokens, fewer than the {min_length} one batch needs")
    return tokens


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets `[batch, seq_len]` from windows starting at random offsets."""
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def sequential_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every non-overlapping window of the file once, in order, so that evaluation is deterministic."""
    num_windows = (len(tokens) - 1) // seq_len
    for first in range(0, num_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, num_windows) * seq_len, seq_len)
        windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        windows = windows.to(device)
        yield windows[:, :-1], windows[:, 1:]
