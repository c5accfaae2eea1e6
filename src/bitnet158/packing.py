"""Bit-packed storage for ternary weights.

- 2 bits per weight, in transformers' `pack_weights` layout: a weight `T` of shape `[N, K]` packs into
  uint8 `[ceil(N / 4), K]`; with `R = ceil(N / 4)`, rows `r, r + R, r + 2R, r + 3R` share byte row `r`,
  the first block in the lowest two bits, each stored as `t + 1`. Padding rows (when 4 does not
  divide N) are stored as zero bits, as transformers does.
- Base 3: five weights per byte along the last dimension, `byte = sum((t_j + 1) * 3**j)`, 1.6 bits
  per weight; a last group shorter than five is padded with zeros.
"""

from __future__ import annotations

import torch

ROWS_PER_BYTE = 4
TRITS_PER_BYTE = 5
_POWERS_OF_3 = (1, 3, 9, 27, 81)


def _check_ternary(codes: torch.Tensor) -> None:
    if codes.dim() == 0 or codes.numel() == 0:
        raise ValueError(f"cannot pack a tensor of shape {tuple(codes.shape)}: it needs at least one value")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"ternary codes must be an integer tensor, got {codes.dtype}")
    if codes.min().item() < -1 or codes.max().item() > 1:
        raise ValueError("ternary codes must lie in {-1, 0, 1}")


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes of shape `[N, ...]` into uint8 `[ceil(N / 4), ...]`."""
    _check_ternary(codes)
    packed = torch.zeros((-(-codes.shape[0] // ROWS_PER_BYTE), *codes.shape[1:]), dtype=torch.uint8,
                         device=codes.device)
    pack_2bit_rows(packed, codes, 0)
    return packed


def pack_2bit_rows(packed: torch.Tensor, codes: torch.Tensor, first_row: int) -> None:
    """Write the codes of rows `first_row ...` of a tensor into its packed form `packed` (zeroed where
    not yet written), so that a large tensor can be packed a few rows at a time."""
    _check_ternary(codes)
    packed_rows = packed.shape[0]
    stored = (codes.to(torch.int8) + 1).view(torch.uint8)  # checked above: no overflow
    done = 0
    while done < stored.shape[0]:
        shift, offset = divmod(first_row + done, packed_rows)
        count = min(packed_rows - offset, stored.shape[0] - done)
        packed[offset : offset + count] |= stored[done : done + count] << (2 * shift)
        done += count


def unpack_2bit(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of `pack_2bit`: int8 codes of shape `[rows, ...]`."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"packed 2-bit weights must be a uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    packed_rows = packed.shape[0]
    if not ROWS_PER_BYTE * (packed_rows - 1) < rows <= ROWS_PER_BYTE * packed_rows:
        raise ValueError(f"{packed_rows} packed rows cannot hold {rows} rows of 2-bit weights")
    blocks = [((packed >> (2 * i)) & 3) for i in range(ROWS_PER_BYTE)]
    return (torch.cat(blocks, dim=0)[:rows].to(torch.int8) - 1)


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes of shape `[..., K]` into uint8 `[..., ceil(K / 5)]`."""
    _check_ternary(codes)
    length = codes.shape[-1]
    pad = -length % TRITS_PER_BYTE
    digits = torch.nn.functional.pad(codes.to(torch.int16) + 1, (0, pad), value=1)
    digits = digits.unflatten(-1, (-1, TRITS_PER_BYTE))
    powers = torch.tensor(_POWERS_OF_3, dtype=torch.int16, device=codes.device)
    return (digits * powers).sum(dim=-1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of `pack_base3`: int8 codes of shape `[..., length]`."""
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise ValueError(f"packed base-3 weights must be a uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    groups = packed.shape[-1]
    if not TRITS_PER_BYTE * (groups - 1) < length <= TRITS_PER_BYTE * groups:
        raise ValueError(f"{groups} base-3 bytes cannot hold {length} values")
    if packed.numel() and packed.max().item() >= 3**TRITS_PER_BYTE:
        raise ValueError(f"base-3 byte {packed.max().item()} is out of range: five trits reach at most 242")
    value = packed.to(torch.int16)
    digits = [(value // p) % 3 for p in _POWERS_OF_3]
    trits = torch.stack(digits, dim=-1).flatten(-2)[..., :length]
    return trits.to(torch.int8) - 1
