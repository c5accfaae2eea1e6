"""Opening a GGUF file with gguf's memory-mapped `GGUFReader`, taught bitnet.cpp's I2_S tensors.

gguf's reader stops at type ids its enum lacks (I2_S is 36); `_Reader` lays those tensors out itself
(packed data plus the 32-byte scale tail) and hands every other tensor to gguf. Anything the reader
cannot parse (truncation, bad magic, offsets past the end, ...) becomes one `UserError` naming the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, ReaderTensor

from bitnet158.errors import UserError
from bitnet158.formats.ternary_blocks import I2_S, nbytes, row_multiple


class _Reader(GGUFReader):
    # gguf's reader slices its np.memmap once or twice per metadata item (a 128k-token vocabulary: hundreds of
    # thousands of slices), and slicing a memmap runs Python code each time; a plain view of the same map does not.
    @property
    def data(self) -> np.ndarray:
        return self._map

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._map = value.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
        # gguf walks an array item by item, and items past the end of the file read as empty without
        # advancing: an absurd count would loop (and grow lists) for ever. Each item takes a byte at least.
        if raw_type == GGUFValueType.ARRAY:
            count = self._get(orig_offs + 4, np.uint64)[0]
            if count > len(self.data) - orig_offs:
                raise ValueError(f"an array of {count} items at byte {orig_offs} runs past the end of the file")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        i2_s = [f for f in fields if int(f.parts[4][0]) == I2_S]
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) != I2_S])
        names = {t.name for t in self.tensors}
        for field in i2_s:
            _, name_data, _, dims, _, offset = field.parts
            name = bytes(name_data).decode("utf-8")
            if name in names:
                raise ValueError(f"duplicate tensor {name!r}")
            names.add(name)
            n_elements = math.prod(int(d) for d in dims)
            if len(dims) != 2 or int(dims[0]) % row_multiple(I2_S):
                raise ValueError(f"I2_S tensor {name!r} has shape {dims.tolist()}: rows must be whole 128-value blocks")
            size = nbytes(I2_S, int(dims[1]), int(dims[0]))
            start = start_offs + int(offset[0])
            data = self.data[start : start + size]
            if data.size != size:
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            self.tensors.append(ReaderTensor(name, I2_S, dims, n_elements, size, start, data, field))


def open_gguf(path: Path) -> GGUFReader:
    """A memory-mapped reader of `path`; tensors are read only when their `.data` is used."""
    try:
        return _Reader(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as err:  # gguf reports malformed files with ValueError, IndexError, KeyError, ...
        raise UserError(f"{path}: not a valid GGUF file ({type(err).__name__}: {err})") from None


def metadata(reader: GGUFReader, path: Path) -> dict[str, Any]:
    """Key -> value for every metadata field: numbers, bools, strings, or lists of them."""
    values = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[:1] == [GGUFValueType.ARRAY] and len(field.types) != 2:
            continue  # nested arrays: nothing we read
        try:
            value = field.contents()
        except (UnicodeDecodeError, IndexError, ValueError) as err:
            raise UserError(f"{path}: field '{key}' cannot be read ({err})") from None
        values[key] = value.item() if isinstance(value, np.generic) else value
    return values
