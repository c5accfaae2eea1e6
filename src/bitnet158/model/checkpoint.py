"""Hugging Face BitNet checkpoints: a folder with `config.json` and single-file or sharded safetensors.

Linear weights are either packed (uint8, 4 ternary rows per byte row, plus `weight_scale`) or
full-precision master weights, which are quantized on load. On disk, `weight_scale` means what
transformers makes it mean for the config's `linear_class`:
- `autobitlinear`: the output is multiplied by it, so it is `s = mean|W|`;
- `bitlinear`: the output is divided by it, so it is `1 / s`.
In memory, `PackedBitLinear.weight_scale` is always `s`.

Tensors are read one at a time from memory-mapped files and moved to the target device straight
away, so loading never holds two copies of the weights.
"""

from __future__ import annotations

import json
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


def resolve_dtype(config: BitNetConfig, device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float32 if device.type == "cpu" else _DTYPES.get(config.torch_dtype, torch.bfloat16)


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


class _TensorIndex:
    """Names of all tensors of a checkpoint's files, read lazily one tensor at a time."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self.file_of: dict[str, Path] = {}
        self._readers = {}
        for file in files:
            try:
                reader = stack.enter_context(safe_open(file, framework="pt"))
                names = list(reader.keys())
            except Exception as err:  # safetensors reports corrupt files with several exception types
                raise UserError(f"{file}: not a valid safetensors file ({err})") from None
            self._readers[file] = reader
            self.file_of.update(dict.fromkeys(names, file))

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        try:
            return self._readers[file].get_tensor(name)
        except Exception as err:
            raise UserError(f"{file}: cannot read tensor '{name}' ({err})") from None


def _packed_weight(
    file: Path, name: str, weight: torch.Tensor, scale_on_disk: torch.Tensor | None, layer: PackedBitLinear,
    linear_class: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a stored linear weight (packed or float) and its optional `weight_scale` into `(packed, s)`."""
    out_features, in_features = layer.out_features, layer.in_features
    if weight.dtype == torch.uint8:
        expected = (-(-out_features // ROWS_PER_BYTE), in_features)
        if tuple(weight.shape) != expected:
            raise UserError(f"{file}: tensor '{name}' has shape {tuple(weight.shape)}, expected packed {expected}")
        if scale_on_disk is None:
            raise UserError(f"{file}: packed tensor '{name}' has no '{name}_scale'")
        packed = weight
    elif weight.is_floating_point():
        if tuple(weight.shape) != (out_features, in_features):
            raise UserError(
                f"{file}: tensor '{name}' has shape {tuple(weight.shape)}, expected {(out_features, in_features)}"
            )
        if not torch.isfinite(weight).all():
            raise UserError(f"{file}: tensor '{name}' holds NaN or infinite values")
        if scale_on_disk is None:  # master weights: quantize them here
            quantized = quantize_ternary(weight)
            return pack_2bit(quantized.codes), quantized.scale
        # Unpacked ternary weights with a scale, as transformers saves an offline autobitlinear model.
        if not torch.isin(weight, torch.tensor([-1.0, 0.0, 1.0], dtype=weight.dtype)).all():
            raise UserError(f"{file}: tensor '{name}' has a weight_scale but values outside {{-1, 0, 1}}")
        packed = pack_2bit(weight.to(torch.int8))
    else:
        raise UserError(f"{file}: tensor '{name}' has unsupported dtype {weight.dtype}")

    scale = scale_on_disk.float().reshape(-1)
    if scale.numel() != 1 or not torch.isfinite(scale).all() or scale.item() <= 0:
        raise UserError(f"{file}: tensor '{name}_scale' must be one positive finite number, got {scale.tolist()[:4]}")
    return packed, (1.0 / scale if linear_class == "bitlinear" else scale)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
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
    """Fill a model built on the meta device (with `PackedBitLinear` layers) from a checkpoint folder."""
    config: BitNetConfig = model.config
    packed_layers = {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    others = [name for name in model.state_dict() if name.rpartition(".")[0] not in packed_layers and name not in tied]
    total = len(packed_layers) + len(others)
    with ExitStack() as stack:
        index = _TensorIndex(checkpoint_files(folder), stack)

        def require(name: str) -> torch.Tensor:
            if name not in index.file_of:
                raise UserError(f"{folder}: checkpoint has no tensor '{name}'")
            return index.get(name)

        for done, (layer_name, layer) in enumerate(packed_layers.items(), start=1):
            weight_name, scale_name = f"{layer_name}.weight", f"{layer_name}.weight_scale"
            weight = require(weight_name)
            scale = index.get(scale_name) if scale_name in index.file_of else None
            packed, s = _packed_weight(index.file_of[weight_name], weight_name, weight, scale, layer,
                                       config.linear_class)
            _set_tensor(model, weight_name, packed.to(device))
            _set_tensor(model, scale_name, s.to(device=device, dtype=torch.float32))
            if progress:
                progress(done, total)

        placeholders = model.state_dict()
        for done, name in enumerate(others, start=len(packed_layers) + 1):
            placeholder = placeholders[name]
            tensor = require(name)
            file = index.file_of[name]
            if tuple(tensor.shape) != tuple(placeholder.shape):
                raise UserError(
                    f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(placeholder.shape)}"
                )
            if not tensor.is_floating_point():
                raise UserError(f"{file}: tensor '{name}' has dtype {tensor.dtype}, expected a float type")
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
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
