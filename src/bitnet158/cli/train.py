"""`bitnet158 train`: quantization-aware training of a BitNet b1.58 model, from scratch or from a Hugging Face
Llama-family checkpoint, configured by a YAML file (`--config`) and/or flags (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bitnet158.training.config import TrainConfig
from bitnet158.training.trainer import Trainer

Opt = typer.Option


def train(
    config: Annotated[Path | None, Opt(help="YAML file of training settings (field names as the flags).")] = None,
    data: Annotated[list[Path] | None, Opt(help="Training files/folders/globs (.txt .json .jsonl .csv .parquet), "
                                          "or a token folder with train.bin and val.bin. Repeatable.")] = None,
    val_data: Annotated[list[Path] | None, Opt(help="Validation files (default: hold out --val-percent).")] = None,
    val_percent: Annotated[float | None, Opt(help="Percent of documents held out for validation [1].")] = None,
    text_field: Annotated[str | None, Opt(help="Record field with the text [text].")] = None,
    messages_field: Annotated[str | None, Opt(help="Record field with chat messages [messages].")] = None,
    text_unit: Annotated[str | None, Opt(help="A .txt document: paragraph, line or file [paragraph].")] = None,
    tokenizer: Annotated[Path | None, Opt(help="Tokenizer folder (default: --init-from's or --data's).")] = None,
    model_config: Annotated[Path | None, Opt(help="JSON of BitNetConfig fields, to train from scratch.")] = None,
    init_from: Annotated[Path | None, Opt(help="Hugging Face Llama/Qwen2/Mistral folder to convert.")] = None,
    out: Annotated[Path | None, Opt(help="Output: checkpoints/, log.jsonl, tensorboard/, the packed model.")] = None,
    precision: Annotated[str | None, Opt(help="ternary (BitLinear QAT) or bf16 (plain linears) [ternary].")] = None,
    lambda_warmup: Annotated[int | None, Opt(help="Steps of λ 0->1 quantization warm-up [-1: auto].")] = None,
    optimizer: Annotated[str | None, Opt(help="adamw or sgd [adamw].")] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate [1.5e-3].")] = None,
    lr_stage2: Annotated[float | None, Opt(help="two_stage: stage-2 peak LR [2/3 of --lr].")] = None,
    schedule: Annotated[str | None, Opt(help="two_stage, cosine, linear or constant [two_stage].")] = None,
    warmup: Annotated[int | None, Opt(help="Linear LR warm-up steps [100].")] = None,
    weight_decay: Annotated[float | None, Opt(help="Weight decay (stage 1 peak with two_stage) [0.1].")] = None,
    steps: Annotated[int | None, Opt(help="Optimizer steps [1000].")] = None,
    batch_size: Annotated[int | None, Opt(help="Sequences per micro-batch per process [32].")] = None,
    grad_accum: Annotated[int | None, Opt(help="Micro-batches per step [1].")] = None,
    grad_clip: Annotated[float | None, Opt(help="Max gradient norm, 0 for none [1.0].")] = None,
    seq_len: Annotated[int | None, Opt(help="Tokens per sequence [1024].")] = None,
    eval_every: Annotated[int | None, Opt(help="Steps between validations [250].")] = None,
    eval_batches: Annotated[int | None, Opt(help="Batches per validation, 0: all [0].")] = None,
    save_every: Annotated[int | None, Opt(help="Steps between checkpoints, 0: at each validation [0].")] = None,
    keep_last: Annotated[int | None, Opt(help="Checkpoints kept [3].")] = None,
    log_every: Annotated[int | None, Opt(help="Steps between log records [10].")] = None,
    resume: Annotated[bool, Opt("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    deterministic: Annotated[bool | None, Opt(help="Deterministic algorithms (exact resume).")] = None,
    activation_checkpointing: Annotated[bool | None, Opt(help="Recompute activations in backward.")] = None,
    amp: Annotated[str | None, Opt(help="bf16 autocast: auto (CUDA only), bf16 or none.")] = None,
    compile: Annotated[str | None, Opt(help="torch.compile: auto (CUDA only), on or off.")] = None,
    fused_kernels: Annotated[str | None, Opt(help="Triton BitLinear kernels: auto, on or off.")] = None,
    distributed: Annotated[str | None, Opt(help="Under torchrun: ddp or fsdp [auto: ddp].")] = None,
    tensorboard: Annotated[bool | None, Opt(help="Write TensorBoard event files [on].")] = None,
    progress: Annotated[str | None, Opt(help="Progress bar: auto (terminal), on or off.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    seed: Annotated[int | None, Opt(help="Seed of the initial weights and the data order [0].")] = None,
) -> None:
    """Train a BitNet b1.58 model (QAT) from scratch or from an fp Hugging Face checkpoint."""
    flags = {name: value for name, value in locals().items() if name != "config"}
    flags["data"] = flags["data"] or None  # typer gives [] for an absent list option
    flags["val_data"] = flags["val_data"] or None
    flags["resume"] = resume or None
    metrics = Trainer(TrainConfig.from_sources(config, **flags)).fit()
    if metrics["val_perplexity"] is not None and metrics["history"]:
        print(f"{metrics['precision']}: validation perplexity {metrics['val_perplexity']:.3f} "
              f"after {metrics['tokens_trained']:,} tokens")
