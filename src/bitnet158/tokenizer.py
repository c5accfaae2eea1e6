"""A Hugging Face tokenizer folder: `tokenizer.json`, read with the `tokenizers` library, and an optional
`tokenizer_config.json` naming the BOS and EOS tokens and holding the chat template.

Chat templates are rendered with jinja2 the way transformers renders them, so the templates that ship
with Hugging Face models work unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bitnet158.errors import UserError
from bitnet158.files import read_json_object, write_atomically, write_json

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# Where transformers >= 4.50 saves the chat template instead of tokenizer_config.json; it wins when present.
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # The environment of transformers' `apply_chat_template`.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


class Tokenizer:
    """Text to token ids and back, plus the model's chat template.

    `config` is the content of `tokenizer_config.json`; the fields read are `bos_token`, `eos_token`
    (strings, or dicts with a "content" key as transformers writes them), `add_bos_token` (default true)
    and `chat_template`. `source` names where it came from, for error messages.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict[str, Any], source: str = "tokenizer") -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self.bos_token = self._special_token("bos_token")
        self.eos_token = self._special_token("eos_token")
        self.bos_token_id = None if self.bos_token is None else tokenizer.token_to_id(self.bos_token)
        self.eos_token_id = None if self.eos_token is None else tokenizer.token_to_id(self.eos_token)
        self.add_bos_token = config.get("add_bos_token", True)
        if not isinstance(self.add_bos_token, bool):
            raise UserError(f"{source}: field 'add_bos_token' must be true or false, got {self.add_bos_token!r}")
        self.chat_template = self._chat_template_source()
        self._template = None
        if self.chat_template is not None:
            try:
                self._template = _compile_template(self.chat_template)
            except jinja2.TemplateSyntaxError as err:
                raise UserError(f"{source}: chat template line {err.lineno}: {err.message}") from None

    def _special_token(self, field: str) -> str | None:
        value = self.config.get(field)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return None
        if not isinstance(value, str):
            raise UserError(f"{self.source}: field '{field}' must be a string, got {value!r}")
        if self.tokenizer.token_to_id(value) is None:
            raise UserError(f"{self.source}: {field} {value!r} is not in the vocabulary")
        return value

    def _chat_template_source(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates, as [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise UserError(f"{self.source}: field 'chat_template' must be a string")
        return template

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> Tokenizer:
        """Read `tokenizer.json`, and `tokenizer_config.json` and `chat_template.jinja` where present."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for any bad file
            raise UserError(f"{path}: not a valid tokenizer file ({err})") from None
        config_path = folder / CONFIG_FILE
        config = read_json_object(config_path) if config_path.is_file() else {}
        template_path = folder / CHAT_TEMPLATE_FILE
        if template_path.is_file():
            config["chat_template"] = template_path.read_text(encoding="utf-8")
        return cls(tokenizer, config, source=str(config_path))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (which holds the chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / TOKENIZER_FILE, self.tokenizer.save)
        write_json(folder / CONFIG_FILE, self.config)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, starting with one BOS when `add_bos` and the tokenizer adds BOS tokens.

        The tokenizer's post-processor is skipped and BOS is added here instead, so that a text that
        already starts with BOS (as a rendered chat template often does) does not get a second one.
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation (dicts with "role" and "content") as prompt text for the model."""
        if self._template is None:
            raise UserError(f"{self.source}: this tokenizer has no chat template")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except (jinja2.TemplateError, TypeError) as err:  # raised by the template about the messages given
            raise UserError(f"chat template: {err}") from None
