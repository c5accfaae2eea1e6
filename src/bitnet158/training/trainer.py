"""Train a BitNet b1.58 model from scratch with quantization-aware training (QAT).

The model's `BitLinear` layers keep full-precision master weights and see ternary weights and int8
activations in the forward pass (straight-through gradients). With `precision="bf16"` the same network
is trained with plain linear layers instead, as a baseline of the same shape and token budget.

The loop, in the style of nanoGPT's train.py: random windows of the training tokens; AdamW; linear
warm-up then cosine decay; bf16 autocast (and torch.compile) on CUDA; gradient clipping; validation
loss over the whole held-out split every `eval_every` steps, each time with a checkpoint. At the end a
ternary model is written with `save_pretrained` (packed 2-bit weights) beside its tokenizer files.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from bitnet158.devices import resolve_device
from bitnet158.errors import UserError
from bitnet158.files import read_json_object, write_atomically, write_json
from bitnet158.model import BitNetConfig, BitNetForCausalLM
from bitnet158.nn import BitLinear
from bitnet158.training.corpus import BOS, EOS, EOT
from bitnet158.training.data import load_tokens, random_batch, sequential_batches

PRECISIONS = ("ternary", "bf16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
INIT_STD = 0.02
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
MIN_LR_RATIO = 0.1  # the cosine schedule ends at a tenth of the peak learning rate
LOG_EVERY = 50


@dataclass
class TrainConfig:
    data: Path  # a folder written by `bitnet158.training.corpus.build_corpus`
    model_config: Path  # a JSON file of BitNetConfig fields; the tokenizer fixes vocab size and special tokens
    out: Path
    precision: str = "ternary"
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 1024
    lr: float = 1.5e-3
    warmup: int = 100
    eval_every: int = 250
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        self.data, self.model_config, self.out = Path(self.data), Path(self.model_config), Path(self.out)
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision is {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        for name in ("steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UserError(f"--warmup must not be negative, got {self.warmup}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return {name: str(value) if isinstance(value, Path) else value for name, value in asdict(self).items()}


def load_tokenizer(data: Path) -> Tokenizer:
    path = data / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file (build the data folder with bitnet158.training.corpus)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises plain Exceptions for malformed files
        raise UserError(f"{path}: not a valid tokenizer file ({err})") from None
    for token in (BOS, EOS, EOT):
        if tokenizer.token_to_id(token) is None:
            raise UserError(f"{path}: the tokenizer has no {token} token")
    return tokenizer


def model_config(path: Path, tokenizer: Tokenizer, seq_len: int) -> BitNetConfig:
    """The architecture from `path`, with the vocabulary and special tokens of the tokenizer."""
    fields = read_json_object(path)
    vocab_size = tokenizer.get_vocab_size()
    if fields.get("vocab_size", vocab_size) != vocab_size:
        raise UserError(f"{path}: vocab_size {fields['vocab_size']} differs from the tokenizer's {vocab_size}")
    fields = {
        **fields,
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.token_to_id(BOS),
        # Plain text ends with <|end_of_text|>, a chat turn with <|eot_id|>: generation stops at either.
        "eos_token_id": [tokenizer.token_to_id(EOS), tokenizer.token_to_id(EOT)],
    }
    config = BitNetConfig.from_dict(fields, source=str(path))
    if config.max_position_embeddings < seq_len:
        raise UserError(f"{path}: max_position_embeddings {config.max_position_embeddings} < --seq-len {seq_len}")
    return config


def use_plain_linears_(model: nn.Module) -> nn.Module:
    """Replace every `BitLinear` with an `nn.Linear` sharing its parameters: the unquantized baseline."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias
            model.set_submodule(name, linear)
    return model


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    # Decay matrices (and the embedding), not norm weights.
    params = list(model.parameters())  # a tied embedding appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=device.type == "cuda")


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, batch_size: int, seq_len: int, device: torch.device) -> float:
    """Mean next-token loss (nats) over every non-overlapping `seq_len` window of `tokens`."""
    total, count = 0.0, 0
    for inputs, targets in sequential_batches(tokens, batch_size, seq_len, device):
        with autocast(device):
            logits = model(inputs)
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return total / count


def save_checkpoint(folder: Path, model: BitNetForCausalLM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Master weights (safetensors), optimizer state and a JSON of the step, each file written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    tensors = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    write_atomically(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    write_atomically(folder / "optimizer.pt", lambda tmp: torch.save(optimizer.state_dict(), tmp))
    write_json(folder / "state.json", state)  # last, so that it never names a step the other files lack


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says, write the output folder, and return the run's metrics (also in `metrics.json`)."""
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.data)
    config = model_config(cfg.model_config, tokenizer, cfg.seq_len)
    train_tokens = load_tokens(cfg.data / "train.bin", cfg.seq_len + 1)
    val_tokens = load_tokens(cfg.data / "val.bin", cfg.seq_len + 1)
    if int(max(train_tokens.max(), val_tokens.max())) >= config.vocab_size:
        raise UserError(f"{cfg.data}: token files hold ids beyond the tokenizer's vocabulary of {config.vocab_size}")

    torch.manual_seed(cfg.seed)
    model = BitNetForCausalLM(config)
    if cfg.precision == "bf16":
        use_plain_linears_(model)
    model.init_weights(INIT_STD)
    model.to(device)
    optimizer = make_optimizer(model, cfg.lr, device)
    loss_fn = torch.compile(next_token_loss) if device.type == "cuda" else next_token_loss
    batches = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    print(f"{cfg.precision} model, {sum(p.numel() for p in model.parameters()):,} parameters, on {device}; "
          f"{cfg.steps} steps of {tokens_per_step:,} tokens", flush=True)

    history = []
    train_loss = None  # the last logged training loss
    start = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val_tokens, cfg.batch_size, cfg.seq_len, device)
            history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss,
                            "val_perplexity": math.exp(val_loss), "seconds": time.perf_counter() - start})
            print(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}", flush=True)
            if step > 0:
                save_checkpoint(cfg.out / "checkpoint", model, optimizer,
                                {**history[-1], "config": config.to_dict(), "train": cfg.to_dict()})
        if step == cfg.steps:
            break

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.lr, cfg.warmup, cfg.steps)
        inputs, targets = random_batch(train_tokens, cfg.batch_size, cfg.seq_len, batches, device)
        with autocast(device):
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg.steps:
            train_loss = loss.item()
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}: loss {train_loss:.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                  f"{elapsed:.0f} s, {(step + 1) * tokens_per_step / elapsed:,.0f} tokens/s", flush=True)

    seconds = time.perf_counter() - start
    if cfg.precision == "ternary":
        model.save_pretrained(cfg.out)
        for name in TOKENIZER_FILES:
            shutil.copyfile(cfg.data / name, cfg.out / name)
    metrics = {
        "precision": cfg.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": config.num_parameters(),
        "tokens_trained": cfg.steps * tokens_per_step,
        "seconds": seconds,
        "val_tokens": (len(val_tokens) - 1) // cfg.seq_len * cfg.seq_len,
        "val_loss": history[-1]["val_loss"],
        "val_perplexity": history[-1]["val_perplexity"],
        "train": cfg.to_dict(),
        "history": history,
    }
    write_json(cfg.out / "metrics.json", metrics)
    return metrics
