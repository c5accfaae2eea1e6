"""Broken and hostile safetensors files: each gives one `UserError` line naming the file and, where the
header allows, the tensor; none crashes, hangs or allocates what a header claims. Also: tensors stay
views of the memory-mapped file on the CPU, in the config's dtype by default.

safetensors itself rejects a short or overlong length prefix, a header that is not UTF-8 JSON of the
right form, unknown dtypes, shapes whose size overflows, and offsets that overlap, leave gaps, run past
the file or disagree with dtype x shape. The loader adds the tensor's name where safetensors gives none,
and checks what safetensors cannot know: expected dtypes and shapes (from the header, before reading
data), NaN and infinity, 2-bit code 3 in packed bytes, scales, and missing tensors.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitnet158 import BitNetForCausalLM, freeze_
from bitnet158.errors import UserError

Q_PROJ = "model.layers.0.self_attn.q_proj"
MiB = 2**20


def read_safetensors(file: Path) -> tuple[dict, bytes]:
    """The JSON header and the data bytes of a safetensors file (an 8-byte little-endian length first)."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_safetensors(file: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def edit_header(file: Path, edit) -> None:
    header, body = read_safetensors(file)
    edit(header)
    write_safetensors(file, header, body)


def edit_tensors(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, {"format": "pt"})


def load_error(folder: Path) -> str:
    with pytest.raises(UserError) as err:
        BitNetForCausalLM.from_pretrained(folder)
    message = str(err.value)
    assert "\n" not in message
    return message


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.fixture
def saved(make_model, tmp_path):
    """A frozen tiny model (untied, so lm_head.weight is stored) and its model.safetensors."""
    model = freeze_(make_model(tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    return model, tmp_path / "model.safetensors"


# --- what safetensors rejects: the file, and the tensor where the header names one ---


def first_tensor_cut(header: dict, data_bytes: int) -> str:
    ends = sorted((info["data_offsets"][1], name) for name, info in header.items() if name != "__metadata__")
    return next(name for end, name in ends if end > data_bytes)


def test_truncated_inside_the_data_names_the_tensor(saved):
    _, file = saved
    original = file.read_bytes()
    header, body = read_safetensors(file)
    start = len(original) - len(body)
    for cut in range(start, len(original), len(body) // 40):  # 40 cuts spread over the data, first at its start
        file.write_bytes(original[:cut])
        name = first_tensor_cut(header, cut - start)
        assert load_error(file.parent) == (
            f"{file}: not a valid safetensors file (Error while deserializing header: incomplete metadata, file not "
            f"fully covered): tensor '{name}' ends at byte {header[name]['data_offsets'][1]} of the data, which has "
            f"{cut - start} (the file is truncated)"
        )


@pytest.mark.parametrize(
    "cut, detail",
    [
        (0, "header too small"),
        (5, "header too small"),
        (8, "invalid header length"),
        (100, "invalid header length"),
    ],
    ids=["empty", "in-length", "after-length", "in-header"],
)
def test_truncated_before_the_data(saved, cut, detail):
    _, file = saved
    file.write_bytes(file.read_bytes()[:cut])
    assert load_error(file.parent) == (
        f"{file}: not a valid safetensors file (Error while deserializing header: {detail})"
    )


@pytest.mark.parametrize("length", [0, 7, 2**31, 2**40, 2**63, 2**64 - 1])
def test_absurd_length_prefix_allocates_nothing(saved, length):
    _, file = saved
    data = file.read_bytes()
    file.write_bytes(length.to_bytes(8, "little") + data[8:])
    before = max_rss_mib()
    assert load_error(file.parent).startswith(f"{file}: not a valid safetensors file (Error while deserializing")
    assert max_rss_mib() - before < 50


@pytest.mark.parametrize(
    "content, detail",
    [
        (b"GGUF\x03\x00\x00\x00" + bytes(64), "header too large"),
        (b"PK\x03\x04" + bytes(60), "invalid header length"),
        (b"\x10" + bytes(7) + b"\xff" * 16, "invalid UTF-8 in header"),
        (b"\x08" + bytes(7) + b"[1, 2]  ", "invalid JSON in header"),
        (b"\x08" + bytes(7) + b"not json", "invalid JSON in header"),
        (b"\x10" + bytes(7) + b'{"a": {"dtype": "XX\\n"}}', "invalid JSON in header"),
    ],
    ids=["gguf-magic", "zip-magic", "not-utf8", "json-array", "not-json", "newline-in-error"],
)
def test_not_safetensors(saved, content, detail):
    _, file = saved
    file.write_bytes(content)
    message = load_error(file.parent)
    assert message.startswith(f"{file}: not a valid safetensors file (Error while deserializing header: {detail}")


def test_offsets_overlapping(saved):
    _, file = saved
    header, _ = read_safetensors(file)
    tensors = [name for name in header if name != "__metadata__"]
    first, second = sorted(tensors, key=lambda name: header[name]["data_offsets"])[:2]
    edit_header(file, lambda h: h[second].update(data_offsets=h[first]["data_offsets"]))
    prefix = f"{file}: not a valid safetensors file (Error while deserializing header: invalid offset for tensor"
    assert load_error(file.parent) in (f"{prefix} `{first}`)", f"{prefix} `{second}`)")


@pytest.mark.parametrize(
    "field, value, detail",
    [
        ("shape", [16, 65], "is U8 [16, 65]"),
        ("shape", [2**20, 2**20], "is U8 [1048576, 1048576]"),
        ("shape", [2**62, 2**20], "is U8 [4611686018427387904, 1048576]"),  # the size overflows 64 bits
        ("dtype", "F32", "is F32 [16, 64]"),
        ("data_offsets", "grow", "is U8 [16, 64] but its data_offsets"),
    ],
)
def test_offsets_inconsistent_with_dtype_and_shape(saved, field, value, detail):
    _, file = saved
    name = f"{Q_PROJ}.weight"

    def edit(header):
        if value == "grow":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin, end + 4]
        else:
            header[name][field] = value

    edit_header(file, edit)
    before = max_rss_mib()
    message = load_error(file.parent)
    assert message.startswith(f"{file}: not a valid safetensors file (Error while deserializing header: ")
    assert f": tensor '{name}' {detail}" in message
    assert max_rss_mib() - before < 50


def test_hostile_tensor_name_stays_on_one_line(saved):
    _, file = saved

    def add_misfit(header):
        header["evil\nname"] = header.pop(f"{Q_PROJ}.weight")
        header["evil\nname"]["shape"] = [1, 2, 3]

    edit_header(file, add_misfit)
    assert ": tensor 'evil name' is U8 [1, 2, 3]" in load_error(file.parent)


def test_truncated_shard_is_named(make_model, tmp_path):
    freeze_(make_model()).save_pretrained(tmp_path, max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert load_error(tmp_path).startswith(f"{shard}: not a valid safetensors file (")


# --- what the loader checks: expected dtypes and shapes from the header, then the values ---


@pytest.mark.parametrize(
    "name, dtype, shape, detail",
    [
        ("model.norm.weight", "I32", [64], "has dtype torch.int32, expected a float type (F16, BF16, F32 or F64)"),
        ("model.norm.weight", "F8_E4M3", [256], "has dtype F8_E4M3, expected a float type"),
        ("model.embed_tokens.weight", "I64", [211, 32], "has dtype torch.int64, expected a float type"),
        ("model.embed_tokens.weight", "F32", [64, 211], "has shape (64, 211), expected (211, 64)"),
        (f"{Q_PROJ}.weight", "I8", [16, 64], "has unsupported dtype torch.int8, expected torch.uint8 (packed) or"),
        (f"{Q_PROJ}.weight", "I64", [16, 8], "has unsupported dtype torch.int64"),
        (f"{Q_PROJ}.weight", "U8", [64, 16], "has shape (64, 16), expected packed (16, 64)"),
        (f"{Q_PROJ}.weight_scale", "I32", [1], "has dtype torch.int32, expected a float type"),
        (f"{Q_PROJ}.weight_scale", "U8", [4], "has dtype torch.uint8, expected a float type"),
        (f"{Q_PROJ}.weight_scale", "F16", [2], "must be one positive finite number, got shape (2,)"),
    ],
)
def test_wrong_dtype_or_shape_in_header(saved, name, dtype, shape, detail):
    """Header edits that keep the byte count, so safetensors accepts the file and only our check stops it."""
    _, file = saved
    edit_header(file, lambda h: h[name].update(dtype=dtype, shape=shape))
    assert load_error(file.parent).startswith(f"{file}: tensor '{name}' {detail}")


def test_absurd_empty_shape_is_refused_from_the_header(saved):
    """A zero-sized tensor of absurd shape passes safetensors (it needs no bytes); our shape check stops it."""
    _, file = saved
    name = "model.norm.weight"

    def make_empty(header):
        begin, end = header[name]["data_offsets"]
        for info in header.values():  # close the gap the emptied tensor leaves
            if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
                info["data_offsets"] = [offset - (end - begin) for offset in info["data_offsets"]]
        header[name].update(shape=[0, 2**62], data_offsets=[begin, begin])
        return begin, end

    header, body = read_safetensors(file)
    begin, end = make_empty(header)
    write_safetensors(file, header, body[:begin] + body[end:])
    assert load_error(file.parent) == f"{file}: tensor '{name}' has shape (0, {2**62}), expected (64,)"


def test_float_weight_in_the_packed_shape(saved):
    _, file = saved
    name = f"{Q_PROJ}.weight"
    edit_tensors(file, lambda t: t.update({name: t[name].float()}))
    assert load_error(file.parent) == (
        f"{file}: tensor '{name}' has the packed shape (16, 64) but dtype torch.float32; packed weights are torch.uint8"
    )


@pytest.mark.parametrize("field", [0, 1, 2, 3])
@pytest.mark.parametrize("layer_name", [Q_PROJ, "model.layers.1.mlp.down_proj"])
def test_packed_code_3_is_refused(saved, field, layer_name):
    """Code 3 in any of a byte's four 2-bit fields would unpack to +2."""
    _, file = saved
    name = f"{layer_name}.weight"

    def poke(tensors):
        tensors[name][-1, -1] = (tensors[name][-1, -1] & ~(3 << 2 * field)) | (3 << 2 * field)

    edit_tensors(file, poke)
    assert load_error(file.parent) == (
        f"{file}: tensor '{name}' holds the 2-bit code 3, which is not a ternary value"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "name",
    ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"],
)
def test_non_finite_float_weights_are_refused(saved, name, value):
    _, file = saved

    def poke(tensors):
        tensors[name].view(-1)[-1] = value

    edit_tensors(file, poke)
    assert load_error(file.parent) == f"{file}: tensor '{name}' holds NaN or infinite values"


def test_nan_in_bfloat16_embedding_is_refused(make_model, tmp_path):
    freeze_(make_model(torch_dtype="bfloat16", tie_word_embeddings=True)).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    edit_tensors(file, lambda t: t["model.embed_tokens.weight"].view(-1).__setitem__(1234, float("nan")))
    assert load_error(tmp_path) == f"{file}: tensor 'model.embed_tokens.weight' holds NaN or infinite values"


@pytest.mark.parametrize(
    "name", ["model.norm.weight", "lm_head.weight", "model.layers.0.post_attention_layernorm.weight"]
)
def test_missing_tensor(saved, name):
    _, file = saved
    edit_tensors(file, lambda t: t.pop(name))
    assert load_error(file.parent) == f"{file.parent}: checkpoint has no tensor '{name}'"


@pytest.mark.parametrize("shape", [(), (1, 1)])
def test_weight_scale_of_one_element_in_any_shape_loads(saved, shape):
    model, file = saved
    name = f"{Q_PROJ}.weight_scale"
    edit_tensors(file, lambda t: t.update({name: t[name].reshape(shape)}))
    loaded = BitNetForCausalLM.from_pretrained(file.parent, dtype=torch.float32)
    assert torch.equal(loaded.get_buffer(name), model.get_buffer(name))


def test_unknown_tensors_are_ignored(saved):
    model, file = saved
    extra = {"vision_tower.patch.weight": torch.arange(6), "model.layers.9.mlp.up_proj.weight": torch.ones(3)}
    edit_tensors(file, lambda t: t.update(extra))
    loaded = BitNetForCausalLM.from_pretrained(file.parent, dtype=torch.float32)
    ids = torch.randint(0, 211, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# --- memory: views of the mapped file, in the config's dtype ---


def test_cpu_load_keeps_the_config_dtype_and_views_the_file(make_model, tmp_path):
    """On the CPU, tensors already in the target dtype are not copied: each one's address is the file's
    mapping plus its offset in the file, and by default the target dtype is the config's (bf16 here)."""
    model = freeze_(make_model(torch_dtype="bfloat16", tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    header, body = read_safetensors(tmp_path / "model.safetensors")
    data_start = (tmp_path / "model.safetensors").stat().st_size - len(body)

    loaded = BitNetForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    state = loaded.state_dict()
    viewed = [name for name, info in header.items() if name != "__metadata__" and info["dtype"] in ("U8", "BF16")]
    assert len(viewed) == 2 * 7 + 2 * 4 + 2  # packed linears, norms, embeddings and the final norm
    mapping = {state[name].data_ptr() - data_start - header[name]["data_offsets"][0] for name in viewed}
    assert len(mapping) == 1

    as_float32 = BitNetForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_float32.dtype == torch.float32
    assert torch.equal(as_float32.model.embed_tokens.weight, loaded.model.embed_tokens.weight.float())
