"""GGUF export and import: exact round trips for TQ2_0, TQ1_0 and I2_S, the bytes checked against
gguf's own decoders and bitnet.cpp's I2_S layout, the metadata llama.cpp reads, and broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys
from gguf import quants as gguf_quants
from tiny_tokenizer import write_tokenizer_folder
from tokenizers import pre_tokenizers

from bitnet158 import BitNetForCausalLM
from bitnet158.errors import UserError
from bitnet158.formats.gguf_export import save_gguf
from bitnet158.formats.gguf_file import metadata, open_gguf
from bitnet158.formats.gguf_import import load_gguf_tokenizer
from bitnet158.formats.gguf_tokenizer import read_tokenizer
from bitnet158.formats.ternary_blocks import decode_rows
from bitnet158.nn import freeze_
from bitnet158.nn.bitlinear import PackedBitLinear
from bitnet158.packing import unpack_2bit
from bitnet158.tokenizer import Tokenizer

TYPES = ["tq2_0", "tq1_0", "i2_s"]
# Rows of 256 (whole TQ blocks) except down_proj's 384, which TQ files store as F16 codes.
SHAPE = {"vocab_size": 400, "hidden_size": 256, "intermediate_size": 384, "num_attention_heads": 4,
         "num_key_value_heads": 2, "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": [1, 2]}
TEXTS = ["The quick brown fox", "def f(x):\n    return x", "日本語 🙂 3.14159", "<|eot_id|>User: hi"]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path / "tokenizer"))


@pytest.fixture
def packed(make_model) -> BitNetForCausalLM:
    """A packed tiny model whose embedding is exactly representable in F16."""
    model = make_model(**SHAPE)
    model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half().float()
    return freeze_(model)


def _packed_layers(model: BitNetForCausalLM) -> dict[str, PackedBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedBitLinear)}


@pytest.mark.parametrize("ternary_type", TYPES)
def test_round_trip_is_exact(packed, tokenizer, tmp_path: Path, ternary_type: str):
    path = tmp_path / "model.gguf"
    save_gguf(packed, tokenizer, path, ternary_type)
    loaded = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert loaded.config.hidden_act == packed.config.hidden_act
    expected, actual = packed.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    assert torch.equal(loaded(ids), packed(ids))


def test_training_model_exports_its_quantized_weights(make_model, tokenizer, tmp_path: Path):
    model = make_model(**SHAPE)
    save_gguf(model, tokenizer, tmp_path / "model.gguf", "tq2_0")
    loaded = BitNetForCausalLM.from_pretrained(tmp_path / "model.gguf", dtype=torch.float32)
    frozen = freeze_(model)
    for name, layer in _packed_layers(frozen).items():
        assert torch.equal(_packed_layers(loaded)[name].weight, layer.weight), name
        assert torch.equal(_packed_layers(loaded)[name].weight_scale, layer.weight_scale), name


@pytest.mark.parametrize(("embed_type", "steps"), [("q8_0", 127), ("q6_k", 31)])
def test_quantized_embeddings_are_close(packed, tokenizer, tmp_path: Path, embed_type: str, steps: int):
    save_gguf(packed, tokenizer, tmp_path / "model.gguf", "tq2_0", embed_type)
    loaded = BitNetForCausalLM.from_pretrained(tmp_path / "model.gguf", dtype=torch.float32)
    expected = packed.model.embed_tokens.weight
    error = (loaded.model.embed_tokens.weight - expected).abs().max()
    # At most half a quantization step of the block's largest value, plus fp16 rounding of the scales.
    assert 0 < error <= expected.abs().max() / steps * 0.6
    for name, layer in _packed_layers(packed).items():
        assert torch.equal(_packed_layers(loaded)[name].weight, layer.weight), name


def test_file_is_what_llama_cpp_reads(packed, tokenizer, tmp_path: Path):
    save_gguf(packed, tokenizer, tmp_path / "model.gguf", "tq2_0")
    reader = GGUFReader(tmp_path / "model.gguf")
    tensors = {t.name: t for t in reader.tensors}
    T = GGMLQuantizationType
    assert tensors["token_embd.weight"].tensor_type == T.F16
    assert tensors["token_embd.weight"].shape.tolist() == [256, 400]  # ggml order: row length first
    assert tensors["output_norm.weight"].tensor_type == T.F32
    assert "output.weight" not in tensors
    for i in range(2):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            assert tensors[f"blk.{i}.{name}.weight"].tensor_type == T.TQ2_0
            assert tensors[f"blk.{i}.{name}.scale"].tensor_type == T.F32
        assert tensors[f"blk.{i}.ffn_down.weight"].tensor_type == T.F16  # rows of 384: not whole blocks
        assert tensors[f"blk.{i}.attn_sub_norm.weight"].tensor_type == T.F32
        assert tensors[f"blk.{i}.ffn_sub_norm.weight"].shape.tolist() == [384]
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [256, 128]
    assert len(tensors) == 2 + 2 * (4 + 7 * 2)

    # The codes decode with gguf's own TQ2_0 decoder (d = 1) and the scale sits in `.scale`.
    layer = packed.model.layers[1].self_attn.q_proj
    codes = unpack_2bit(layer.weight, layer.out_features).float().numpy()
    decoded = gguf_quants.dequantize(tensors["blk.1.attn_q.weight"].data, T.TQ2_0)
    assert np.array_equal(decoded, codes)
    assert tensors["blk.1.attn_q.scale"].data.tolist() == layer.weight_scale.tolist()

    fields = metadata(reader, "model.gguf")
    config = packed.config
    assert fields["general.architecture"] == "bitnet"
    assert fields["general.file_type"] == 37  # LLAMA_FTYPE_MOSTLY_TQ2_0
    expected = {
        "bitnet.block_count": 2, "bitnet.embedding_length": 256, "bitnet.feed_forward_length": 384,
        "bitnet.attention.head_count": 4, "bitnet.attention.head_count_kv": 2, "bitnet.attention.key_length": 64,
        "bitnet.context_length": config.max_position_embeddings, "bitnet.vocab_size": 400,
        "bitnet.rope.freq_base": config.rope_theta, "bitnet.hidden_activation": "relu2",
        Keys.Tokenizer.MODEL: "gpt2", Keys.Tokenizer.PRE: "gpt-2", Keys.Tokenizer.BOS_ID: 0,
        Keys.Tokenizer.EOS_ID: tokenizer.eos_token_id, Keys.Tokenizer.ADD_BOS: True,
        Keys.Tokenizer.CHAT_TEMPLATE: tokenizer.chat_template,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["bitnet.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields[Keys.Tokenizer.LIST][:3] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    assert fields[Keys.Tokenizer.TOKEN_TYPE][:4] == [3, 3, 3, 1]  # control tokens, then a normal one
    assert len(fields[Keys.Tokenizer.MERGES]) == len(fields[Keys.Tokenizer.LIST]) - 256 - 3


@pytest.mark.parametrize("ternary_type", ["tq1_0", "i2_s"])
def test_ternary_bytes_follow_the_formats(packed, tokenizer, tmp_path: Path, ternary_type: str):
    save_gguf(packed, tokenizer, tmp_path / "model.gguf", ternary_type)
    layer = packed.model.layers[0].mlp.up_proj
    codes = unpack_2bit(layer.weight, layer.out_features).numpy()
    tensor = {t.name: t for t in open_gguf(tmp_path / "model.gguf").tensors}["blk.0.ffn_up.weight"]
    data = np.asarray(tensor.data)
    if ternary_type == "tq1_0":
        assert np.array_equal(gguf_quants.dequantize(data, GGMLQuantizationType.TQ1_0), codes)
        return
    # bitnet.cpp's quantize_i2_s: value j of each 128-block in byte j % 32 at shift 6 - 2 * (j // 32).
    flat = codes.reshape(-1).astype(np.int64) + 1
    expected = np.zeros(flat.size // 4, dtype=np.uint8)
    for j in range(flat.size):
        block, k = divmod(j, 128)
        expected[block * 32 + k % 32] |= flat[j] << (6 - 2 * (k // 32))
    assert data.size == flat.size // 4 + 32
    assert np.array_equal(data[: flat.size // 4], expected)
    assert data[flat.size // 4 :][:4].view("<f4")[0] == layer.weight_scale.item()
    assert not data[flat.size // 4 + 4 :].any()
    with pytest.raises(ValueError):  # gguf's own reader (like upstream llama.cpp) does not know type 36
        GGUFReader(tmp_path / "model.gguf")


def test_tq2_0_codes_are_what_gguf_decodes():
    """TQ2_0 rows read as integers give gguf's own dequantized values divided by each block's d."""
    rng = np.random.default_rng(0)
    rows, cols = 7, 512
    fields = rng.integers(0, 3, size=(rows * cols // 256, 2, 4, 32), dtype=np.uint8)  # value 128 g + 32 i + j
    fields[3] = 1  # a block of zeros
    qs = (fields << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)).sum(axis=2, dtype=np.uint8)
    d = rng.uniform(0.5, 2, size=(len(fields), 1)).astype("<f2")
    blocks = np.concatenate([qs.reshape(len(fields), 64), d.view(np.uint8)], axis=1)
    codes, scales = decode_rows(blocks.reshape(-1), GGMLQuantizationType.TQ2_0, rows, cols)
    expected = gguf_quants.TQ2_0.dequantize_blocks(blocks) / d.astype(np.float32)
    assert np.array_equal(codes.reshape(-1, 256).astype(np.float32), expected)
    assert scales == {float(x) for i, x in enumerate(d.reshape(-1)) if i != 3}


@pytest.mark.parametrize(("llama3", "pre_name"), [(False, "gpt-2"), (True, "llama-bpe")])
def test_tokenizer_round_trip(packed, tmp_path: Path, llama3: bool, pre_name: str):
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path / "tokenizer", llama3=llama3))
    save_gguf(packed, tokenizer, tmp_path / "model.gguf")
    fields = metadata(open_gguf(tmp_path / "model.gguf"), "model.gguf")
    assert fields[Keys.Tokenizer.PRE] == pre_name
    from_json = load_gguf_tokenizer(tmp_path / "model.gguf")
    del fields[Keys.Tokenizer.HF_JSON]  # a file from another converter: rebuilt from tokens and merges
    from_merges = read_tokenizer(fields, tmp_path / "model.gguf")
    for loaded in (from_json, from_merges):
        assert (loaded.bos_token_id, loaded.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert loaded.chat_template == tokenizer.chat_template
        for text in TEXTS:
            assert loaded.encode(text) == tokenizer.encode(text), text
            assert loaded.decode(loaded.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_pre_tokenizer_name_decides_how_a_file_from_elsewhere_splits(packed, tmp_path: Path):
    tokenizer = Tokenizer.from_pretrained(write_tokenizer_folder(tmp_path / "tokenizer", llama3=True))
    save_gguf(packed, tokenizer, tmp_path / "model.gguf")
    fields = metadata(open_gguf(tmp_path / "model.gguf"), "model.gguf")
    del fields[Keys.Tokenizer.HF_JSON]
    text = "a million is 1000000"  # pieces 1 00 000 0 (Llama 3 cuts digits by threes), 1 00 00 00 (GPT-2)
    assert read_tokenizer(fields, tmp_path / "model.gguf").encode(text) == tokenizer.encode(text)
    fields[Keys.Tokenizer.PRE] = "gpt-2"
    assert read_tokenizer(fields, tmp_path / "model.gguf").encode(text) != tokenizer.encode(text)
    fields[Keys.Tokenizer.PRE] = "qwen2"
    with pytest.raises(UserError, match="pre-tokenizer 'qwen2' is not supported"):
        read_tokenizer(fields, tmp_path / "model.gguf")


def test_pre_tokenizers_without_a_llama_cpp_name_are_refused(packed, tokenizer, tmp_path: Path):
    tokenizer.tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UserError, match="pre-tokenizer .*Metaspace.* cannot be written to GGUF"):
        save_gguf(packed, tokenizer, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_vocabulary_is_padded_to_the_model(make_model, tokenizer, tmp_path: Path):
    model = make_model(**{**SHAPE, "vocab_size": 416})
    save_gguf(model, tokenizer, tmp_path / "model.gguf")
    tokens = metadata(open_gguf(tmp_path / "model.gguf"), "x")[Keys.Tokenizer.LIST]
    assert len(tokens) == 416 and tokens[400] == "<|gguf_pad_400|>"


def test_untied_embeddings_are_refused(make_model, tokenizer, tmp_path: Path):
    model = make_model(**{**SHAPE, "tie_word_embeddings": False})
    with pytest.raises(UserError, match="untied embeddings.*token_embd"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_i2_s_rows_of_partial_blocks_are_stored_as_f16_codes(make_model, tokenizer, tmp_path: Path):
    shape = {**SHAPE, "hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 256}
    model = freeze_(make_model(**shape))
    path = tmp_path / "model.gguf"
    save_gguf(model, tokenizer, path, "i2_s")
    types = {t.name: t.tensor_type for t in open_gguf(path).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16  # rows of 192: not whole 128-value blocks
    assert types["blk.0.ffn_down.weight"] == 36  # rows of 256
    loaded = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, layer in _packed_layers(model).items():
        assert torch.equal(_packed_layers(loaded)[name].weight, layer.weight), name
        assert torch.equal(_packed_layers(loaded)[name].weight_scale, layer.weight_scale), name


def test_f16_embedding_is_a_copy_on_write_view_of_the_file(packed, tokenizer, tmp_path: Path):
    path = tmp_path / "model.gguf"
    save_gguf(packed, tokenizer, path, "tq2_0", "f16")
    before = path.read_bytes()
    loaded = BitNetForCausalLM.from_pretrained(path)
    embedding = loaded.model.embed_tokens.weight
    assert embedding.dtype == torch.float16
    assert torch.equal(embedding.float(), packed.model.embed_tokens.weight)
    embedding.data.zero_()  # the model may write its tensors; the file must not change
    del loaded, embedding
    assert path.read_bytes() == before


# Broken files: each is a UserError naming the file and, where there is one, the tensor or field.

@pytest.fixture
def gguf_path(packed, tokenizer, tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    save_gguf(packed, tokenizer, path, "tq2_0")
    return path


def _offset(path: Path, name: str) -> int:
    return {t.name: t for t in GGUFReader(path).tensors}[name].data_offset


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _load_error(path: Path) -> str:
    with pytest.raises(UserError) as info:
        BitNetForCausalLM.from_pretrained(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_file(gguf_path: Path):
    gguf_path.write_bytes(gguf_path.read_bytes()[:-1000])
    assert "not a valid GGUF file" in _load_error(gguf_path)


def test_wrong_magic(gguf_path: Path):
    _patch(gguf_path, 0, b"GGML")
    assert "magic" in _load_error(gguf_path)


def test_tensor_offset_past_the_end(gguf_path: Path):
    raw = gguf_path.read_bytes()
    name = b"blk.1.attn_q.weight"
    info = raw.index(name) + len(name) + 4 + 2 * 8 + 4  # name, n_dims, two dims, type, then the offset
    _patch(gguf_path, info, (2**40).to_bytes(8, "little"))
    assert "not a valid GGUF file" in _load_error(gguf_path)


def test_absurd_block_count(gguf_path: Path):
    raw = gguf_path.read_bytes()
    key = b"bitnet.block_count"
    _patch(gguf_path, raw.index(key) + len(key) + 4, (10**9).to_bytes(4, "little"))
    assert "'bitnet.block_count' is 1000000000" in _load_error(gguf_path)


def test_wrong_tensor_type(gguf_path: Path):
    raw = gguf_path.read_bytes()
    name = b"blk.0.ffn_up.weight"
    _patch(gguf_path, raw.index(name) + len(name) + 4 + 2 * 8, int(GGMLQuantizationType.Q4_0).to_bytes(4, "little"))
    message = _load_error(gguf_path)
    assert "'blk.0.ffn_up.weight' has type Q4_0" in message


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0])
def test_bad_scale(gguf_path: Path, value: float):
    _patch(gguf_path, _offset(gguf_path, "blk.0.attn_v.scale"), np.float32(value).tobytes())
    assert "'blk.0.attn_v.scale'" in _load_error(gguf_path)


def test_blocks_with_different_scales(gguf_path: Path):
    # The second 66-byte block of a TQ2_0 tensor ends in its fp16 d: make it 2 while the others are 1.
    _patch(gguf_path, _offset(gguf_path, "blk.0.attn_k.weight") + 2 * 66 - 2, np.float16(2).tobytes())
    assert "'blk.0.attn_k.weight' has 2 different block scales" in _load_error(gguf_path)


def test_nan_in_norm(gguf_path: Path):
    _patch(gguf_path, _offset(gguf_path, "blk.1.ffn_norm.weight") + 8, np.float32("nan").tobytes())
    assert "'blk.1.ffn_norm.weight' holds NaN" in _load_error(gguf_path)


def test_missing_tensor(gguf_path: Path):
    raw = gguf_path.read_bytes()
    _patch(gguf_path, raw.index(b"blk.1.ffn_norm.weight"), b"blk.1.ffn_xorm.weight")
    assert "no tensor 'blk.1.ffn_norm.weight'" in _load_error(gguf_path)
