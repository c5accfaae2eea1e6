"""Everything a training run is told: one flat `TrainConfig`, read from a YAML file and/or flags.

Flags win over the YAML file, which wins over the defaults here. Every field is checked when the config
is built, and a wrong one is a `UserError` naming the field (and the file), so `bitnet158 train` prints
one line instead of failing an hour into the run. `configs/` holds commented examples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitnet158.errors import UserError

PRECISIONS = ("ternary", "bf16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("two_stage", "cosine", "linear", "constant")
TEXT_UNITS = ("paragraph", "line", "file")
AMP_MODES = ("auto", "bf16", "none")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")
SWITCHES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    # --- data ---------------------------------------------------------------------------------------------------
    # Files, folders or glob patterns of .txt, .json, .jsonl, .csv or .parquet; or one folder holding train.bin and
    # val.bin (uint16 tokens, as `bitnet158.training.corpus` writes them).
    data: list[Path] = field(default_factory=list)
    val_data: list[Path] = field(default_factory=list)  # explicit validation files; else `val_percent` is held out
    val_percent: float = 1.0  # of the documents, chosen by a hash of (file name, document number)
    text_field: str = "text"  # the field of a JSON/CSV/Parquet record that holds its text ...
    messages_field: str = "messages"  # ... or a list of chat messages, rendered with the chat template
    text_unit: str = "paragraph"  # what one document of a .txt file is: a paragraph, a line or the whole file
    tokenizer: Path | None = None  # a tokenizer folder; default: that of `init_from`, or the `data` folder's
    seq_len: int = 1024
    # --- model ----------------------------------------------------------------------------------------------------
    model_config: Path | None = None  # JSON of BitNetConfig fields (training from scratch)
    init_from: Path | None = None  # a Hugging Face Llama/Qwen2/Mistral folder to convert, then train
    precision: str = "ternary"  # ternary: BitLinear QAT; bf16: the same network with plain linears
    lambda_warmup: int = -1  # steps of λ 0 -> 1 quantization warm-up; -1: 1000 with init_from (capped), else 0
    # --- optimization ---------------------------------------------------------------------------------------------
    optimizer: str = "adamw"
    lr: float = 1.5e-3  # peak learning rate (of stage 1 with two_stage)
    lr_stage2: float | None = None  # two_stage: the peak of stage 2; default 2/3 of `lr` (BitNet b1.58 recipe)
    stage_split: float = 0.5  # two_stage: where stage 2 begins, as a fraction of the steps
    min_lr_ratio: float = 0.1  # cosine/linear/two_stage end at this fraction of their peak
    schedule: str = "two_stage"
    warmup: int = 100
    weight_decay: float = 0.1  # two_stage: cosine from this to 0 in stage 1, then 0 (BitNet b1.58 recipe)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.9  # SGD
    steps: int = 1000
    batch_size: int = 32  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # --- runtime --------------------------------------------------------------------------------------------------
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms, so that a resumed run repeats the uninterrupted one
    amp: str = "auto"  # bf16 autocast; auto: on CUDA only
    compile: str = "auto"  # torch.compile; auto: on CUDA only
    activation_checkpointing: bool = False
    # Triton BitLinear forward/backward (on CUDA). auto: off, since on an H100 the torch.compile'd fake quantization
    # is faster (benchmarks/train_step.py); `on` uses them.
    fused_kernels: str = "auto"
    distributed: str = "auto"  # under torchrun; auto: DDP
    # --- output, checkpoints, logging -----------------------------------------------------------------------------
    out: Path | None = None
    eval_every: int = 250
    eval_batches: int = 0  # validation batches per evaluation; 0: the whole validation split
    save_every: int = 0  # steps between checkpoints; 0: at every evaluation
    keep_last: int = 3
    resume: bool = False
    log_every: int = 10
    tensorboard: bool = True
    progress: str = "auto"  # the rich progress bar; auto: when the output is a terminal

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.data:
            raise UserError("no training data: give --data (or 'data' in the config file)")
        if self.out is None:
            raise UserError("no output folder: give --out (or 'out' in the config file)")
        if self.model_config is None and self.init_from is None:
            raise UserError("give --model-config (training from scratch) or --init-from (a Hugging Face checkpoint)")
        if self.model_config is not None and self.init_from is not None:
            raise UserError("give --model-config or --init-from, not both")
        choices = {"precision": PRECISIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "text_unit": TEXT_UNITS,
                   "amp": AMP_MODES, "distributed": DISTRIBUTED, "compile": SWITCHES, "fused_kernels": SWITCHES,
                   "progress": SWITCHES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{_flag(name)} is {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_batches", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        if self.lambda_warmup < -1:
            raise UserError(f"--lambda-warmup must be -1 (automatic) or at least 0, got {self.lambda_warmup}")
        for name in ("lr", "lr_stage2"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise UserError(f"{_flag(name)} must be positive, got {value}")
        for name in ("val_percent",):
            if not 0 <= getattr(self, name) < 100:
                raise UserError(f"{_flag(name)} must be in [0, 100), got {getattr(self, name)}")
        for name in ("stage_split", "min_lr_ratio", "momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{_flag(name)} must be between 0 and 1, got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        if self.val_percent == 0 and not self.val_data and not _is_token_folder(self.data):
            raise UserError("--val-percent is 0 and no --val-data is given: there would be no validation split")

    @property
    def quant_warmup_steps(self) -> int:
        """λ warm-up length: the given one, or by default 1000 steps (at most a tenth of the run) with init_from."""
        if self.lambda_warmup >= 0:
            return self.lambda_warmup
        return min(1000, self.steps // 10) if self.init_from is not None else 0

    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, list):
                return [plain(v) for v in value]
            return value

        return {name: plain(value) for name, value in asdict(self).items()}

    @classmethod
    def from_sources(cls, yaml_path: Path | None = None, **overrides: Any) -> TrainConfig:
        """Defaults, then the YAML file's fields, then `overrides` (those not None)."""
        fields: dict[str, Any] = {}
        source = "config"
        if yaml_path is not None:
            fields = read_yaml(yaml_path)
            source = str(yaml_path)
        flags = {name: value for name, value in overrides.items() if value is not None}
        values = {**_coerce(fields, source, base=Path(yaml_path).parent if yaml_path else None),
                  **_coerce(flags, "flags", base=None)}  # fmt: skip
        try:
            return cls(**values)
        except UserError as err:
            if yaml_path is None:
                raise
            raise UserError(f"{yaml_path}: {err}") from None


def require(module: str, package: str, purpose: str):
    """Import an optional dependency of training, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the {package} package: pip install 'bitnet158[train]'") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_token_folder(paths: list[Path]) -> bool:
    return len(paths) == 1 and (Path(paths[0]) / "train.bin").is_file()


def read_yaml(path: Path) -> dict[str, Any]:
    yaml = require("yaml", "pyyaml", "a YAML config")

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path}: not valid YAML{line} ({getattr(err, 'problem', None) or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of field names to values")
    return data


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(values: dict[str, Any], source: str, base: Path | None) -> dict[str, Any]:
    """Check each value against the field's type; YAML paths are relative to the YAML file's folder."""
    types_ = _field_types()
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            close = [n for n in types_ if n.startswith(name[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"{source}: unknown field {key!r}{hint}")
        out[name] = _check(name, value, types_[name], source, base)
    return out


def _check(name: str, value: Any, hint: Any, source: str, base: Path | None) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    where = f"{source}: field {name!r}" if source != "flags" else _flag(name)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        items = value if isinstance(value, list) else [value]
        return [_check(name, v, item, source, base) for v in items]
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(f"{where} must be a path, got {value!r}")
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, bool) and name in ("compile", "fused_kernels", "progress"):
            return "on" if value else "off"  # YAML reads `on`/`off` as booleans
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    raise AssertionError(f"field {name} has an unhandled type {hint}")
