"""A preallocated key/value cache for a batch of left-padded sequences.

Every sequence in the batch writes its next tokens into the same slots; a sequence whose prompt is
shorter than the longest is padded on the left, and its pad slots are masked out of attention.
"""

from __future__ import annotations

import torch

from bitnet158.model.config import BitNetConfig


class KVCache:
    def __init__(
        self,
        config: BitNetConfig,
        batch_size: int,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.padding = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = max_length
        self.length = 0

    def set_padding(self, padding: torch.Tensor) -> None:
        """Number of left pad tokens in each sequence's prompt. Written into the existing tensor: a
        captured decode graph reads it at a fixed address."""
        self.padding.copy_(padding)

    def positions(self, num_new: int) -> torch.Tensor:
        """Rotary positions `[batch, num_new]` of the next tokens: slot minus left padding."""
        slots = torch.arange(self.length, self.length + num_new, device=self.keys.device)
        return (slots[None, :] - self.padding[:, None]).clamp(min=0)

    def attention_mask(self, num_new: int) -> torch.Tensor:
        """Boolean mask `[batch, 1, num_new, length + num_new]`: causal, with pad slots hidden.

        A pad query attends to itself, so that no row of the softmax is empty (an empty row is NaN).
        """
        query = torch.arange(self.length, self.length + num_new, device=self.keys.device)[:, None]
        key = torch.arange(self.length + num_new, device=self.keys.device)[None, :]
        visible = (key <= query)[None] & (key[None] >= self.padding[:, None, None])
        return (visible | (key == query)[None])[:, None]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new `[batch, kv_heads, num_new, head_dim]` keys and values; return all so far."""
        end = self.length + keys.shape[2]
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new
