from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import BOS, EOS, EOT, write_tokenizer_folder

from bitnet158.errors import UserError
from bitnet158.tokenizer import Tokenizer

TEXTS = ["The quick brown fox.", "Le café est très bon 🙂 日本語", "def f(n):\n    return n  # spaces", ""]
MESSAGES = [
    {"role": "user", "content": " Hi there "},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Café?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


def test_special_tokens_and_vocab_size(tokenizer: Tokenizer):
    assert tokenizer.bos_token == BOS and tokenizer.eos_token == EOT  # bos_token is an AddedToken dict
    assert tokenizer.decode([tokenizer.bos_token_id], skip_special_tokens=False) == BOS
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) == EOT
    assert tokenizer.vocab_size == 400
    assert tokenizer.vocab_size == len(tokenizer.tokenizer.get_vocab(with_added_tokens=True))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str):
    ids = tokenizer.encode(text, add_bos=False)
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos == [tokenizer.bos_token_id, *ids]
    assert tokenizer.decode(with_bos) == text
    assert tokenizer.decode(with_bos, skip_special_tokens=False) == BOS + text


def test_text_starting_with_bos_gets_no_second_bos(tokenizer: Tokenizer):
    # The tokenizer.json post-processor adds BOS too; neither it nor encode() may add another.
    ids = tokenizer.encode(BOS + "Hello")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids == tokenizer.encode("Hello")


def test_add_bos_token_false_in_config(tmp_path: Path):
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path, add_bos_token=False))
    assert tokenizer.encode("Hello") == tokenizer.encode("Hello", add_bos=False)
    assert tokenizer.bos_token_id not in tokenizer.encode("Hello")


def test_without_tokenizer_config(tmp_path: Path):
    write_tokenizer_folder(tmp_path).joinpath("tokenizer_config.json").unlink()
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    assert tokenizer.decode(tokenizer.encode("Hello")) == "Hello"
    with pytest.raises(UserError, match="tokenizer_config.json: this tokenizer has no chat template"):
        tokenizer.apply_chat_template(MESSAGES)


def test_chat_template(tokenizer: Tokenizer):
    prompt = tokenizer.apply_chat_template(MESSAGES[:1])
    assert prompt == f"{BOS}User: Hi there{EOT}Assistant: "
    full = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert full == f"{BOS}User: Hi there{EOT}Assistant: Hello!{EOT}User: Café?{EOT}"
    # The rendered BOS is the only one.
    assert tokenizer.encode(prompt) == [tokenizer.bos_token_id, *tokenizer.encode(prompt[len(BOS) :], add_bos=False)]


def test_chat_template_matches_transformers(folder: Path, tokenizer: Tokenizer):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for add_generation_prompt in (True, False):
        expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt) == expected
    for text in TEXTS:
        assert tokenizer.encode(text) == reference(text)["input_ids"]


def test_chat_template_jinja_file_wins(tmp_path: Path):
    write_tokenizer_folder(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template(MESSAGES[1:2]) == "<assistant>Hello!"


def test_template_raise_exception_is_a_user_error(tmp_path: Path):
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path, chat_template=template))
    with pytest.raises(UserError, match="chat template: first message must be system"):
        tokenizer.apply_chat_template(MESSAGES)


def test_save_pretrained_round_trip(tokenizer: Tokenizer, tmp_path: Path):
    tokenizer.save_pretrained(tmp_path / "copy")
    copy = Tokenizer.from_pretrained(tmp_path / "copy")
    assert (copy.bos_token_id, copy.eos_token_id, copy.vocab_size) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size
    )
    for text in TEXTS:
        assert copy.encode(text) == tokenizer.encode(text)
    assert copy.apply_chat_template(MESSAGES) == tokenizer.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path: Path):
    with pytest.raises(UserError, match=f"{tmp_path / 'tokenizer.json'}: no such file"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', "tokenizer.json: not a valid tokenizer file"),
        ("tokenizer.json", '{"hello": 1}', "tokenizer.json: not a valid tokenizer file"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json: not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object"),
        ("tokenizer_config.json", json.dumps({"eos_token": "<nope>"}), "eos_token '<nope>' is not in the vocabulary"),
        ("tokenizer_config.json", json.dumps({"bos_token": 3}), "field 'bos_token' must be a string"),
        ("tokenizer_config.json", json.dumps({"add_bos_token": "yes"}), "field 'add_bos_token' must be true or false"),
        ("tokenizer_config.json", json.dumps({"chat_template": "{% for %}"}), "tokenizer_config.json: chat template"),
    ],
)
def test_corrupt_files_are_user_errors(tmp_path: Path, file: str, content: str, message: str):
    write_tokenizer_folder(tmp_path)
    (tmp_path / file).write_text(content)
    with pytest.raises(UserError, match=message) as error:
        Tokenizer.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_eos_token_as_dict(tmp_path: Path):
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path, eos_token={"content": EOS}))
    assert tokenizer.eos_token == EOS
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) == EOS
