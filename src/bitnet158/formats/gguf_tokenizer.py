"""Byte-level BPE tokenizers as GGUF metadata (llama.cpp's `gpt2` tokenizer model) and back.

Two pre-tokenizers have a llama.cpp name: GPT-2's byte-level regex ("gpt-2", our embedded model) and
Llama 3's split pattern followed by byte-level mapping ("llama-bpe", Microsoft's 2B4T). The whole
`tokenizer.json` also goes into `tokenizer.huggingface.json`, so that reading a file we wrote gives back
exactly the same tokenizer; files from elsewhere are rebuilt from tokens, merges and that name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFWriter, Keys, TokenType

from bitnet158.errors import UserError
from bitnet158.tokenizer import Tokenizer

PAD_TOKEN = "<|gguf_pad_{}|>"
# Llama 3's pre-tokenizer split, as its tokenizer.json spells it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's names of the pre-tokenizers we read (a file without one gets llama.cpp's default, GPT-2's).
GPT2_NAMES = {None, "default", "gpt-2"}
LLAMA3_NAMES = {"llama-bpe", "llama3", "llama-v3"}


def write_tokenizer(writer: GGUFWriter, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
    """Add the tokenizer fields llama.cpp reads; the vocabulary is padded to the model's `vocab_size`."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{tokenizer.source}: tokenizer model {model.get('type')!r} cannot be written to GGUF "
                        "(only byte-level BPE)")
    pre_name = _pre_tokenizer_name(spec.get("pre_tokenizer") or {}, tokenizer.source)
    by_id = {i: token for token, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) > vocab_size:
        raise UserError(f"{tokenizer.source}: token ids are not 0..{vocab_size - 1} without gaps")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["content"] for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, PAD_TOKEN.format(i))
        tokens.append(token)
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif token in special:
            types.append(TokenType.CONTROL)
        else:
            types.append(TokenType.USER_DEFINED if token in added else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (eos_token_ids or [None])[0]
    if eos is not None:
        writer.add_eos_token_id(eos)
    others = [i for i in eos_token_ids if i != eos]
    if others:  # e.g. <|eot_id|>, which ends a chat turn
        writer.add_eot_token_id(others[0])
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)
    writer.add_string(Keys.Tokenizer.HF_JSON, tokenizer.tokenizer.to_str())


def read_tokenizer(fields: dict[str, Any], path: Path) -> Tokenizer:
    """A `Tokenizer` from GGUF metadata (`fields`: key -> value, as `gguf_file.metadata` returns)."""
    def token(key: str) -> str | None:
        i = fields.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    tokens = fields.get(Keys.Tokenizer.LIST)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: field '{Keys.Tokenizer.LIST}' is missing or not a list of strings")
    try:
        if isinstance(fields.get(Keys.Tokenizer.HF_JSON), str):
            tok = tokenizers.Tokenizer.from_str(fields[Keys.Tokenizer.HF_JSON])
        else:
            tok = _tokenizer_from_merges(fields, tokens, path)
    except Exception as err:  # tokenizers raises plain Exceptions for malformed JSON or vocabularies
        raise UserError(f"{path}: the tokenizer in the GGUF metadata is not valid ({err})") from None
    config: dict[str, Any] = {"bos_token": token(Keys.Tokenizer.BOS_ID), "eos_token": token(Keys.Tokenizer.EOS_ID),
                              "add_bos_token": bool(fields.get(Keys.Tokenizer.ADD_BOS, True))}
    if isinstance(fields.get(Keys.Tokenizer.CHAT_TEMPLATE), str):
        config["chat_template"] = fields[Keys.Tokenizer.CHAT_TEMPLATE]
    return Tokenizer(tok, config, source=str(path))


def _pre_tokenizer_name(pre: dict[str, Any], source: str) -> str:
    """llama.cpp's name for a `tokenizer.json` pre-tokenizer: "gpt-2" or "llama-bpe"."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": LLAMA3_SPLIT}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise UserError(f"{source}: pre-tokenizer {json.dumps(pre)[:200]} cannot be written to GGUF (only GPT-2's "
                    "byte-level regex and Llama 3's split have a llama.cpp name)")


def _tokenizer_from_merges(fields: dict[str, Any], tokens: list[str], path: Path) -> tokenizers.Tokenizer:
    if fields.get(Keys.Tokenizer.MODEL) != "gpt2":
        raise UserError(f"{path}: tokenizer model {fields.get(Keys.Tokenizer.MODEL)!r} is not supported (only gpt2)")
    pre_name = fields.get(Keys.Tokenizer.PRE)
    if pre_name not in GPT2_NAMES | LLAMA3_NAMES:
        raise UserError(f"{path}: pre-tokenizer {pre_name!r} is not supported (only gpt-2 and llama-bpe)")
    merges = fields.get(Keys.Tokenizer.MERGES) or []
    vocab = {t: i for i, t in enumerate(tokens)}
    # tokenizers panics (an exception that is not an Exception) on merges outside the vocabulary.
    for merge in merges:
        if not isinstance(merge, str) or merge.count(" ") != 1 or any(
                part not in vocab for part in (*merge.split(" "), merge.replace(" ", ""))):
            raise UserError(f"{path}: field '{Keys.Tokenizer.MERGES}' holds {merge!r}, not two tokens whose "
                            "concatenation is a token")
    types = fields.get(Keys.Tokenizer.TOKEN_TYPE) or []
    llama3 = pre_name in LLAMA3_NAMES
    # llama.cpp, like Llama 3's tokenizer.json, takes a whole pre-token that is in the vocabulary as is.
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab, [tuple(m.split(" ")) for m in merges], ignore_merges=llama3))
    pre = tokenizers.pre_tokenizers
    tok.pre_tokenizer = pre.Sequence([
        pre.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre.ByteLevel(add_prefix_space=False, use_regex=False),
    ]) if llama3 else pre.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, types, strict=False) if kind == TokenType.CONTROL]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])
    return tok
