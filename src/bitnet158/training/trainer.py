"""Quantization-aware training (QAT) of BitNet b1.58 models, from scratch or from a converted fp checkpoint.

    trainer = Trainer(TrainConfig(data=[...], model_config=..., out=...))   # or TrainConfig.from_sources(yaml)
    metrics = trainer.fit()

The model's `BitLinear` layers keep fp master weights and see ternary weights and int8 activations in the
forward pass (straight-through gradients). With `precision="bf16"` the same network trains with plain linear
layers: the baseline of the same shape and token budget. A run:
1. tokenizes the data into `out/data/` (see `data.py`) unless given a token folder;
2. builds the model: from `model_config` with random weights, or from `init_from` (see `from_hf.py`), whose
   quantization is blended in by a λ warm-up;
3. trains: per step `grad_accum` micro-batches per process, gradient clipping, a step skipped (with a warning)
   when the gradients are not finite, learning rate and weight decay from the schedule (`optim.py`);
4. evaluates every `eval_every` steps, checkpoints (`checkpoints.py`), logs (`monitor.py`);
5. at the end writes the packed Hugging Face BitNet model (`save_pretrained`) and its tokenizer into `out`.
`resume=True` continues from the newest checkpoint; in `deterministic` mode the continued run computes exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from bitnet158.errors import UserError
from bitnet158.files import write_json
from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.nn import BitLinear
from bitnet158.tokenizer import Tokenizer
from bitnet158.training import checkpoints as ckpt
from bitnet158.training.config import TrainConfig
from bitnet158.training.data import (
    DocumentReader,
    PackedSequences,
    expand_paths,
    load_tokens,
    prepare_tokens,
    sequential_batches,
)
from bitnet158.training.distributed import World, init_world, set_gradient_sync, shutdown, wrap
from bitnet158.training.from_hf import calibrate_sub_norms_, load_hf_llama, set_quant_strength_
from bitnet158.training.monitor import Monitor
from bitnet158.training.optim import Schedule, make_optimizer, set_step_hyperparameters

INIT_STD = 0.02
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
EOT = "<|eot_id|>"

__all__ = ["TrainConfig", "Trainer", "evaluate", "train", "use_plain_linears_"]


# --- model helpers -----------------------------------------------------------------------------------------------


def use_plain_linears_(model: nn.Module) -> nn.Module:
    """Replace every `BitLinear` with an `nn.Linear` sharing its parameters: the unquantized baseline."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            model.set_submodule(name, linear)
    return model


def checkpoint_activations_(model: BitNetForCausalLM) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them."""
    for layer in model.model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward):
            return checkpoint(_forward, *args, use_reentrant=False)

        layer.forward = checkpointed


def model_config_from_file(path: Path, tokenizer: Tokenizer, seq_len: int) -> BitNetConfig:
    """The architecture from a JSON file, with the vocabulary and special tokens of the tokenizer."""
    from bitnet158.files import read_json_object

    fields = read_json_object(path)
    vocab_size = tokenizer.vocab_size
    if fields.get("vocab_size", vocab_size) != vocab_size:
        raise UserError(f"{path}: vocab_size {fields['vocab_size']} differs from the tokenizer's {vocab_size}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eot = tokenizer.tokenizer.token_to_id(EOT)
    if eot is not None and eot not in eos:
        eos.append(eot)  # plain text ends with EOS, a chat turn with <|eot_id|>: generation stops at either
    fields = {**fields, "vocab_size": vocab_size, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": eos if len(eos) > 1 else (eos[0] if eos else None)}  # fmt: skip
    config = BitNetConfig.from_dict(fields, source=str(path))
    if config.max_position_embeddings < seq_len:
        raise UserError(f"{path}: max_position_embeddings {config.max_position_embeddings} < --seq-len {seq_len}")
    return config


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast(device: torch.device, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    enabled = device.type == "cuda" if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    max_batches: int = 0,
    world: World | None = None,
    amp: bool | None = None,
) -> float:
    """Mean next-token loss (nats) over every non-overlapping `seq_len` window of `tokens` (the first
    `max_batches` batches when not 0), the batches shared out among the processes of `world`."""
    world = world or World(device=device)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for index, (inputs, targets) in enumerate(sequential_batches(tokens, batch_size, seq_len, device)):
        if max_batches and index >= max_batches:
            break
        if index % world.size != world.rank:
            continue
        with autocast(device, amp):
            logits = model(inputs)
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
        total[1] += targets.numel()
    world.sum(total)
    return (total[0] / total[1]).item()


# --- the trainer -------------------------------------------------------------------------------------------------


class Trainer:
    """One training run as `cfg` describes it; `fit()` runs it. See the module docstring."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.world = init_world(cfg.device)
        self.device = self.world.device
        self.out = Path(cfg.out)
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.world.barrier()
        cuda = self.device.type == "cuda"
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)

        self.tokenizer, self.tokenizer_dir = self._tokenizer()
        self.train_tokens, self.val_tokens = self._data()
        self.sequences = PackedSequences(self.train_tokens, cfg.seq_len, cfg.seed)

        torch.manual_seed(cfg.seed)
        model = self._model()
        if cfg.precision == "bf16":
            use_plain_linears_(model)
        model.to(self.device)
        self.config: BitNetConfig = model.config
        if int(max(self.train_tokens.max(initial=0), self.val_tokens.max(initial=0))) >= self.config.vocab_size:
            raise UserError(f"the token files hold ids beyond the model's vocabulary of {self.config.vocab_size}")
        if cfg.init_from is not None:
            inputs, _ = self.sequences.batch(0, min(cfg.batch_size, 8), self.device)
            calibrate_sub_norms_(model, inputs)
        self.warmup_steps = cfg.quant_warmup_steps if cfg.precision == "ternary" else 0
        self.fused = self._fused_kernel()
        if cfg.activation_checkpointing:
            checkpoint_activations_(model)
        self.model = model  # unwrapped, for export
        self.wrapped = wrap(model, self.world, "fsdp" if cfg.distributed == "fsdp" else "ddp")
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
        self.loss_fn = torch.compile(next_token_loss) if use_compile else next_token_loss
        self.optimizer = make_optimizer(
            self.wrapped, cfg.optimizer, cfg.lr, cfg.weight_decay, tuple(cfg.betas), cfg.momentum,
            fused=cuda and cfg.distributed != "fsdp",
        )  # fmt: skip
        self.schedule = Schedule(cfg.schedule, cfg.lr, cfg.steps, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay,
                                 cfg.lr_stage2, cfg.stage_split)  # fmt: skip
        self.step = 0
        self.history: list[dict] = []
        if cfg.resume:
            self._resume()
        self.monitor = Monitor(self.out, cfg.steps, self.step, self.world.is_main, cfg.tensorboard, cfg.progress)

    # --- set-up ---

    def _tokenizer(self) -> tuple[Tokenizer, Path]:
        cfg = self.cfg
        if cfg.tokenizer is not None:
            folder = Path(cfg.tokenizer)
        elif cfg.init_from is not None:
            folder = Path(cfg.init_from)
        elif len(cfg.data) == 1 and Path(cfg.data[0]).is_dir():
            folder = Path(cfg.data[0])
        else:
            raise UserError("no tokenizer: give --tokenizer (a folder with tokenizer.json)")
        return Tokenizer.from_pretrained(folder), folder

    def _data(self) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        need = cfg.seq_len + 1
        if len(cfg.data) == 1 and (Path(cfg.data[0]) / "train.bin").is_file():  # a token folder
            folder = Path(cfg.data[0])
            return load_tokens(folder / "train.bin", need), load_tokens(folder / "val.bin", need)
        reader = DocumentReader(self.tokenizer, cfg.text_field, cfg.messages_field, cfg.text_unit)
        train_files, val_files = expand_paths(cfg.data), expand_paths(cfg.val_data) if cfg.val_data else []
        folder = self.out / "data"
        log = print if self.world.is_main else (lambda _: None)
        if self.world.is_main:  # one process tokenizes, the others wait and then find the files ready
            manifest = prepare_tokens(folder, train_files, val_files, cfg.val_percent, self.tokenizer, reader, log)
        self.world.barrier()
        if not self.world.is_main:
            manifest = prepare_tokens(folder, train_files, val_files, cfg.val_percent, self.tokenizer, reader, log)
        dtype = manifest["dtype"]
        train = load_tokens(folder / "train.bin", 0, dtype)
        val = load_tokens(folder / "val.bin", 0, dtype)
        if len(train) < need:
            raise UserError(f"{len(train)} training tokens are fewer than one sequence of {need}; "
                            "give more data or a smaller --seq-len")  # fmt: skip
        if len(val) < need:
            raise UserError(f"{len(val)} validation tokens are fewer than one sequence of {need}; "
                            "raise --val-percent or give --val-data")  # fmt: skip
        return train, val

    def _model(self) -> BitNetForCausalLM:
        cfg = self.cfg
        if cfg.init_from is not None:
            model = load_hf_llama(Path(cfg.init_from))
            if model.config.vocab_size < self.tokenizer.vocab_size:
                raise UserError(f"{cfg.init_from}: vocab_size {model.config.vocab_size} is smaller than the "
                                f"tokenizer's {self.tokenizer.vocab_size}")  # fmt: skip
            if model.config.max_position_embeddings < cfg.seq_len:
                raise UserError(f"{cfg.init_from}: max_position_embeddings {model.config.max_position_embeddings}"
                                f" < --seq-len {cfg.seq_len}")  # fmt: skip
            return model
        config = model_config_from_file(Path(cfg.model_config), self.tokenizer, cfg.seq_len)
        model = BitNetForCausalLM(config)
        model.init_weights(INIT_STD)
        return model

    def _fused_kernel(self):
        """The Triton training kernels for `BitLinear`, where asked for and available."""
        cfg = self.cfg
        if cfg.precision != "ternary" or cfg.fused_kernels != "on" or self.device.type != "cuda":
            if cfg.fused_kernels == "on" and self.device.type != "cuda":
                raise UserError("--fused-kernels on needs a CUDA device")
            return None
        try:
            from bitnet158.training.triton_bitlinear import bitlinear_train
        except ImportError:
            if cfg.fused_kernels == "on":
                raise UserError("--fused-kernels on needs Triton (pip install triton)") from None
            return None
        return bitlinear_train

    def _set_quantization(self, step: int) -> float:
        """λ for `step` (a linear warm-up 0 -> 1); at λ = 1 the fused kernels (if any) take over."""
        if self.cfg.precision != "ternary":
            return 1.0
        strength = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        set_quant_strength_(self.model, None if strength >= 1 else strength)
        for module in self.model.modules():
            if isinstance(module, BitLinear):
                module.fused = self.fused if strength >= 1 else None
        return strength

    def _resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            if self.world.is_main:
                print(f"--resume: no checkpoint in {ckpt.checkpoint_dir(self.out)}; starting from step 0", flush=True)
            return
        state = ckpt.load_checkpoint(latest, self.wrapped, self.optimizer, self.config.tie_word_embeddings)
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        if self.world.is_main:
            print(f"resumed from {latest} (step {self.step})", flush=True)

    # --- the loop ---

    def train_step(self) -> dict:
        """One optimizer step on global batch `self.step`; returns its log record."""
        cfg = self.cfg
        strength = self._set_quantization(self.step)
        lr, wd = set_step_hyperparameters(self.optimizer, self.schedule, self.step)
        per_step = cfg.batch_size * cfg.grad_accum * self.world.size
        losses = []
        for micro in range(cfg.grad_accum):
            first = self.step * per_step + (micro * self.world.size + self.world.rank) * cfg.batch_size
            inputs, targets = self.sequences.batch(first, cfg.batch_size, self.device)
            set_gradient_sync(self.wrapped, micro == cfg.grad_accum - 1)
            with autocast(self.device, self.amp):
                loss = self.loss_fn(self.wrapped, inputs, targets)
            (loss / cfg.grad_accum).backward()
            losses.append(loss.detach())
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        skipped = not math.isfinite(grad_norm)
        if skipped:
            # Every process sees the same all-reduced gradients, so all of them skip together.
            warnings.warn(f"step {self.step + 1}: gradient norm is {grad_norm}; step skipped", stacklevel=2)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = torch.stack(losses).mean().item()
        return {"step": self.step, "loss": loss, "lr": lr, "weight_decay": wd, "grad_norm": grad_norm,
                "lambda": strength, "skipped": skipped}  # fmt: skip

    def evaluate(self) -> float:
        self.wrapped.eval()
        self._set_quantization(self.step)
        loss = evaluate(self.wrapped, self.val_tokens, self.cfg.batch_size, self.cfg.seq_len, self.device,
                        self.cfg.eval_batches, self.world, self.amp)  # fmt: skip
        self.wrapped.train()
        return loss

    def save(self) -> None:
        model_state, optimizer_state = ckpt.gather_state(self.wrapped, self.optimizer)
        if self.world.is_main:
            state = {"samples": self.step * self.tokens_per_step // self.cfg.seq_len,
                     "tokens": self.step * self.tokens_per_step, "history": self.history,
                     "config": self.config.to_dict(), "train": self.cfg.to_dict()}  # fmt: skip
            ckpt.save_checkpoint(self.out, self.step, model_state, optimizer_state, state, self.cfg.keep_last,
                                 self.config.tie_word_embeddings)  # fmt: skip
        self.world.barrier()

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world.size * self.cfg.seq_len

    def fit(self) -> dict:
        """Train to `cfg.steps`, export the model, and return the run's metrics (also in `metrics.json`)."""
        try:
            return self._fit()
        finally:
            self.monitor.close()
            shutdown(self.world)

    def _fit(self) -> dict:
        cfg, monitor = self.cfg, self.monitor
        parameters = sum(p.numel() for p in self.model.parameters())
        monitor.print(f"{cfg.precision} model, {parameters:,} parameters, on {self.device} x {self.world.size}; "
                      f"steps {self.step}..{cfg.steps} of {self.tokens_per_step:,} tokens")  # fmt: skip
        save_every = cfg.save_every or cfg.eval_every
        if self.step == 0:
            self._validate()
        self.wrapped.train()
        start = last_time = time.perf_counter()
        start_step = last_step = self.step
        train_loss = None
        while self.step < cfg.steps:
            record = self.train_step()
            train_loss = record["loss"]
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                record["loss"] = self.world.mean(record["loss"])
                record["tokens"] = self.step * self.tokens_per_step
                record["tokens_per_s"] = (self.step - last_step) * self.tokens_per_step / (now - last_time)
                monitor.train_step(record, print_line=True)
                last_time, last_step = now, self.step
            else:
                monitor.advance(self.step)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self._validate(train_loss)
            if self.step % save_every == 0 or self.step == cfg.steps:
                self.save()
        seconds = time.perf_counter() - start
        if self.world.is_main:
            self._export()
        metrics = {
            "precision": cfg.precision,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "processes": self.world.size,
            "parameters": self.config.num_parameters(),
            "tokens_trained": cfg.steps * self.tokens_per_step,
            "seconds": seconds,
            "tokens_per_s": (cfg.steps - start_step) * self.tokens_per_step / seconds if seconds else None,
            "val_tokens": (len(self.val_tokens) - 1) // cfg.seq_len * cfg.seq_len,
            "val_loss": self.history[-1]["val_loss"] if self.history else None,
            "val_perplexity": self.history[-1]["val_perplexity"] if self.history else None,
            "train": cfg.to_dict(),
            "history": self.history,
        }
        if self.world.is_main:
            write_json(self.out / "metrics.json", metrics)
        return metrics

    def _validate(self, train_loss: float | None = None) -> None:
        loss = self.evaluate()
        self.history.append({"step": self.step, "train_loss": train_loss, "val_loss": loss,
                             "val_perplexity": math.exp(min(loss, 700))})  # fmt: skip
        self.monitor.validation(self.step, loss)

    def _export(self) -> None:
        """The packed Hugging Face BitNet model and its tokenizer files, in `out` (ternary runs only: a bf16
        baseline is not a BitNet model, and `from_pretrained` would ternarize it)."""
        if self.cfg.precision != "ternary":
            return
        latest = ckpt.latest_checkpoint(self.out)
        model = BitNetForCausalLM(self.config)
        state = load_file(latest / "model.safetensors")
        if self.config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state)
        model.save_pretrained(self.out)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_dir / name).is_file():
                shutil.copyfile(self.tokenizer_dir / name, self.out / name)
        self.monitor.print(f"wrote the packed model to {self.out}")


def train(cfg: TrainConfig) -> dict:
    """Run `cfg` and return its metrics."""
    return Trainer(cfg).fit()
