"""Convert a full-precision Hugging Face Llama-family checkpoint into a trainable BitNet model.

Supported: `LlamaForCausalLM`, `Qwen2ForCausalLM` and `MistralForCausalLM` folders in safetensors (one file or
sharded with an index). They share Llama's layout and tensor names, which are also ours, so the conversion is:
- every linear layer of the decoder becomes a `BitLinear` holding the fp weight as its master weight;
  `lm_head` (and the embedding) stay in high precision;
- BitNet's two sub-norms are added: `attn_sub_norm` before `o_proj` and `ffn_sub_norm` before `down_proj`.
  Their gains are calibrated on a batch of training text to the mean RMS of the activations they normalize,
  so that `g·x/rms(x) ≈ x` and the converted network starts close to the original;
- the MLP keeps the checkpoint's SiLU (`hidden_act: silu`), not BitNet's relu².
The quantization is then blended in by the trainer's λ warm-up (`x + λ·(q(x) − x).detach()`, λ: 0 → 1).

Not carried over: Qwen2's q/k/v biases (and any `attention_bias`/`mlp_bias`): BitNet layers have none, and our
packed format stores none; they are dropped with a warning and fine-tuning recovers. RoPE scaling other than
the default (Llama 3.1's `llama3`, YaRN) is refused, since our model computes plain RoPE.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bitnet158.errors import UserError
from bitnet158.files import read_json_object
from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.nn import BitLinear

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def bitnet_config_from_hf(hf: dict, source: str) -> BitNetConfig:
    """Our config for a Hugging Face Llama, Qwen2 or Mistral `config.json` (as a dict)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UserError(f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_TYPES}")
    rope_scaling = hf.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default")) if rope_scaling else "default"
    if rope_type != "default":
        raise UserError(f"{source}: rope_scaling {rope_type!r} is not supported (only plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    fields = {
        name: hf[name]
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                     "rope_theta", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                     "pad_token_id")  # fmt: skip
        if hf.get(name) is not None
    }
    fields["hidden_act"] = "silu"
    fields["torch_dtype"] = "bfloat16"
    fields.setdefault("tie_word_embeddings", False)
    return BitNetConfig.from_dict(fields, source=source)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' object")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{folder}: no model.safetensors (or index); convert .bin checkpoints to safetensors first")


def load_hf_llama(folder: Path) -> BitNetForCausalLM:
    """A trainable BitNet model (fp32 master weights, `BitLinear` layers, sub-norm gains 1) holding the
    weights of the Hugging Face checkpoint in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such model folder")
    hf = read_json_object(folder / "config.json")
    config = bitnet_config_from_hf(hf, str(folder / "config.json"))
    model = BitNetForCausalLM(config)
    expected = model.state_dict()
    loaded: set[str] = set()
    dropped: list[str] = []
    for path in _weight_files(folder):
        try:
            with safe_open(path, framework="pt") as file:
                for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in expected:
                        dropped.append(name)
                        continue
                    tensor = file.get_tensor(name)
                    if tuple(tensor.shape) != tuple(expected[name].shape):
                        raise UserError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(expected[name].shape)}")  # fmt: skip
                    with torch.no_grad():
                        expected[name].copy_(tensor.float())
                    loaded.add(name)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: unreadable safetensors file ({err})") from None
    sub_norms = {n for n in expected if "sub_norm" in n}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - loaded - sub_norms - tied)
    if config.tie_word_embeddings and "lm_head.weight" in loaded:
        loaded.discard("lm_head.weight")  # some tied checkpoints store it anyway; it is the embedding
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more)"
                        if len(missing) > 1 else f"{folder}: the checkpoint lacks {missing[0]}")  # fmt: skip
    ignored = [n for n in dropped if not n.endswith("rotary_emb.inv_freq")]
    if ignored:
        warnings.warn(f"{folder}: {len(ignored)} tensors not in BitNet dropped (e.g. {ignored[0]}); "
                      "BitNet layers have no biases", stacklevel=2)  # fmt: skip
    model.tie_weights()
    return model


class _MeasureRMS(nn.Module):
    """Stands in for a sub-norm during calibration: passes its input through and records its mean RMS."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rms = x.float().pow(2).mean(-1).sqrt().mean().item()
        return x


@torch.no_grad()
def calibrate_sub_norms_(model: BitNetForCausalLM, input_ids: torch.Tensor) -> dict[str, float]:
    """Set each sub-norm's gain to the mean RMS of its input on `input_ids`, measured in the original network
    (no sub-norms, no quantization), so that adding the sub-norms changes it as little as possible.
    Returns the gains by module name."""
    norms = {name: m for name, m in model.named_modules() if name.endswith("sub_norm")}
    strengths = {m: m.quant_strength for m in model.modules() if isinstance(m, BitLinear)}
    set_quant_strength_(model, 0.0)
    probes = {name: _MeasureRMS() for name in norms}
    for name, probe in probes.items():
        model.set_submodule(name, probe)
    try:
        model(input_ids)
    finally:
        for name, norm in norms.items():
            model.set_submodule(name, norm)
        for module, strength in strengths.items():
            module.quant_strength = strength
    for name, norm in norms.items():
        norm.weight.fill_(probes[name].rms)
    return {name: probe.rms for name, probe in probes.items()}


def set_quant_strength_(model: nn.Module, strength: float | None) -> None:
    """λ of every `BitLinear`: None (fully quantized, the fast path) or a value in [0, 1]."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            if strength is None:
                module.quant_strength = None
            elif module.quant_strength is None or module.quant_strength.device != module.weight.device:
                module.quant_strength = torch.tensor(float(strength), device=module.weight.device)
            else:
                module.quant_strength.fill_(float(strength))
