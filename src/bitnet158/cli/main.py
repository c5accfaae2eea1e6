"""The `bitnet158` command line: generate, chat, info, train and convert."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from bitnet158.cli.convert import convert
from bitnet158.cli.model_loading import embedded_model_path, load_model
from bitnet158.cli.serve import serve
from bitnet158.cli.train import train
from bitnet158.devices import resolve_device
from bitnet158.errors import UserError
from bitnet158.generation import SamplingParams, stream
from bitnet158.kernels import cpu as cpu_kernels
from bitnet158.model.checkpoint import checkpoint_files

app = typer.Typer(
    help="BitNet b1.58 ternary language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(train)
app.command()(serve)
app.command()(convert)

ModelOption = Annotated[
    Path | None, typer.Option("--model", help="Model folder (default: the embedded model).", show_default=False)
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 for greedy decoding.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0: all).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
Threads = Annotated[int | None, typer.Option(
    "--threads", min=1, show_default=False,
    help="CPU threads for the kernels (default: $BITNET158_THREADS, else every CPU this process may use).")]


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted or '-'.")] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    seed: Seed = None,
    threads: Threads = None,
) -> None:
    """Continue PROMPT, streaming the text to stdout."""
    cpu_kernels.configure_threads(threads)
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise UserError("the prompt is empty")
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    lm, tokenizer = load_model(model, resolve_device(device))
    _write(prompt)
    for piece in stream(lm, tokenizer, prompt, params):
        _write(piece)
    _write("\n")


@app.command()
def chat(
    model: ModelOption = None,
    device: DeviceOption = "auto",
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.95,
    seed: Seed = None,
    threads: Threads = None,
) -> None:
    """Talk with the model, turn by turn, with its chat template. End with Ctrl-D or /exit."""
    cpu_kernels.configure_threads(threads)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    lm, tokenizer = load_model(model, resolve_device(device))
    messages: list[dict[str, str]] = []
    console = Console(stderr=True)
    console.print("[dim]Chatting; Ctrl-D or /exit to leave.[/dim]")
    while True:
        try:
            user = input("> ")
        except EOFError:
            _write("\n")
            return
        if user.strip() == "/exit":
            return
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        reply = ""
        for piece in stream(lm, tokenizer, prompt, params):
            reply += piece
            _write(piece)
        _write("\n")
        messages.append({"role": "assistant", "content": reply})


@app.command()
def info(model: ModelOption = None, device: DeviceOption = "cpu") -> None:
    """Show a model's architecture, parameters, bits per weight and bytes on disk and in memory."""
    lm, tokenizer = load_model(model, resolve_device(device))
    config = lm.config
    counts = config.num_parameters()
    total_params = counts["ternary"] + counts["high_precision"]
    folder = model if model is not None else embedded_model_path()
    files = [folder] if folder.is_file() else checkpoint_files(folder)  # a .gguf, or a safetensors folder
    disk_bytes = sum(file.stat().st_size for file in files)
    tensors = {t.data_ptr(): t for t in lm.state_dict().values()}.values()  # tied weights once
    memory_bytes = sum(t.numel() * t.element_size() for t in tensors)
    ternary_bytes = sum(t.numel() for t in tensors if t.dtype == torch.uint8)

    table = Table(title=str(folder), show_header=False)
    rows = [
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("intermediate size", f"{config.intermediate_size} ({config.hidden_act})"),
        ("attention heads", f"{config.num_attention_heads} (key/value heads {config.num_key_value_heads}, "
                            f"head dim {config.head_dim})"),
        ("vocabulary", f"{config.vocab_size} (tokenizer: {tokenizer.vocab_size})"),
        ("context", str(config.max_position_embeddings)),
        ("tied embeddings", str(config.tie_word_embeddings)),
        ("parameters", f"{total_params:,} ({counts['ternary']:,} ternary, {counts['high_precision']:,} "
                       "high precision)"),
        ("ternary weights", f"{8 * ternary_bytes / counts['ternary']:.2f} bits per weight stored "
                            "(1.58 bits of information)"),
        ("all parameters", f"{8 * disk_bytes / total_params:.2f} bits per parameter on disk"),
        ("bytes on disk", f"{disk_bytes:,} ({disk_bytes / 2**20:.1f} MiB)"),
        ("bytes in memory", f"{memory_bytes:,} ({memory_bytes / 2**20:.1f} MiB, {lm.dtype} on {lm.device})"),
        ("CPU kernels", cpu_kernels.describe()),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def main() -> None:
    """Entry point: user errors print one line and exit 1, with no traceback."""
    try:
        app()
    except UserError as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/bold red] {err}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
