"""Training data: documents from text, JSON, JSONL, CSV and Parquet files, tokenized once into token files,
and packed into fixed-length sequences served in a seeded order.

1. `prepare_tokens` streams every document of every file (one record, paragraph or line at a time, so a file
   larger than memory is fine), tokenizes it as `BOS text EOS` and appends the ids to `train.bin` or `val.bin`
   in a cache folder. A document is held out for validation by a hash of its file name and position, so the
   split never depends on the order files are read in. The files are written atomically and reused while the
   sources and settings are unchanged, so a resumed run does not tokenize again.
2. `PackedSequences` cuts the token stream into windows of `seq_len + 1` tokens (inputs and next-token targets)
   with no padding: documents are packed end to end. Sample `k` of the run is window `perm_e[k mod n]` of the
   seeded permutation of epoch `e = k div n`; the order is a pure function of (seed, k), which is what makes a
   resumed run, or one spread over several processes, see exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bitnet158.errors import UserError
from bitnet158.files import write_json
from bitnet158.tokenizer import Tokenizer
from bitnet158.training.config import require

TEXT_SUFFIXES = (".txt", ".text", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".json", ".jsonl", ".csv", ".parquet")
ENCODE_BATCH = 512  # documents tokenized together (the tokenizers library parallelizes a batch)
FLUSH_TOKENS = 1 << 20  # tokens buffered before they are appended to the file


# --- token files -------------------------------------------------------------------------------------------------


def load_tokens(path: Path, min_length: int, dtype: np.dtype | str = np.uint16) -> np.ndarray:
    """A token file, memory-mapped; it must hold at least `min_length` tokens."""
    if not path.is_file():
        raise UserError(f"{path}: no such token file")
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
    if len(tokens) < min_length:
        raise UserError(f"{path}: {len(tokens)} tokens, fewer than the {min_length} one sequence needs")
    return tokens


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets `[batch, seq_len]` from windows starting at random offsets."""
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator).tolist()
    windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


def sequential_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every non-overlapping window of the file once, in order, so that evaluation is deterministic."""
    num_windows = (len(tokens) - 1) // seq_len
    for first in range(0, num_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, num_windows) * seq_len, seq_len)
        windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        windows = windows.to(device)
        yield windows[:, :-1], windows[:, 1:]


class PackedSequences:
    """Windows `tokens[i*L : i*L + L + 1]` of a packed token stream, in a seeded order per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"{len(tokens)} training tokens are fewer than one sequence of {seq_len + 1}")
        self._epoch, self._order = -1, None

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def sample(self, k: int) -> np.ndarray:
        """The `k`-th sample of the run (k counts from 0 across epochs)."""
        epoch, position = divmod(k, self.num_windows)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_windows, generator=generator)
        return self.window(int(self._order[position]))

    def batch(self, first: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `first .. first + size - 1` as inputs and targets `[size, seq_len]`."""
        windows = np.stack([self.sample(k) for k in range(first, first + size)]).astype(np.int64)
        windows = torch.from_numpy(windows).to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]


# --- documents ---------------------------------------------------------------------------------------------------


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files, folders (searched recursively for the supported suffixes) and glob patterns, sorted, once each."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if any(ch in str(path) for ch in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path(".")
            pattern = str(path.relative_to(path.anchor)) if path.is_absolute() else str(path)
            matches = sorted(p for p in anchor.glob(pattern) if p.is_file())
            if not matches:
                raise UserError(f"{path}: no file matches this pattern")
            found.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not matches:
                raise UserError(f"{path}: no {', '.join(SUFFIXES)} file in this folder")
            found.extend(matches)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    for path in found:
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{path}: unsupported data file; expected one of {', '.join(SUFFIXES)}")
    return list(dict.fromkeys(found))


class DocumentReader:
    """Turns each record of a data file into text: its `text_field`, or its `messages_field` rendered with the
    tokenizer's chat template. Errors name the file and the record."""

    def __init__(self, tokenizer: Tokenizer, text_field: str, messages_field: str, text_unit: str) -> None:
        self.tokenizer, self.text_field, self.messages_field, self.text_unit = (
            tokenizer, text_field, messages_field, text_unit)  # fmt: skip

    def documents(self, path: Path) -> Iterator[str]:
        suffix = path.suffix.lower()
        try:
            if suffix in TEXT_SUFFIXES:
                yield from self._text(path)
            elif suffix == ".jsonl" or (suffix == ".json" and _first_char(path) != "["):
                yield from self._jsonl(path)
            elif suffix == ".json":
                yield from self._json_array(path)
            elif suffix == ".csv":
                yield from self._csv(path)
            else:
                yield from self._parquet(path)
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or err})") from None

    def _record(self, record: object, where: str) -> str:
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with a {self.text_field!r} or {self.messages_field!r} field")
        if self.text_field in record and record[self.text_field] is not None:
            text = record[self.text_field]
            if not isinstance(text, str):
                raise UserError(f"{where}: field {self.text_field!r} must be a string, got {type(text).__name__}")
            return text
        messages = record.get(self.messages_field)
        if messages is None:
            raise UserError(f"{where}: no {self.text_field!r} or {self.messages_field!r} field")
        if isinstance(messages, str):  # CSV cells hold the messages as JSON
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise UserError(f"{where}: field {self.messages_field!r} is not a JSON list of messages") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise UserError(f"{where}: field {self.messages_field!r} must be a list of {{role, content}} messages")
        if self.tokenizer.chat_template is None:
            raise UserError(f"{where}: chat messages need a tokenizer with a chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)

    def _text(self, path: Path) -> Iterator[str]:
        if self.text_unit == "file":
            yield path.read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as file:
            if self.text_unit == "line":
                for line in file:
                    if line.strip():
                        yield line.rstrip("\n")
                return
            paragraph: list[str] = []
            for line in file:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).rstrip("\n")
                    paragraph = []
            if paragraph:
                yield "".join(paragraph).rstrip("\n")

    def _jsonl(self, path: Path) -> Iterator[str]:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                yield self._record(record, f"{path}:{number}")

    def _json_array(self, path: Path) -> Iterator[str]:
        # A JSON array has to be parsed whole; for files larger than memory use JSONL.
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        for number, record in enumerate(records):
            yield self._record(record, f"{path}: record {number}")

    def _csv(self, path: Path) -> Iterator[str]:
        csv.field_size_limit(sys.maxsize if sys.maxsize < 2**62 else 2**62)  # long documents in one cell
        with open(path, encoding="utf-8", newline="") as file:
            reader = csv.DictReader(file)
            fields = reader.fieldnames or []
            if self.text_field not in fields and self.messages_field not in fields:
                raise UserError(f"{path}: no column {self.text_field!r} or {self.messages_field!r} (has {fields})")
            for number, row in enumerate(reader, start=2):
                if row.get(self.text_field) == "":
                    row[self.text_field] = None  # an empty cell is a missing value
                yield self._record(row, f"{path}:{number}")

    def _parquet(self, path: Path) -> Iterator[str]:
        pq = require("pyarrow.parquet", "pyarrow", f"{path}: reading Parquet")

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises ArrowInvalid and others for a bad file
            raise UserError(f"{path}: not a Parquet file ({err})") from None
        names = parquet.schema_arrow.names
        columns = [c for c in (self.text_field, self.messages_field) if c in names]
        if not columns:
            raise UserError(f"{path}: no column {self.text_field!r} or {self.messages_field!r} (has {names})")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=columns):  # one row group slice at a time
            for record in batch.to_pylist():
                yield self._record(record, f"{path}: row {row}")
                row += 1


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8") as file:
        while chunk := file.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]
    return ""


def is_held_out(name: str, index: int, val_percent: float) -> bool:
    digest = hashlib.sha256(f"{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < round(val_percent * 100)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _TokenWriter:
    """Appends token ids to a temporary file, renamed into place by `commit`."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")
        self.buffer: list[int] = []
        self.count = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        if len(self.buffer) >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        np.asarray(self.buffer, dtype=self.dtype).tofile(self.file)
        self.count += len(self.buffer)
        self.buffer = []

    def commit(self) -> int:
        self.flush()
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.count

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _fingerprint(files: list[Path], settings: dict) -> dict:
    return {
        "files": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                  for p in files],  # fmt: skip
        **settings,
    }


def prepare_tokens(
    folder: Path,
    train_files: list[Path],
    val_files: list[Path],
    val_percent: float,
    tokenizer: Tokenizer,
    reader: DocumentReader,
    log=print,
) -> dict:
    """Tokenize the documents into `folder/train.bin` and `folder/val.bin` (see the module docstring) and return
    `folder/data.json`, which describes them. Nothing is done when `data.json` already matches the inputs."""
    dtype = token_dtype(tokenizer.vocab_size)
    tokenizer_hash = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()
    settings = {"val_percent": val_percent if not val_files else None, "tokenizer_sha256": tokenizer_hash,
                "text_field": reader.text_field, "messages_field": reader.messages_field,
                "text_unit": reader.text_unit, "dtype": dtype.name}  # fmt: skip
    wanted = {"train": _fingerprint(train_files, settings), "val": _fingerprint(val_files, {})}
    manifest_path = folder / "data.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("inputs") == wanted and (folder / "train.bin").is_file() and (folder / "val.bin").is_file():
            return manifest
    folder.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    writers = {"train": _TokenWriter(folder / "train.bin", dtype), "val": _TokenWriter(folder / "val.bin", dtype)}
    documents = {"train": 0, "val": 0}

    def encode(texts: list[str], split_of: list[str]) -> None:
        encodings = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
        for encoding, split in zip(encodings, split_of, strict=True):
            ids = encoding.ids
            if tokenizer.add_bos_token and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
                ids = [tokenizer.bos_token_id, *ids]
            if eos is not None:
                ids = [*ids, eos]
            writers[split].add(ids)
            documents[split] += 1

    try:
        sources = [(path, None) for path in train_files] + [(path, "val") for path in val_files]
        for path, forced in sources:
            log(f"tokenizing {path}")
            texts: list[str] = []
            splits: list[str] = []
            for index, text in enumerate(reader.documents(path)):
                split = forced or ("val" if not val_files and is_held_out(path.name, index, val_percent) else "train")
                texts.append(text)
                splits.append(split)
                if len(texts) == ENCODE_BATCH:
                    encode(texts, splits)
                    texts, splits = [], []
            if texts:
                encode(texts, splits)
        counts = {split: writer.commit() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    manifest = {"inputs": wanted, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
                "documents": documents, "tokens": counts}  # fmt: skip
    write_json(manifest_path, manifest)  # last: it vouches for the token files
    return manifest
