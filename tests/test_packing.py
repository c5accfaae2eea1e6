"""2-bit packing (transformers' layout, byte for byte) and base-3 packing (five trits per byte)."""

import pytest
import torch
from transformers.integrations import bitnet as hf_bitnet

from bitnet158.packing import pack_2bit, pack_2bit_rows, pack_base3, unpack_2bit, unpack_base3


def random_ternary(*shape: int) -> torch.Tensor:
    return torch.randint(-1, 2, shape, dtype=torch.int8)


SHAPES = [(1,), (3,), (8,), (1, 1), (4, 7), (5, 3), (13, 1), (64, 96), (97, 5), (2, 3, 5), (7, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_2bit_round_trip(shape):
    codes = random_ternary(*shape)
    packed = pack_2bit(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (-(-shape[0] // 4), *shape[1:])
    assert torch.equal(unpack_2bit(packed, shape[0]), codes)


@pytest.mark.parametrize(("rows", "chunk"), [(1, 1), (9, 2), (13, 5), (100, 7), (101, 64)])
def test_2bit_packing_a_few_rows_at_a_time_gives_the_same_bytes(rows, chunk):
    codes = random_ternary(rows, 3)
    packed = torch.zeros(-(-rows // 4), 3, dtype=torch.uint8)
    for start in range(0, rows, chunk):
        pack_2bit_rows(packed, codes[start : start + chunk], start)
    assert torch.equal(packed, pack_2bit(codes))


@pytest.mark.parametrize("rows, cols", [(1, 3), (4, 2), (6, 5), (9, 4)])
def test_2bit_layout_matches_the_formula(rows, cols):
    """P[r, k] = sum_i (T[i*R + r, k] + 1) << 2i with R = ceil(N / 4); absent rows contribute zero bits."""
    codes = random_ternary(rows, cols)
    packed_rows = -(-rows // 4)
    expected = torch.zeros(packed_rows, cols, dtype=torch.uint8)
    for r in range(packed_rows):
        for k in range(cols):
            expected[r, k] = sum(
                (int(codes[i * packed_rows + r, k]) + 1) << (2 * i) for i in range(4) if i * packed_rows + r < rows
            )
    assert torch.equal(pack_2bit(codes), expected)


@pytest.mark.parametrize(
    "shape", [(4, 3), (8, 5), (64, 96), (1, 7), (5, 3), (6, 2), (13, 7), (97, 5), (11,), (2, 3, 4)]
)
def test_2bit_bytes_match_transformers(shape):
    codes = random_ternary(*shape)
    expected = hf_bitnet.pack_weights(codes.clone())  # pack_weights adds 1 to its argument in place
    assert torch.equal(pack_2bit(codes), expected)


@pytest.mark.parametrize("shape", [(4, 3), (64, 96), (5, 3), (13, 7), (97, 5), (11,), (2, 3, 4)])
def test_2bit_unpack_matches_transformers(shape, eager_compile):
    codes = random_ternary(*shape)
    packed = pack_2bit(codes)
    # transformers unpacks all 4 * ceil(N / 4) rows; the padding rows past N decode as -1.
    hf_rows = hf_bitnet.unpack_weights(packed, dtype=torch.int8)
    assert hf_rows.shape[0] == 4 * packed.shape[0]
    assert torch.equal(unpack_2bit(packed, shape[0]), hf_rows[: shape[0]])
    assert (hf_rows[shape[0] :] == -1).all()


@pytest.mark.parametrize("shape", [(1,), (4,), (5,), (6,), (11,), (3, 1), (3, 13), (2, 4, 17), (7, 10)])
def test_base3_round_trip(shape):
    codes = random_ternary(*shape)
    packed = pack_base3(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], -(-shape[-1] // 5))
    assert torch.equal(unpack_base3(packed, shape[-1]), codes)


def test_base3_five_values_per_byte():
    codes = torch.tensor([[-1, -1, -1, -1, -1], [1, 1, 1, 1, 1], [0, 1, -1, 0, 0]], dtype=torch.int8)
    # byte = sum((t_j + 1) * 3**j): 0, 2 * 121 = 242, 1 + 2*3 + 0*9 + 1*27 + 1*81 = 115
    assert pack_base3(codes).flatten().tolist() == [0, 242, 115]


def test_base3_pads_the_last_group():
    codes = torch.tensor([1, -1, 0, 1, 1, 1, 0], dtype=torch.int8)  # 7 values: 2 bytes
    packed = pack_base3(codes)
    assert packed.tolist() == [2 + 0 + 9 + 54 + 162, 2 + 3 + 9 + 27 + 81]  # the 2nd byte is padded with zeros
    assert torch.equal(unpack_base3(packed, 7), codes)


@pytest.mark.parametrize("pack", [pack_2bit, pack_base3])
@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.tensor([[0, 2, 1, 0]], dtype=torch.int8), r"must lie in \{-1, 0, 1\}"),
        (torch.tensor([[-2, 0]], dtype=torch.int32), r"must lie in \{-1, 0, 1\}"),
        (torch.tensor([[0.0, 1.0]]), "must be an integer tensor, got torch.float32"),
        (torch.tensor([[True, False]]), "must be an integer tensor, got torch.bool"),
        (torch.zeros(0, 4, dtype=torch.int8), r"shape \(0, 4\)"),
        (torch.tensor(1, dtype=torch.int8), r"shape \(\)"),
    ],
)
def test_pack_rejects_bad_codes(pack, codes, message):
    with pytest.raises(ValueError, match=message):
        pack(codes)


@pytest.mark.parametrize("rows", [4, 9, 0])
def test_unpack_2bit_rejects_wrong_row_count(rows):
    packed = pack_2bit(random_ternary(7, 3))  # 2 packed rows hold 5 to 8 rows
    with pytest.raises(ValueError, match=f"2 packed rows cannot hold {rows} rows"):
        unpack_2bit(packed, rows)


def test_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="must be a uint8 tensor, got torch.int8"):
        unpack_2bit(torch.zeros(2, 3, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match="must be a uint8 tensor, got torch.int32"):
        unpack_base3(torch.zeros(2, 3, dtype=torch.int32), 15)


@pytest.mark.parametrize("length", [10, 16])
def test_unpack_base3_rejects_wrong_length(length):
    packed = pack_base3(random_ternary(2, 13))  # 3 bytes hold 11 to 15 values
    with pytest.raises(ValueError, match=f"3 base-3 bytes cannot hold {length} values"):
        unpack_base3(packed, length)


def test_unpack_base3_rejects_byte_above_242():
    packed = pack_base3(random_ternary(2, 10))
    packed[1, 0] = 243
    with pytest.raises(ValueError, match="base-3 byte 243 is out of range"):
        unpack_base3(packed, 10)
