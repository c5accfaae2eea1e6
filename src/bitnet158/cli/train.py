"""`bitnet158 train`: quantization-aware training of a BitNet b1.58 model from scratch on a token folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bitnet158.training.trainer import TrainConfig
from bitnet158.training.trainer import train as run_training


def train(
    data: Annotated[Path, typer.Option(help="Folder with train.bin, val.bin and the tokenizer files.")],
    model_config: Annotated[Path, typer.Option(help="JSON of BitNetConfig fields; the tokenizer sets the vocab.")],
    out: Annotated[Path, typer.Option(help="Output: checkpoint/, metrics.json and, if ternary, the packed model.")],
    precision: Annotated[str, typer.Option(help="ternary (BitLinear QAT), or bf16: plain linears.")] = "ternary",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 1024,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1.5e-3,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 100,
    eval_every: Annotated[int, typer.Option(help="Steps between validation runs (each writes a checkpoint).")] = 250,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the batch order.")] = 0,
) -> None:
    """Train a BitNet b1.58 model from scratch (or its bf16 baseline) and report validation perplexity."""
    metrics = run_training(TrainConfig(data, model_config, out, precision, steps, batch_size, seq_len, lr, warmup,
                                       eval_every, device, seed))
    print(f"{metrics['precision']}: validation perplexity {metrics['val_perplexity']:.3f} "
          f"after {metrics['tokens_trained']:,} tokens; wrote {out}")

