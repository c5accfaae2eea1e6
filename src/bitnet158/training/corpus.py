"""The training corpus: the Python standard library's own source files.

The stdlib is on every machine that has Python, needs no download, and is under the PSF licence.
Its `test/` directories are kept: they hold about 60% of its Python, in the same style as the rest,
and without them the corpus (about 4M tokens) is too small for a model of tens of millions of parameters.

`build_corpus` writes a data folder that `bitnet158 train` reads:
- `tokenizer.json`: a byte-level BPE tokenizer trained on the training files only;
- `tokenizer_config.json`: its special tokens and a chat template in Microsoft's BitNet format;
- `train.bin`, `val.bin`: uint16 tokens, each file as `<|begin_of_text|> ... <|end_of_text|>`;
- `corpus.json`: where the files came from, which ones were held out, and the token counts.
Validation files are chosen by a hash of their relative path, so the split does not depend on
which other files exist or on the order they are read in.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bitnet158.errors import UserError
from bitnet158.files import write_atomically, write_json

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"

# One `Role: text<|eot_id|>` per message after a single <|begin_of_text|>, as in microsoft/bitnet-b1.58-2B-4T.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: "
    "{% elif message['role'] == 'user' %}User: "
    "{% else %}Assistant: {% endif %}"
    "{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _compiles(text: str, name: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences and the like are still Python
        try:
            compile(text, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError):
            return False
    return True


def read_sources(root: Path) -> dict[str, str]:
    """Every `.py` file under `root` that is UTF-8 Python source this interpreter compiles, keyed by its
    relative path and sorted. Third-party `site-packages` is left out; so are the test suites' deliberately
    broken files (bad syntax, Python 2, other encodings), which would teach the model nothing useful."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.split("/")[0] == "site-packages":
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if _compiles(text, relative):
            sources[relative] = text
    return sources


def is_validation(relative_path: str, val_percent: float) -> bool:
    """Whether a file is held out: a fixed hash of its path, so the split is the same on every machine."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < round(val_percent * 100)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any text encodes; no unknown tokens) whose `encode` prepends <|begin_of_text|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "additional_special_tokens": [EOT],
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """All documents' tokens end to end as uint16, each as <|begin_of_text|> text <|end_of_text|>."""
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    pieces = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.array([bos, *encoding.ids, eos], dtype=np.uint16))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def build_corpus(out_dir: Path, root: Path | None = None, vocab_size: int = 8192, val_percent: float = 3.0) -> dict:
    """Build the data folder described in this module's docstring and return its `corpus.json`."""
    root = stdlib_root() if root is None else Path(root)
    if not 256 + 3 <= vocab_size <= 2**16:
        raise UserError(f"vocab size {vocab_size} must be between 259 (bytes and special tokens) and 65536 (uint16)")
    sources = read_sources(root)
    val_names = [name for name in sources if is_validation(name, val_percent)]
    train_names = [name for name in sources if not is_validation(name, val_percent)]
    if not val_names or not train_names:
        raise UserError(f"{root}: {len(sources)} Python files give no train/validation split at {val_percent}%")

    tokenizer = train_tokenizer([sources[name] for name in train_names], vocab_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "tokenizer.json", tokenizer.save)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    counts = {}
    for split, names in (("train", train_names), ("val", val_names)):
        tokens = encode_documents(tokenizer, [sources[name] for name in names])
        write_atomically(out_dir / f"{split}.bin", tokens.tofile)
        counts[split] = {"files": len(names), "tokens": len(tokens), "characters": sum(len(sources[n]) for n in names)}
    manifest = {
        "source": str(root),
        "python": sys.version.split()[0],
        "licence": "Python Software Foundation License (the Python standard library's own source)",
        "vocab_size": tokenizer.get_vocab_size(),
        "val_percent": val_percent,
        **counts,
        "val_files": val_names,
    }
    write_json(out_dir / "corpus.json", manifest)
    return manifest
