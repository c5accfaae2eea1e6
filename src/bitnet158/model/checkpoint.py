"""Hugging Face BitNet checkpoints: a folder with `config.json` and single-file or sharded safetensors.

Linear weights are either packed (uint8, 4 ternary rows per byte row, plus `weight_scale`) or
full-precision master weights, which are quantized on load. On disk, `weight_scale` means what
transformers makes it mean for the config's `linear_class`:
- `autobitlinear`: the output is multiplied by it, so it is `s = mean|W|`;
- `bitlinear`: the output is divided by it, so it is `1 / s`.
In memory, `PackedBitLinear.weight_scale` is always `s`.

Loading checks each tensor's dtype and shape from the file's header before touching its data, then its
values (no NaN or infinity, no 2-bit code 3). Tensors are read one at a time from memory-mapped files.
On the CPU a tensor that needs no conversion is not copied: it stays a view of the file's copy-on-write
mapping, so a packed checkpoint loaded in its own dtype takes its file size in memory, in pages the kernel
can drop and read back, and processes loading one file share them. (As with any memory-mapped model, a
file truncated in place while loaded crashes the process; one replaced by a new file, as `save_pretrained`
does, is harmless.) On another device each tensor is copied there straight away.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bitnet158.errors import UserError
from bitnet158.files import write_atomically, write_json
from bitnet158.model.config import BitNetConfig
from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear
from bitnet158.packing import ROWS_PER_BYTE, pack_2bit
from bitnet158.quant.weights import quantize_ternary

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' names of the dtypes we may meet, to say them as PyTorch does; F16..F64 are the float types we read.
_FILE_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_FLOATS = "a float type (F16, BF16, F32 or F64)"
_MAX_HEADER_BYTES = 100_000_000  # safetensors refuses longer headers
_CHECK_CHUNK_BYTES = 1 << 20
# Endings of safetensors' errors that name no tensor, though the header tells which one is at fault.
_NAMELESS_ERRORS = (
    "file not fully covered", "invalid shape, data type, or offset for tensor", "from shape and/or element type"
)


def resolve_dtype(config: BitNetConfig, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of embeddings and norms: the config's `torch_dtype` unless one is asked for, whatever the device.

    On the CPU too: there, a tensor loaded in the dtype it is stored in stays a view of the memory-mapped
    file instead of a copy, and a float32 copy of Microsoft's bf16 embedding alone would take 1.3 GB.
    """
    return dtype if dtype is not None else _DTYPES.get(config.torch_dtype, torch.bfloat16)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from its index when it is sharded."""
    if (folder / INDEX_FILE).is_file():
        index_path = folder / INDEX_FILE
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{index_path}: not a valid safetensors index ({err!r})") from None
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise UserError(f"{index_path}: shard {name!r} is not a file name in {folder}")
            if not (folder / name).is_file():
                raise UserError(f"{index_path}: shard '{name}' is missing")
        return [folder / name for name in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise UserError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _misfit_tensor(file: Path) -> str:
    """Name the tensor behind safetensors' nameless complaints (a truncated file, offsets that do not match
    dtype and shape): the first, in file order, whose bytes run past the data or disagree with its shape."""
    try:
        with file.open("rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if header_length > _MAX_HEADER_BYTES:
                return ""
            header = json.loads(f.read(header_length))
        data_bytes = file.stat().st_size - 8 - header_length
        entries = sorted(
            (info["data_offsets"], name, info["dtype"], info["shape"])
            for name, info in header.items() if name != "__metadata__"
        )
    except Exception:  # a header that safetensors could not read either: nothing more to say
        return ""
    for (begin, end), name, dtype, shape in entries:
        if dtype in _FILE_DTYPES and end - begin != math.prod(shape) * _FILE_DTYPES[dtype].itemsize:
            return f": tensor '{name}' is {dtype} {shape} but its data_offsets [{begin}, {end}] do not hold that"
        if end > data_bytes:
            return f": tensor '{name}' ends at byte {end} of the data, which has {data_bytes} (the file is truncated)"
    return ""


class _Checkpoint:
    """The tensors of a checkpoint's safetensors files: dtypes and shapes from the headers, data on demand."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.file_of: dict[str, Path] = {}
        self._readers = {}
        for file in checkpoint_files(folder):
            try:
                reader = stack.enter_context(safe_open(file, framework="pt"))
                names = list(reader.keys())
            except Exception as err:  # safetensors reports corrupt files with several exception types
                detail = _misfit_tensor(file) if str(err).endswith(_NAMELESS_ERRORS) else ""
                raise UserError(_one_line(f"{file}: not a valid safetensors file ({err}){detail}")) from None
            self._readers[file] = reader
            self.file_of.update(dict.fromkeys(names, file))

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def where(self, name: str) -> str:
        return f"{self.file_of[name]}: tensor '{name}'"

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """The dtype (safetensors' name, e.g. "BF16") and shape of a tensor, read without its data."""
        if name not in self.file_of:
            raise UserError(f"{self.folder}: checkpoint has no tensor '{name}'")
        tensor = self._readers[self.file_of[name]].get_slice(name)
        return tensor.get_dtype(), tuple(tensor.get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a view of the memory-mapped file: no copy is made."""
        try:
            return self._readers[self.file_of[name]].get_tensor(name)
        except Exception as err:
            raise UserError(f"{self.where(name)} cannot be read ({_one_line(err)})") from None


def _dtype_name(file_dtype: str) -> str:
    return str(_FILE_DTYPES.get(file_dtype, file_dtype))


def _check_float_header(checkpoint: _Checkpoint, name: str, expected: tuple[int, ...]) -> None:
    dtype, shape = checkpoint.header(name)
    if dtype not in _FLOAT_DTYPES:
        raise UserError(f"{checkpoint.where(name)} has dtype {_dtype_name(dtype)}, expected {_FLOATS}")
    if shape != expected:
        raise UserError(f"{checkpoint.where(name)} has shape {shape}, expected {expected}")


def _check_linear_header(checkpoint: _Checkpoint, name: str, layer: PackedBitLinear) -> bool:
    """Check a linear layer's weight and optional `weight_scale` from the header; True if the weight is packed."""
    weight, scale = f"{name}.weight", f"{name}.weight_scale"
    dtype, shape = checkpoint.header(weight)
    full = (layer.out_features, layer.in_features)
    packed = (-(-layer.out_features // ROWS_PER_BYTE), layer.in_features)
    if dtype == "U8":
        if shape != packed:
            raise UserError(f"{checkpoint.where(weight)} has shape {shape}, expected packed {packed}")
        if scale not in checkpoint:
            raise UserError(f"{checkpoint.file_of[weight]}: packed tensor '{weight}' has no '{scale}'")
    elif dtype in _FLOAT_DTYPES:
        if shape == packed != full:
            raise UserError(
                f"{checkpoint.where(weight)} has the packed shape {packed} but dtype {_dtype_name(dtype)}; "
                "packed weights are torch.uint8"
            )
        if shape != full:
            raise UserError(f"{checkpoint.where(weight)} has shape {shape}, expected {full}")
    else:
        raise UserError(
            f"{checkpoint.where(weight)} has unsupported dtype {_dtype_name(dtype)}, "
            f"expected torch.uint8 (packed) or {_FLOATS}"
        )
    if scale in checkpoint:
        scale_dtype, scale_shape = checkpoint.header(scale)
        if scale_dtype not in _FLOAT_DTYPES:
            raise UserError(f"{checkpoint.where(scale)} has dtype {_dtype_name(scale_dtype)}, expected {_FLOATS}")
        if math.prod(scale_shape) != 1:
            raise UserError(f"{checkpoint.where(scale)} must be one positive finite number, got shape {scale_shape}")
    return dtype == "U8"


def _holds_code_3(packed: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether a 2-bit field of the packed bytes holds 3, which stands for no ternary value (it would unpack
    to +2): a field is 3 when both its bits are set. One vectorised pass, chunk by chunk through one reused
    `scratch` buffer: a fresh temporary per tensor or chunk leaves malloc holding tens of MB as resident."""
    flat = packed.reshape(-1)
    for start in range(0, flat.numel(), scratch.numel()):
        chunk = flat[start : start + scratch.numel()]
        both_bits = scratch[: chunk.numel()]
        torch.bitwise_right_shift(chunk, 1, out=both_bits)
        both_bits &= chunk
        both_bits &= 0b01010101
        if both_bits.any():
            return True
    return False


def _check_finite(checkpoint: _Checkpoint, name: str, tensor: torch.Tensor) -> None:
    low, high = torch.aminmax(tensor)  # NaN propagates to both; a reduction, so no temporary of the tensor's size
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise UserError(f"{checkpoint.where(name)} holds NaN or infinite values")


def _read_linear(
    checkpoint: _Checkpoint, name: str, is_packed: bool, linear_class: str, scratch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's stored weight (packed or float) and optional `weight_scale` as `(packed, s)`."""
    weight_name, scale_name = f"{name}.weight", f"{name}.weight_scale"
    weight = checkpoint.get(weight_name)
    scale_on_disk = checkpoint.get(scale_name) if scale_name in checkpoint else None
    if is_packed:
        if _holds_code_3(weight, scratch):
            raise UserError(f"{checkpoint.where(weight_name)} holds the 2-bit code 3, which is not a ternary value")
        packed = weight
    else:
        _check_finite(checkpoint, weight_name, weight)
        if scale_on_disk is None:  # master weights: quantize them here
            quantized = quantize_ternary(weight)
            return pack_2bit(quantized.codes), quantized.scale
        # Unpacked ternary weights with a scale, as transformers saves an offline autobitlinear model.
        if not torch.isin(weight, torch.tensor([-1.0, 0.0, 1.0], dtype=weight.dtype)).all():
            raise UserError(f"{checkpoint.where(weight_name)} has a weight_scale but values outside {{-1, 0, 1}}")
        packed = pack_2bit(weight.to(torch.int8))

    scale = scale_on_disk.float().reshape(-1)
    if not torch.isfinite(scale).all() or scale.item() <= 0:
        raise UserError(f"{checkpoint.where(scale_name)} must be one positive finite number, got {scale.tolist()}")
    return packed, (1.0 / scale if linear_class == "bitlinear" else scale)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the model's tensor `name` (a frozen Parameter where a Parameter was)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(getattr(module, attr), nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(module, attr, value)


def load_weights(
    model: nn.Module,
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill a model built on the meta device (with `PackedBitLinear` layers) from a checkpoint folder.

    Each tensor's dtype and shape are checked from the header before its data is touched, so a wrong
    one costs no time and no memory. On the CPU, packed weights (and other tensors already in `dtype`)
    stay views of the memory-mapped files, so the loaded model's memory is the files' pages.
    """
    config: BitNetConfig = model.config
    packed_layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    placeholders = model.state_dict()
    others = [name for name in placeholders if name.rpartition(".")[0] not in packed_layers and name not in tied]
    total = len(packed_layers) + len(others)
    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)
        scratch = torch.empty(_CHECK_CHUNK_BYTES, dtype=torch.uint8)
        for done, (name, layer) in enumerate(packed_layers.items(), start=1):
            is_packed = _check_linear_header(checkpoint, name, layer)
            packed, s = _read_linear(checkpoint, name, is_packed, config.linear_class, scratch)
            set_tensor(model, f"{name}.weight", packed.to(device))
            set_tensor(model, f"{name}.weight_scale", s.to(device=device, dtype=torch.float32))
            if progress:
                progress(done, total)
        for done, name in enumerate(others, start=len(packed_layers) + 1):
            _check_float_header(checkpoint, name, tuple(placeholders[name].shape))
            tensor = checkpoint.get(name)
            _check_finite(checkpoint, name, tensor)
            set_tensor(model, name, tensor.to(device=device, dtype=dtype))
            if progress:
                progress(done, total)
    model.tie_weights()


def _state_to_save(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Our tensors in the on-disk form: packed linears with `weight_scale = s` (autobitlinear)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (BitLinear, PackedBitLinear))}
    skip = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    for name, tensor in model.state_dict().items():
        module_name, _, attr = name.rpartition(".")
        if name in skip or (module_name in linears and attr == "weight_scale"):
            continue
        if module_name in linears and attr == "weight":
            layer = linears[module_name]
            if isinstance(layer, BitLinear):
                quantized = quantize_ternary(tensor)
                packed, scale = pack_2bit(quantized.codes), quantized.scale
            else:
                packed, scale = layer.weight, layer.weight_scale
            yield name, packed.cpu().contiguous()
            yield f"{module_name}.weight_scale", scale.float().reshape(1).cpu()
        else:
            yield name, tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def save_weights(model: nn.Module, folder: Path, max_shard_bytes: int) -> None:
    """Write packed safetensors and a `config.json` whose `weight_scale` convention is autobitlinear's."""
    config: BitNetConfig = model.config
    dtype = _DTYPES.get(config.torch_dtype, torch.bfloat16)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in _state_to_save(model, dtype):
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_atomically(folder / SINGLE_FILE, lambda tmp: save_file(shards[0], tmp, metadata))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_atomically(folder / shard_name, lambda tmp, shard=shard: save_file(shard, tmp, metadata))
            weight_map.update(dict.fromkeys(shard, shard_name))
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    config_dict = config.to_dict()
    config_dict["quantization_config"] = {
        **config.quantization_config, "linear_class": "autobitlinear", "quantization_mode": "offline"
    }
    write_json(folder / "config.json", config_dict)
