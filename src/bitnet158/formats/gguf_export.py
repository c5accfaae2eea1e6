"""Writing a BitNet model as a GGUF file that llama.cpp's `bitnet` architecture runs as it is.

Linear weights are ternary (TQ2_0 or TQ1_0 with d = 1 and the per-tensor scale in a `<name>.scale`
F32 tensor of shape [1]; or bitnet.cpp's I2_S, whose tail holds the scale; a TQ linear whose rows are
not whole 256-value blocks is written as F16 codes, with its `.scale`), the token embedding is
F16, Q8_0 or Q6_K, and norms are F32. Tensors are encoded and written one at a time.

llama.cpp's `bitnet` graph always uses `token_embd` as the output projection, so models with untied
embeddings are refused rather than written into a file that llama.cpp would run wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import quants as gguf_quants
from torch import nn

from bitnet158.errors import UserError
from bitnet158.files import write_atomically
from bitnet158.formats import ternary_blocks
from bitnet158.formats.gguf_tokenizer import write_tokenizer
from bitnet158.formats.names import gguf_name, scale_name
from bitnet158.formats.q6_k import quantize_q6_k
from bitnet158.model.bitnet import BitNetForCausalLM
from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear
from bitnet158.packing import unpack_2bit
from bitnet158.quant.weights import quantize_ternary
from bitnet158.tokenizer import Tokenizer

EMBED_TYPES = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0, "q6_k": GGMLQuantizationType.Q6_K}
# general.file_type: llama.cpp's LLAMA_FTYPE_MOSTLY_TQ1_0/TQ2_0, and bitnet.cpp's LLAMA_FTYPE_MOSTLY_I2_S.
FILE_TYPES = {"tq1_0": LlamaFileType.MOSTLY_TQ1_0, "tq2_0": LlamaFileType.MOSTLY_TQ2_0, "i2_s": 40}
ARCH = "bitnet"


def _ternary(layer: nn.Module) -> tuple[np.ndarray, float]:
    """A linear layer's int8 codes `[out, in]` and its scale `s`."""
    if isinstance(layer, PackedBitLinear):
        return unpack_2bit(layer.weight.cpu(), layer.out_features).numpy(), float(layer.weight_scale)
    quantized = quantize_ternary(layer.weight.detach().cpu())
    return quantized.codes.to(torch.int8).numpy(), float(quantized.scale)


def _scale(layer: nn.Module) -> np.ndarray:
    """`[s]` as F32, for `<name>.scale`."""
    if isinstance(layer, PackedBitLinear):
        return layer.weight_scale.float().reshape(1).cpu().numpy()
    return quantize_ternary(layer.weight.detach().cpu()).scale.float().reshape(1).numpy()


def _plan(model: BitNetForCausalLM, ternary_type: str, embed_type: str) -> Iterator[tuple[str, int, tuple, Callable]]:
    """`(gguf name, type, shape of the values in numpy order, produce)` per tensor, in file order;
    `produce()` returns the tensor's bytes (or values) when it is written."""
    qtype = ternary_blocks.TERNARY_TYPES[ternary_type]
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (BitLinear, PackedBitLinear))}
    for name, tensor in model.state_dict().items():
        module_name, _, attr = name.rpartition(".")
        if name == "lm_head.weight" or attr == "weight_scale":
            continue
        target = gguf_name(name)
        if module_name in linears:
            layer = linears[module_name]
            rows, cols = layer.out_features, layer.in_features
            stored = qtype
            if cols % ternary_blocks.row_multiple(qtype):
                # Rows must be whole blocks; like llama-quantize, fall back to F16, which holds the codes
                # exactly (llama.cpp then multiplies with f16 activations instead of 8-bit ones).
                stored = GGMLQuantizationType.F16

            def encode(layer=layer, stored=stored) -> np.ndarray:
                codes, scale = _ternary(layer)
                if stored == GGMLQuantizationType.F16:
                    return codes.astype(np.float16)
                return ternary_blocks.encode(codes, stored, scale)

            yield target, stored, (rows, cols), encode
            if stored != ternary_blocks.I2_S:  # I2_S keeps the scale in its tail; bitnet.cpp applies it from there
                yield scale_name(target), GGMLQuantizationType.F32, (1,), lambda layer=layer: _scale(layer)
        elif name == "model.embed_tokens.weight":
            etype = EMBED_TYPES[embed_type]
            if tensor.shape[1] % GGML_QUANT_SIZES[etype][0]:
                raise UserError(f"tensor '{name}' has rows of {tensor.shape[1]} values: "
                                f"{embed_type} needs a multiple of {GGML_QUANT_SIZES[etype][0]}")
            yield target, etype, tuple(tensor.shape), lambda t=tensor, e=etype: _embedding(t, e)
        else:
            yield target, GGMLQuantizationType.F32, tuple(tensor.shape), lambda t=tensor: t.float().cpu().numpy()


def _embedding(weight: torch.Tensor, etype: GGMLQuantizationType) -> np.ndarray:
    values = weight.detach().float().cpu().numpy()
    if etype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    if etype == GGMLQuantizationType.Q6_K:
        return quantize_q6_k(values)
    return gguf_quants.quantize(values, etype)


def _write_metadata(writer: GGUFWriter, model: BitNetForCausalLM, tokenizer: Tokenizer, ternary_type: str,
                    name: str) -> None:
    config = model.config
    writer.add_name(name)
    writer.add_file_type(int(FILE_TYPES[ternary_type]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    # Read by newer llama.cpp (which maps unknown names to SiLU) and by us; the installed llama.cpp ignores it.
    writer.add_string(f"{ARCH}.hidden_activation", config.hidden_act)
    write_tokenizer(writer, tokenizer, config.vocab_size, config.eos_token_ids)


def save_gguf(
    model: BitNetForCausalLM,
    tokenizer: Tokenizer,
    path: Path,
    ternary_type: str = "tq2_0",
    embed_type: str = "f16",
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write `model` (training or packed) and `tokenizer` to the GGUF file `path`, atomically."""
    if ternary_type not in ternary_blocks.TERNARY_TYPES:
        raise UserError(f"ternary type {ternary_type!r} is not one of {', '.join(ternary_blocks.TERNARY_TYPES)}")
    if embed_type not in EMBED_TYPES:
        raise UserError(f"embedding type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if not model.config.tie_word_embeddings:
        raise UserError("the model has untied embeddings (an lm_head of its own): llama.cpp's bitnet architecture "
                        "always uses token_embd as the output projection, so it cannot run it")
    plan = list(_plan(model, ternary_type, embed_type))

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, ARCH)
        _write_metadata(writer, model, tokenizer, ternary_type, Path(path).stem)
        for target, qtype, shape, _ in plan:
            if qtype == ternary_blocks.I2_S:  # gguf's writer has no block size for it: give the value shape
                writer.add_tensor_info(target, shape, np.dtype(np.int8), ternary_blocks.nbytes(qtype, *shape),
                                       raw_dtype=qtype)
            elif qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.dtype(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
                writer.add_tensor_info(target, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
            else:
                block, size = GGML_QUANT_SIZES[qtype]
                byte_shape = (*shape[:-1], shape[-1] // block * size)
                writer.add_tensor_info(target, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (_, _, _, produce) in enumerate(plan, start=1):
            writer.write_tensor_data(np.ascontiguousarray(produce()))
            if progress:
                progress(done, len(plan))
        writer.close()

    write_atomically(Path(path), write)
