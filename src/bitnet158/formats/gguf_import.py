"""Loading a GGUF file (llama.cpp's `bitnet` architecture) as our packed model, tensor by tensor.

The file is memory-mapped; each tensor is decoded, packed and placed on the device before the next is
read. Ternary linears (TQ2_0, TQ1_0, I2_S) must have one scale per tensor: the blocks' `d` (or I2_S's
tail scale) times the optional `<name>.scale`. Float linears (F32/F16/BF16) holding only -1, 0 and 1
are codes times the optional `.scale`; other float linears (as llama.cpp's own converter writes
BitNet models) are quantized here. Embeddings and norms may be F32, F16, BF16,
Q8_0 or Q6_K. Every problem with the file is a `UserError` naming the file and the tensor or field.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from bitnet158.errors import UserError
from bitnet158.formats import ternary_blocks
from bitnet158.formats.gguf_file import metadata, open_gguf
from bitnet158.formats.gguf_tokenizer import read_tokenizer
from bitnet158.formats.names import PER_LAYER, gguf_name, scale_name
from bitnet158.model.bitnet import BitNetForCausalLM
from bitnet158.model.checkpoint import resolve_dtype, set_tensor
from bitnet158.model.config import BitNetConfig
from bitnet158.nn.bitlinear import PackedBitLinear
from bitnet158.nn.convert import freeze_
from bitnet158.packing import ROWS_PER_BYTE, pack_2bit, pack_2bit_rows
from bitnet158.quant.weights import quantize_ternary
from bitnet158.tokenizer import Tokenizer

ARCH = "bitnet"
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
DENSE_TYPES = (*FLOAT_TYPES, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q6_K)
# The dtype that holds the embedding's stored values exactly; dequantized Q8_0/Q6_K values need float32.
STORED_DTYPES = {GGMLQuantizationType.F16: "float16", GGMLQuantizationType.BF16: "bfloat16"}
TERNARY_IDS = tuple(int(t) for t in ternary_blocks.TERNARY_TYPES.values())
# Stored types a torch tensor can view as they are (gguf reads BF16 as raw bytes).
VIEW_DTYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
               GGMLQuantizationType.BF16: torch.bfloat16}
# Tensors are converted and checked this many rows at a time, to bound the scratch memory.
ROWS_PER_CHUNK = 128
_LIBC = ctypes.CDLL(None) if hasattr(ctypes.CDLL(None), "malloc_trim") else None


def _number(fields: dict[str, Any], key: str, path: Path, kind: type, default: Any = None) -> Any:
    value = fields.get(key, default)
    if value is None:
        raise UserError(f"{path}: missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise UserError(f"{path}: field '{key}' must be a number of type {kind.__name__}, got {value!r}")
    return kind(value)


class _Tensor(NamedTuple):
    """A tensor of the file in plain values, so that gguf's reader (whose parsing objects pin much
    memory) can be freed before the weights load."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]  # rows first, as the values are laid out
    offset: int
    data: np.ndarray  # its bytes, in a copy-on-write map of the file


def _tensors(path: Path) -> tuple[dict[str, _Tensor], dict[str, Any]]:
    """The file's tensors and metadata. The map is copy-on-write: tensors stored in the model's dtype
    become writable torch views of the file, and a write to one never reaches the file."""
    reader = open_gguf(path)
    fields = metadata(reader, path)
    found = [(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.data_offset), int(t.n_bytes))
             for t in reader.tensors]
    del reader
    _return_free_memory()
    file_map = np.memmap(path, dtype=np.uint8, mode="c")
    tensors = {name: _Tensor(name, qtype, shape, offset, file_map[offset : offset + size])
               for name, qtype, shape, offset, size in found}
    return tensors, fields


def _config(fields: dict[str, Any], tensors: dict[str, _Tensor], path: Path) -> BitNetConfig:
    if fields.get("general.architecture") != ARCH:
        raise UserError(f"{path}: architecture {fields.get('general.architecture')!r} is not '{ARCH}'")
    embed = tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise UserError(f"{path}: no two-dimensional tensor 'token_embd.weight'")
    vocab, hidden = embed.shape
    layers = _number(fields, f"{ARCH}.block_count", path, int)
    if layers * len(PER_LAYER) > len(tensors):
        raise UserError(f"{path}: field '{ARCH}.block_count' is {layers}, but the file holds {len(tensors)} tensors")
    if _number(fields, f"{ARCH}.embedding_length", path, int) != hidden:
        raise UserError(f"{path}: field '{ARCH}.embedding_length' does not match tensor 'token_embd.weight' {hidden}")
    heads = _number(fields, f"{ARCH}.attention.head_count", path, int)
    eos = [fields[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if isinstance(fields.get(k), int)]
    bos = fields.get("tokenizer.ggml.bos_token_id")
    values = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _number(fields, f"{ARCH}.feed_forward_length", path, int),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": _number(fields, f"{ARCH}.attention.head_count_kv", path, int, heads),
        "head_dim": _number(fields, f"{ARCH}.attention.key_length", path, int, hidden // max(heads, 1)),
        "max_position_embeddings": _number(fields, f"{ARCH}.context_length", path, int),
        "rms_norm_eps": _number(fields, f"{ARCH}.attention.layer_norm_rms_epsilon", path, float),
        "rope_theta": _number(fields, f"{ARCH}.rope.freq_base", path, float, 10000.0),
        # What llama.cpp computes when the file does not say: SiLU.
        "hidden_act": fields.get(f"{ARCH}.hidden_activation", "silu"),
        "tie_word_embeddings": True,
        "bos_token_id": bos if isinstance(bos, int) else None,
        "eos_token_id": eos or None,
        "torch_dtype": STORED_DTYPES.get(embed.tensor_type, "float32"),
    }
    return BitNetConfig.from_dict(values, source=str(path))


def _check_shape(tensor: _Tensor, shape: tuple[int, ...], path: Path) -> None:
    if tensor.shape != shape:
        raise UserError(f"{path}: tensor '{tensor.name}' has shape {list(tensor.shape)}, expected {list(shape)}")


def _dense(tensor: _Tensor, shape: tuple[int, ...], path: Path, dtype: torch.dtype) -> torch.Tensor:
    """The values of an F32/F16/BF16/Q8_0/Q6_K tensor in `dtype`, checked to be finite.

    A tensor stored in `dtype` stays a view of the memory-mapped file; others are converted a block of
    rows at a time, so no float32 copy of a whole embedding is ever made.
    """
    if tensor.tensor_type not in DENSE_TYPES:
        raise UserError(f"{path}: tensor '{tensor.name}' has type {_type_name(tensor)}, expected one of "
                        f"{', '.join(t.name for t in DENSE_TYPES)}")
    _check_shape(tensor, shape, path)
    row_count = shape[0] if len(shape) > 1 else 1
    rows = tensor.data.reshape(row_count, -1)
    if VIEW_DTYPES.get(tensor.tensor_type) == dtype:
        values = torch.from_numpy(rows).view(dtype)
    else:
        values = torch.empty(row_count, math.prod(shape) // row_count, dtype=dtype)
        for start in range(0, row_count, ROWS_PER_CHUNK):
            chunk = gguf_quants.dequantize(rows[start : start + ROWS_PER_CHUNK], tensor.tensor_type)
            values[start : start + ROWS_PER_CHUNK] = torch.from_numpy(chunk)
    for start in range(0, row_count, ROWS_PER_CHUNK):
        if not torch.isfinite(values[start : start + ROWS_PER_CHUNK]).all():
            raise UserError(f"{path}: tensor '{tensor.name}' holds NaN or infinite values")
    return values.reshape(shape)


def _ternary(tensor: _Tensor, shape: tuple[int, int], path: Path) -> tuple[torch.Tensor, float]:
    """`(packed weight, scale)` of a TQ2_0/TQ1_0/I2_S tensor, decoded and packed a chunk of rows at a time.

    The bytes are read from the file rather than through the map: mapped pages would stay in the
    process's resident memory, and the chunks keep the scratch memory small whatever the tensor's size.
    """
    rows, cols = shape
    qtype = int(tensor.tensor_type)
    if cols % ternary_blocks.row_multiple(qtype):
        raise UserError(f"{path}: tensor '{tensor.name}' has rows of {cols} values, not whole "
                        f"{ternary_blocks.row_multiple(qtype)}-value blocks")
    row_bytes = ternary_blocks.row_nbytes(qtype, cols)
    packed = torch.zeros(-(-rows // ROWS_PER_BYTE), cols, dtype=torch.uint8)
    block_scales: set[float] = set()
    for start in range(0, rows, ROWS_PER_CHUNK):
        count = min(ROWS_PER_CHUNK, rows - start)
        data = np.fromfile(path, dtype=np.uint8, count=count * row_bytes, offset=tensor.offset + start * row_bytes)
        try:
            codes, scales = ternary_blocks.decode_rows(data, qtype, count, cols)
        except ternary_blocks.BlockError as err:
            raise UserError(f"{path}: tensor '{tensor.name}' {err}") from None
        pack_2bit_rows(packed, torch.from_numpy(codes), start)
        block_scales |= scales
    if qtype == ternary_blocks.I2_S:
        tail = np.fromfile(path, dtype=np.uint8, count=ternary_blocks.I2_S_TAIL,
                           offset=tensor.offset + rows * row_bytes)
        return packed, ternary_blocks.i2_s_scale(tail)
    if len(block_scales) > 1:
        raise UserError(f"{path}: tensor '{tensor.name}' has {len(block_scales)} different block scales: "
                        "not one per-tensor scale")
    return packed, block_scales.pop() if block_scales else 1.0


def _type_name(tensor: _Tensor) -> str:
    return "I2_S" if tensor.tensor_type == ternary_blocks.I2_S else GGMLQuantizationType(tensor.tensor_type).name


def _linear(
    tensors: dict[str, _Tensor], name: str, layer: PackedBitLinear, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(packed weight, scale s)` of one linear layer."""
    tensor = tensors[name]
    shape = (layer.out_features, layer.in_features)
    if tensor.tensor_type not in (*FLOAT_TYPES, *TERNARY_IDS):
        raise UserError(f"{path}: tensor '{name}' has type {_type_name(tensor)}, expected TQ2_0, TQ1_0, I2_S or float")
    extra = tensors.get(scale_name(name))
    scale = 1.0
    if extra is not None:
        if extra.tensor_type != GGMLQuantizationType.F32 or math.prod(extra.shape) != 1:
            raise UserError(f"{path}: tensor '{extra.name}' must be one F32 value")
        scale = float(extra.data.view("<f4")[0])
        if not (math.isfinite(scale) and scale > 0):
            raise UserError(f"{path}: tensor '{extra.name}' is {scale}, expected a positive finite number")
    if tensor.tensor_type in FLOAT_TYPES:
        values = _dense(tensor, shape, path, torch.float32)
        if not torch.isin(values, torch.tensor([-1.0, 0.0, 1.0])).all():
            # Full-precision weights, as llama.cpp's converter writes them: quantize here.
            quantized = quantize_ternary(values * scale)
            return pack_2bit(quantized.codes), quantized.scale
        packed = pack_2bit(values.to(torch.int8))  # ternary codes stored as floats
    else:
        _check_shape(tensor, shape, path)
        packed, block_scale = _ternary(tensor, shape, path)
        scale *= block_scale
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"{path}: tensor '{name}' has scale {scale}, expected a positive finite number")
    return packed, torch.tensor([scale], dtype=torch.float32)


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc only). glibc keeps the freed scratch of
    each tensor's conversion, interleaved with the weights kept, so without this the process would
    hold hundreds of MB more than the model by the end of a load."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def load_gguf(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BitNetForCausalLM:
    """A packed inference model from a `bitnet` GGUF file (see `BitNetForCausalLM.from_pretrained`)."""
    path, device = Path(path), torch.device(device)
    tensors, fields = _tensors(path)
    config = _config(fields, tensors, path)
    del fields  # a large vocabulary, not needed while the weights load
    with torch.device("meta"):
        model = freeze_(BitNetForCausalLM(config))
    dtype = resolve_dtype(config, dtype)
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}
    names = [n for n in model.state_dict() if n != "lm_head.weight" and not n.endswith(".weight_scale")]
    placeholders = model.state_dict()
    for done, name in enumerate(names, start=1):
        target = gguf_name(name)
        if target not in tensors:
            raise UserError(f"{path}: no tensor '{target}'")
        module_name = name.rpartition(".")[0]
        if module_name in packed:
            weight, scale = _linear(tensors, target, packed[module_name], path)
            set_tensor(model, name, weight.to(device))
            set_tensor(model, f"{module_name}.weight_scale", scale.to(device))
        else:
            values = _dense(tensors[target], tuple(placeholders[name].shape), path, dtype)
            set_tensor(model, name, values.to(device))
        _return_free_memory()
        if progress:
            progress(done, len(names))
    model.tie_weights()
    return model.eval()


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata."""
    path = Path(path)
    return read_tokenizer(metadata(open_gguf(path), path), path)
