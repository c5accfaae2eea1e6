"""A dense bf16 Hugging Face folder: every ternary weight written out as `codes * scale`, and a config
without `quantization_config`, so that a plain transformers BitNet (or Llama-style) load reads it
as ordinary linear layers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from bitnet158.files import write_atomically, write_json
from bitnet158.model.bitnet import BitNetForCausalLM
from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear
from bitnet158.packing import unpack_2bit
from bitnet158.quant.weights import quantize_ternary
from bitnet158.tokenizer import Tokenizer


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, PackedBitLinear):
        codes, scale = unpack_2bit(layer.weight.cpu(), layer.out_features), layer.weight_scale.cpu()
    else:
        quantized = quantize_ternary(layer.weight.detach().cpu())
        codes, scale = quantized.codes, quantized.scale
    return (codes.float() * scale.float()).to(torch.bfloat16)


def save_dense_bf16(model: BitNetForCausalLM, tokenizer: Tokenizer, folder: Path) -> None:
    """Write `config.json`, `model.safetensors` (bf16) and the tokenizer files into `folder`."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (BitLinear, PackedBitLinear))}
    tensors = {}
    for name, tensor in model.state_dict().items():
        module_name, _, attr = name.rpartition(".")
        if attr == "weight_scale" or (name == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        if module_name in linears:
            tensors[name] = _dense_weight(linears[module_name]).contiguous()
        else:
            tensors[name] = tensor.detach().cpu().to(torch.bfloat16).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    config = model.config.to_dict()
    del config["quantization_config"]
    config["torch_dtype"] = "bfloat16"
    write_json(folder / "config.json", config)
    tokenizer.save_pretrained(folder)
