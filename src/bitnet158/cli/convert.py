"""`bitnet158 convert`: between our packed Hugging Face folders, dense bf16 folders and GGUF files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bitnet158.errors import UserError
from bitnet158.formats.gguf_export import EMBED_TYPES, save_gguf
from bitnet158.formats.gguf_import import load_gguf_tokenizer
from bitnet158.formats.hf_dense import save_dense_bf16
from bitnet158.formats.ternary_blocks import TERNARY_TYPES
from bitnet158.model.bitnet import BitNetForCausalLM
from bitnet158.tokenizer import Tokenizer

TARGETS = ("hf", "hf-bf16", "gguf")


def _replace_folder(dst: Path, write: Callable[[Path], None]) -> None:
    """Write a folder beside `dst`, then swap it in, so that `dst` is never half-written."""
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    old = None
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give the folder the usual permissions
        if dst.exists():
            old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".old"))
            os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def convert(
    src: Annotated[Path, typer.Argument(help="A model folder (Hugging Face BitNet) or a .gguf file.")],
    dst: Annotated[Path, typer.Argument(help="The folder (hf, hf-bf16) or .gguf file to write.")],
    to: Annotated[str, typer.Option("--to", help="hf (packed 2-bit), hf-bf16 (dense bf16) or gguf.")],
    type_: Annotated[str, typer.Option("--type", help="GGUF ternary type: tq2_0, tq1_0 or i2_s.")] = "tq2_0",
    embed_type: Annotated[str, typer.Option("--embed-type", help="GGUF embedding type: f16, q8_0 or q6_k.")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Overwrite DST if it exists.")] = False,
) -> None:
    """Convert the model SRC into DST."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r} is not one of {', '.join(TARGETS)}")
    if type_ not in TERNARY_TYPES:
        raise UserError(f"--type {type_!r} is not one of {', '.join(TERNARY_TYPES)}")
    if embed_type not in EMBED_TYPES:
        raise UserError(f"--embed-type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if dst.exists() and not force:
        raise UserError(f"{dst}: already exists (use --force to overwrite it)")
    if not dst.parent.is_dir():
        raise UserError(f"{dst.parent}: no such folder")
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        reading = progress.add_task(f"reading {src.name}", total=None)
        model = BitNetForCausalLM.from_pretrained(
            src, progress=lambda done, total: progress.update(reading, completed=done, total=total))
        tokenizer = load_gguf_tokenizer(src) if src.is_file() else Tokenizer.from_pretrained(src)
        writing = progress.add_task(f"writing {dst.name}", total=None)
        if to == "gguf":
            save_gguf(model, tokenizer, dst, type_, embed_type,
                      lambda done, total: progress.update(writing, completed=done, total=total))
        elif to == "hf":
            _replace_folder(dst, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        else:
            _replace_folder(dst, lambda tmp: save_dense_bf16(model, tokenizer, tmp))
        progress.update(writing, completed=1, total=1)
    Console(stderr=True, highlight=False).print(f"wrote {dst}")
