"""A key/value cache of independent slots, for serving: each slot holds one sequence with its own length.

A request takes a free slot, is prefilled into it and then decodes one token per step together with
the requests in the other slots, whatever their lengths. `SlotCache.batch(...)` gives the model a view
of some slots that behaves like `KVCache` (positions, attention mask, update, advance), so the model
runs unchanged. Each row's queries see exactly its own slot's keys: the other rows' keys and the
unused tail of the slot are masked out, so what a request computes does not depend on its neighbours.
On the CPU the native decoder reads and writes the slots directly (`kernels.cpu_decode.forward_slots`),
on CUDA the graph-captured decode step (`generation.gpu_decode.SlotDecoder`).
"""

from __future__ import annotations

import torch

from bitnet158.devices import host_to_device
from bitnet158.model.config import BitNetConfig


class SlotCache:
    def __init__(
        self,
        config: BitNetConfig,
        num_slots: int,
        max_length: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Slot-major per layer, so that gathering the batch's slots is one index_select per layer.
        shape = (config.num_hidden_layers, num_slots, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * num_slots
        self.num_slots = num_slots
        self.max_length = max_length

    def batch(self, slots: list[int], num_new: list[int]) -> SlotBatch:
        """A view of `slots` for one forward pass that appends `num_new[i]` tokens to slot `slots[i]`
        (the input is right-padded to the longest; pad tokens are written past the slot's end and masked)."""
        return SlotBatch(self, slots, num_new)

    def release(self, slot: int) -> None:
        """Empty a slot; its stale keys are masked out until overwritten."""
        self.lengths[slot] = 0

    def tokens_held(self) -> int:
        return sum(self.lengths)


class SlotBatch:
    """The `KVCache` interface over some slots of a `SlotCache`, for `BitNetForCausalLM.forward`."""

    def __init__(self, cache: SlotCache, slots: list[int], num_new: list[int]) -> None:
        self.cache = cache
        device = cache.keys.device
        self.slots = host_to_device(slots, device)
        self.starts = host_to_device([cache.lengths[s] for s in slots], device)
        self.ends = self.starts + host_to_device(num_new, device)  # each slot's length after this pass
        self.slot_list, self.num_new = slots, num_new
        self.length = max(cache.lengths[s] for s in slots)  # the model checks length + seq <= max_length
        self.max_length = cache.max_length

    def positions(self, num_new: int) -> torch.Tensor:
        """Rotary positions `[batch, num_new]`: each row continues its own slot."""
        return self.starts[:, None] + torch.arange(num_new, device=self.starts.device)[None, :]

    def attention_mask(self, num_new: int) -> torch.Tensor:
        """Boolean `[batch, 1, num_new, length + num_new]`: causal within the row's own keys, which end
        at the slot's new length. A pad query still sees the real keys, so no softmax row is empty."""
        query = self.positions(num_new)[:, :, None]
        key = torch.arange(self.length + num_new, device=self.starts.device)[None, None, :]
        return ((key <= query) & (key < self.ends[:, None, None]))[:, None]

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new `[batch, kv_heads, num_new, head_dim]` keys and values into their slots; return
        the batch's keys and values so far, `[batch, kv_heads, length + num_new, head_dim]`."""
        num_new = keys.shape[2]
        positions = self.positions(num_new)
        rows = self.slots[:, None].expand_as(positions)
        # Advanced indices around a slice put the indexed dims first: [batch, num_new, kv_heads, head_dim].
        self.cache.keys[layer][rows, :, positions] = keys.transpose(1, 2)
        self.cache.values[layer][rows, :, positions] = values.transpose(1, 2)
        end = self.length + num_new
        return (
            self.cache.keys[layer, :, :, :end].index_select(0, self.slots),
            self.cache.values[layer, :, :, :end].index_select(0, self.slots),
        )

    def advance(self, num_new: int) -> None:
        for slot, added in zip(self.slot_list, self.num_new, strict=True):
            self.cache.lengths[slot] += added
