"""Fuzzing the GGUF loader: 10,000 mutated copies of two small valid files (TQ2_0 and I2_S) must each
load or fail with a `UserError`; any other exception, a hang or a huge allocation fails the test."""

from __future__ import annotations

import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from bitnet158 import BitNetConfig, BitNetForCausalLM
from bitnet158.errors import UserError
from bitnet158.formats.gguf_export import save_gguf
from bitnet158.formats.gguf_import import load_gguf, load_gguf_tokenizer
from bitnet158.tokenizer import Tokenizer

EXAMPLES = 10_000
# Smallest shapes with whole ternary blocks: rows of 256 for TQ2_0, tensors of 128 values for I2_S.
SHAPES = {
    "tq2_0": {"hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2},
    "i2_s": {"hidden_size": 128, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*alphabet[:29], alphabet[0] + alphabet[1]])}
    tok = HFTokenizer(models.BPE(vocab, [(alphabet[0], alphabet[1])]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return Tokenizer(tok, {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("fuzz")
    files = []
    for ternary_type, shape in SHAPES.items():
        torch.manual_seed(0)
        config = BitNetConfig(vocab_size=32, num_hidden_layers=1, tie_word_embeddings=True, **shape)
        model = BitNetForCausalLM(config)
        model.init_weights()
        save_gguf(model, _tokenizer(), folder / f"{ternary_type}.gguf", ternary_type)
        files.append((folder / f"{ternary_type}.gguf").read_bytes())
    return files


def _mutate(data: st.DataObject, original: bytes) -> bytes:
    raw = bytearray(original)
    # Most edits go to the header (metadata and tensor infos), where a parser is most easily confused.
    header = original.index(b"token_embd.weight") + 200
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["byte", "word", "truncate", "insert"]), label="kind")
        end = header if data.draw(st.integers(0, 9)) else len(raw)
        at = data.draw(st.integers(0, max(min(end, len(raw)) - 1, 0)), label="at")
        if kind == "byte":
            raw[at : at + 1] = data.draw(st.binary(min_size=1, max_size=1))
        elif kind == "word":  # a length, count, dimension or offset replaced by an extreme value
            value = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, 10**9]))
            raw[at : at + 8] = value.to_bytes(8, "little")
        elif kind == "truncate":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


def _address_space() -> int:
    """This process's virtual memory size in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to bound memory")
def test_mutated_files_load_or_raise_user_errors(originals: list[bytes], tmp_path: Path):
    # Opening files on a disk-backed /tmp costs about a millisecond each; RAM is faster where it exists.
    folder = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else tmp_path
    path = folder / "mutated.gguf"
    # A huge allocation fails with MemoryError (and so the test) instead of swapping the machine.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + 2 * 2**30, hard))
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=2000, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        original = originals[data.draw(st.integers(0, len(originals) - 1), label="file")]
        path.write_bytes(_mutate(data, original))
        try:
            load_gguf(path)
            load_gguf_tokenizer(path)
            outcomes["loaded"] += 1
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            outcomes["refused"] += 1

    try:
        check()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        shutil.rmtree(folder, ignore_errors=True)
    assert outcomes["loaded"] + outcomes["refused"] >= EXAMPLES
    assert outcomes["refused"] > EXAMPLES // 2 and outcomes["loaded"] > 0, outcomes
