"""Swap layers in place, in the style of torchao's `quantize_`: `quantize_` turns `nn.Linear` into
trainable `BitLinear`; `freeze_` turns `BitLinear` into packed inference layers."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear

ALWAYS_SKIPPED = ("lm_head",)


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def quantize_(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every `nn.Linear` with a `BitLinear` sharing its parameters, except `lm_head` and any
    module whose qualified name (or a suffix of it after a dot) is listed in `skip`."""
    skip = (*ALWAYS_SKIPPED, *skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _is_skipped(name, skip):
            continue
        layer = BitLinear(module.in_features, module.out_features, module.bias is not None, device="meta")
        layer.weight = module.weight
        layer.bias = module.bias
        model.set_submodule(name, layer)
    return model


def freeze_(model: nn.Module) -> nn.Module:
    """Replace every `BitLinear` with a `PackedBitLinear` holding its quantized, packed weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            model.set_submodule(name, PackedBitLinear.from_linear(module))
    return model
