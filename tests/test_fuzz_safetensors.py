"""10,000 mutations of a tiny valid checkpoint through `BitNetForCausalLM.from_pretrained`.

Bit flips, truncations, header field edits, random JSON headers, length-prefix edits and overwritten
data bytes. Each load either fails with a one-line `UserError` naming the checkpoint's file or folder,
or succeeds with a model that holds only finite weights and valid 2-bit codes and runs; when its
weights are of plausible size (as any trained model's are), its logits are finite too.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_safetensors import read_safetensors

from bitnet158 import BitNetConfig, BitNetForCausalLM, PackedBitLinear, freeze_
from bitnet158.errors import UserError

# One layer, bf16 embeddings and norms like Microsoft's checkpoint: about 12 KB, a few ms per load.
CONFIG = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "torch_dtype": "bfloat16",
}
DTYPES = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
    "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64", "XX",
]
PLAUSIBLE = 1e3  # larger than any trained weight or scale; beyond it finite weights may overflow the logits
SIZES = st.one_of(st.integers(0, 300), st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63, 2**64 - 1, -1]))
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class Checkpoint:
    """A folder whose model.safetensors each example overwrites, and the valid file's parts."""

    def __init__(self, folder: Path) -> None:
        torch.manual_seed(0)
        model = freeze_(BitNetForCausalLM(BitNetConfig(**CONFIG)))
        model.init_weights(std=0.5)  # the packed layers are quantized from these random weights
        model.save_pretrained(folder)
        self.folder, self.file = folder, folder / "model.safetensors"
        self.original = self.file.read_bytes()
        self.header, self.body = read_safetensors(self.file)
        self.names = sorted(name for name in self.header if name != "__metadata__")
        self.header_end = len(self.original) - len(self.body)

    def load_and_check(self, content: bytes) -> None:
        self.file.write_bytes(content)
        try:
            model = BitNetForCausalLM.from_pretrained(self.folder)
        except UserError as err:
            message = str(err)
            assert "\n" not in message and message.startswith(str(self.folder)), message
            return
        check_loaded(model)


def check_loaded(model: BitNetForCausalLM) -> None:
    largest = 0.0
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
            largest = max(largest, tensor.abs().max().item())
    for name, layer in model.named_modules():
        if isinstance(layer, PackedBitLinear):
            assert not ((layer.weight >> 1) & layer.weight & 0b01010101).any(), name
    with torch.no_grad():
        logits = model(torch.arange(6)[None] % CONFIG["vocab_size"])
    assert logits.shape == (1, 6, CONFIG["vocab_size"])
    assert largest > PLAUSIBLE or torch.isfinite(logits).all()


@pytest.fixture(scope="module")
def checkpoint(one_torch_thread) -> Iterator[Checkpoint]:
    # In memory where there is a tmpfs: rewriting a file on disk 10,000 times costs more than the loads.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as folder:
        yield Checkpoint(Path(folder))


def with_header(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def test_the_valid_checkpoint_loads(checkpoint):
    checkpoint.load_and_check(checkpoint.original)
    model = BitNetForCausalLM.from_pretrained(checkpoint.folder)
    assert model.dtype == torch.bfloat16


@settings(FUZZ, max_examples=3000)
@given(data=st.data())
def test_bit_flips(checkpoint, data):
    content = bytearray(checkpoint.original)
    anywhere, in_header = st.integers(0, len(content) - 1), st.integers(0, checkpoint.header_end - 1)
    for position in data.draw(st.lists(anywhere | in_header, min_size=1, max_size=6)):
        content[position] ^= 1 << data.draw(st.integers(0, 7))
    checkpoint.load_and_check(bytes(content))


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_truncations(checkpoint, data):
    cut = data.draw(st.integers(0, len(checkpoint.original) - 1))
    checkpoint.load_and_check(checkpoint.original[:cut])


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_overwritten_data_bytes(checkpoint, data):
    """Random bytes over part of one tensor: NaN and infinity in floats, code 3 in packed weights."""
    name = data.draw(st.sampled_from(checkpoint.names))
    begin, end = checkpoint.header[name]["data_offsets"]
    start = data.draw(st.integers(begin, end - 1))
    noise = data.draw(st.binary(min_size=1, max_size=min(16, end - start)))
    offset = checkpoint.header_end + start
    checkpoint.load_and_check(checkpoint.original[:offset] + noise + checkpoint.original[offset + len(noise) :])


@settings(FUZZ, max_examples=2500)
@given(data=st.data())
def test_header_edits(checkpoint, data):
    header = json.loads(json.dumps(checkpoint.header))
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(checkpoint.names))
        edit = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "delete", "rename", "field"]))
        if name not in header:
            continue
        if edit == "dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(DTYPES))
        elif edit == "shape":
            header[name]["shape"] = data.draw(st.lists(SIZES, max_size=3))
        elif edit == "data_offsets":
            header[name]["data_offsets"] = data.draw(st.lists(SIZES, min_size=1, max_size=3))
        elif edit == "delete":
            del header[name]
        elif edit == "rename":
            header[data.draw(st.text(max_size=40))] = header.pop(name)
        else:
            header[name][data.draw(st.text(max_size=12))] = data.draw(JSON)
    checkpoint.load_and_check(with_header(header, checkpoint.body))


@settings(FUZZ, max_examples=1500)
@given(data=st.data())
def test_random_json_headers(checkpoint, data):
    entry = st.fixed_dictionaries(
        {"dtype": st.sampled_from(DTYPES), "shape": st.lists(SIZES, max_size=3),
         "data_offsets": st.lists(SIZES, min_size=2, max_size=2)}
    )
    header = data.draw(
        st.dictionaries(st.sampled_from(checkpoint.names) | st.text(max_size=10), entry | JSON, max_size=6) | JSON
    )
    body = data.draw(st.sampled_from([checkpoint.body, b""]) | st.binary(max_size=300))
    checkpoint.load_and_check(with_header(header, body))


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_length_prefix_edits(checkpoint, data):
    true_length = checkpoint.header_end - 8
    near = st.integers(-16, 16).map(lambda delta: max(0, true_length + delta))
    length = data.draw(near | st.integers(0, 2**64 - 1) | st.sampled_from([2**i for i in range(64)]))
    checkpoint.load_and_check(length.to_bytes(8, "little") + checkpoint.original[8:])

