from __future__ import annotations

import math

import pytest
import torch

from bitnet158.errors import UserError
from bitnet158.generation.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    make_generator,
    min_p_filter,
    next_token,
    sample,
    top_k_filter,
    top_p_filter,
)

# One row with probabilities 0.5, 0.05, 0.3, 0.15: sorted, tokens 0, 2, 3, 1.
PROBS = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
LOGITS = PROBS.log()
CPU = torch.device("cpu")


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0), ("max_new_tokens", 2.0), ("temperature", -0.1), ("temperature", math.nan),
        ("temperature", math.inf), ("top_k", -1), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
        ("min_p", 1.01), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("seed", -1), ("seed", "7"),
        ("stop", "STOP"), ("stop", [""]), ("stop", [1]),
    ],
)
def test_invalid_params_name_the_parameter(field: str, value: object):
    with pytest.raises(UserError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_valid_edge_params():
    SamplingParams(max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5, seed=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5], [3.0, 0.0, -1.0, 4.0]])
    seen = torch.tensor([[True, True, False, False], [False, True, True, False]])
    expected = torch.tensor([[1.0, -4.0, 1.0, -0.5], [3.0, 0.0, -2.0, 4.0]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), expected)


def test_temperature():
    torch.testing.assert_close(apply_temperature(torch.tensor([[1.0, -2.0]]), 0.5), torch.tensor([[2.0, -4.0]]))


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [9.0, 0.0, 8.0, 7.0, 6.0]])
    assert kept(top_k_filter(logits, 2)) == [{1, 3}, {0, 2}]
    assert kept(top_k_filter(logits, 1)) == [{1}, {0}]
    assert kept(top_k_filter(logits, 0)) == [{0, 1, 2, 3, 4}] * 2
    assert kept(top_k_filter(logits, 9)) == [{0, 1, 2, 3, 4}] * 2
    filtered = top_k_filter(logits, 2)
    assert filtered[0, 1] == 5.0 and filtered[0, 0] == -math.inf  # kept logits are unchanged


@pytest.mark.parametrize(
    ("p", "expected"),
    [(0.1, {0}), (0.45, {0}), (0.7, {0, 2}), (0.9, {0, 2, 3}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p: float, expected: set[int]):
    assert kept(top_p_filter(LOGITS, p)) == [expected]


def test_top_p_rows_are_independent():
    logits = torch.cat([LOGITS, LOGITS.flip(-1)])
    assert kept(top_p_filter(logits, 0.7)) == [{0, 2}, {3, 1}]


@pytest.mark.parametrize(("min_p", "expected"), [(0.0, {0, 1, 2, 3}), (0.25, {0, 2, 3}), (0.4, {0, 2}), (1.0, {0})])
def test_min_p_is_relative_to_the_most_likely_token(min_p: float, expected: set[int]):
    assert kept(min_p_filter(LOGITS, min_p)) == [expected]


def test_sample_follows_the_distribution_and_the_seed():
    logits = torch.tensor([[0.7, 0.3, 0.0]]).log().expand(4000, -1)
    draws = sample(logits, make_generator(0, CPU))
    counts = torch.bincount(draws, minlength=3)
    assert counts[2] == 0
    assert abs(counts[0].item() / 4000 - 0.7) < 0.03
    assert torch.equal(draws, sample(logits, make_generator(0, CPU)))
    assert not torch.equal(draws, sample(logits, make_generator(1, CPU)))


def test_next_token_greedy_and_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
    generator = make_generator(0, CPU)
    assert next_token(logits, SamplingParams(temperature=0), generator).tolist() == [1, 0]
    for seed in range(5):
        assert next_token(logits, SamplingParams(top_k=1, seed=seed), make_generator(seed, CPU)).tolist() == [1, 0]
    # The repetition penalty runs before greedy choice: 3 / 4 < 2 makes token 2 the best of row 0.
    seen = torch.tensor([[False, True, False], [False, False, False]])
    penalized = next_token(logits, SamplingParams(temperature=0, repetition_penalty=4.0), generator, seen)
    assert penalized.tolist() == [2, 0]


def test_top_p_keeps_the_most_likely_token_when_p_underflows_float32():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    kept = top_p_filter(logits, 1e-300)  # 1e-300 is 0 in float32
    assert torch.equal(torch.isfinite(kept), torch.tensor([[False, True, False]]))
