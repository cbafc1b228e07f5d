"""The fallback diagnosis: when no anticipated mistake matches, the message names the kind
of difference (shape, dtype, NaN, transposed, sign, scale, offset, permuted columns or
rows, which rows and columns differ) instead of dumping one row."""

from __future__ import annotations

import pytest
import torch

from moe_course.grading import CheckFailure, check
from moe_course.grading.probe import difference, expect_close

E = torch.tensor([[0.5, -1.0, 2.0, 0.25],
                  [1.5, 0.75, -0.5, 3.0],
                  [-2.0, 1.25, 0.5, -0.75],
                  [0.1, 0.2, 0.3, 0.4],
                  [2.5, -1.5, 1.0, 0.6]])  # (5, 4), distinct columns and rows


def message(actual, expected=E, **kwargs) -> str:
    with pytest.raises(CheckFailure) as info:
        expect_close(actual, expected, "your gates", **kwargs)
    return info.value.message


def test_shape():
    text = message(E[:4])
    assert "your gates is wrong: shape (4, 4), expected (5, 4)" in text


def test_transposed_shape():
    assert "shape (4, 5), expected (5, 4) (transposed" in message(E.t())


def test_dtype():
    expected = torch.tensor([2, 0, 1])
    text = message(torch.tensor([2.5, 0.0, 1.0]), expected)
    assert "dtype float32, expected an integer tensor (int64)" in text


def test_nan_where_the_reference_is_finite():
    actual = E.clone()
    actual[1, 2] = float("nan")
    text = message(actual)
    assert "NaN where the expected values are finite, at (1, 2)" in text
    assert "exp that overflows" in text


def test_transposed_square():
    square = E[:4]
    text = message(square.t().contiguous(), square)
    assert "transposed: your [i, j] is the expected [j, i]" in text


def test_sign_flipped():
    assert "the sign is flipped" in message(-E)


def test_scaled_by_a_constant():
    assert "scaled by a constant: yours is 2.5 times the expected values" in message(2.5 * E)


def test_constant_offset():
    assert "shifted by a constant: yours is the expected values plus 0.7" in message(E + 0.7)


def test_columns_permuted():
    text = message(E[:, [2, 0, 1, 3]])
    assert "columns permuted: your column 0 is expected column 2, 1 is 0, 2 is 1" in text


def test_rows_permuted():
    text = message(E[[1, 0, 2, 3, 4]])
    assert "rows permuted (the right rows in another order): your row 0 is expected row 1" in text


def test_which_rows_and_columns_differ():
    actual = E.clone()
    actual[1, 2] += 1.0
    actual[3, 2] -= 2.0
    text = message(actual)
    assert "rows 1, 3 of 5 differ, in columns 2 of 4" in text
    assert "row 3: expected" in text  # the largest difference, with its values


def test_which_entries_of_a_vector_differ():
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0])
    actual = torch.tensor([1.0, 2.5, 3.0, 5.0])
    assert "entries 1, 3 of 4 differ" in message(actual, expected)


def test_a_scalar_names_the_ratio():
    text = message(torch.tensor(3.0), torch.tensor(1.5))
    assert "expected 1.5, got 3: 2 times the expected value" in text


def test_otherwise_keeps_the_description():
    text = message(-E, otherwise="your gates must be the softmax over experts")
    assert text.startswith("your gates must be the softmax over experts (the sign is flipped")


def test_integer_tensors_permuted():
    expected = torch.tensor([[0, 3], [2, 1], [1, 0]])
    text = difference(expected[:, [1, 0]], expected)
    assert text.startswith("columns permuted: your column 0 is expected column 1, 1 is 0")


def test_gate_columns_in_the_wrong_order_through_a_check():
    def softmax_gate(x, w_gate):  # experts numbered backwards: a mistake nobody planted
        return torch.softmax(x @ w_gate, dim=-1).flip(-1)

    with pytest.raises(CheckFailure) as info:
        check("ex01_softmax_gate", softmax_gate)
    assert "columns permuted: your column 0 is expected column 4" in info.value.message
