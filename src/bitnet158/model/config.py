"""The BitNet architecture, read from and written to a Hugging Face BitNet `config.json`."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitnet158.errors import UserError
from bitnet158.files import read_json_object

ACTIVATIONS = ("relu2", "silu")
LINEAR_CLASSES = ("autobitlinear", "bitlinear")
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class BitNetConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "relu2"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # transformers' BitNet quantization_config; `linear_class` fixes what `weight_scale` means on disk.
    quantization_config: dict[str, Any] = field(
        default_factory=lambda: {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        }
    )

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        self.validate()

    def validate(self) -> None:
        for name in (*REQUIRED_FIELDS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise UserError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise UserError(f"field '{name}' must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise UserError(f"field 'tie_word_embeddings' must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.quantization_config, dict):
            raise UserError(f"field 'quantization_config' must be an object, got {self.quantization_config!r}")
        linear_class = self.quantization_config.get("linear_class", "bitlinear")
        if linear_class not in LINEAR_CLASSES:
            raise UserError(f"quantization_config.linear_class {linear_class!r} is not one of {LINEAR_CLASSES}")
        if self.quantization_config.get("use_rms_norm"):
            raise UserError("quantization_config.use_rms_norm is not supported")

    @property
    def linear_class(self) -> str:
        return self.quantization_config.get("linear_class", "bitlinear")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> BitNetConfig:
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise UserError(f"{source}: missing field '{missing[0]}'")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # transformers >= 5 nests rope_theta inside rope_parameters.
        rope = data.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise UserError(f"{source}: field 'rope_parameters' must be an object, got {rope!r}")
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise UserError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        if "dtype" in data:  # transformers >= 5 writes `dtype` instead of `torch_dtype`
            values["torch_dtype"] = data["dtype"]
        if not data.get("quantization_config"):
            values.pop("quantization_config", None)
        try:
            return cls(**values)
        except (UserError, TypeError) as err:
            raise UserError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BitNetConfig:
        path = Path(path)
        data = read_json_object(path)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", **data}

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by kind: ternary linear weights, and everything kept in high precision."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer_linear = h * q + 2 * h * kv + q * h + 3 * h * i
        per_layer_norms = 2 * h + q + i
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else embed
        return {
            "ternary": self.num_hidden_layers * per_layer_linear,
            "high_precision": embed + lm_head + self.num_hidden_layers * per_layer_norms + h,
        }
