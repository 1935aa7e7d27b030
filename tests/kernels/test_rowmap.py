import pytest
import torch

from moetrain.kernels import build_row_map


def test_both_directions_without_padding():
    # T=3, k=2; assignment 3 (token 1, choice 1) dropped; buffer order as sorted by expert
    slot_N = torch.tensor([4, 0, 2, 5, 1])
    m = build_row_map(slot_N, 3, 2)
    assert torch.equal(m.slot_M, slot_N) and m.num_rows == 5
    assert m.pos_TK.tolist() == [[1, 4], [2, -1], [0, 3]]
    assert (m.num_tokens, m.top_k, m.padded) == (3, 2, False)


def test_both_directions_with_capacity_padding():
    slot_N = torch.tensor([4, 0, 2, 5, 1])
    rows_N = torch.tensor([0, 1, 3, 4, 6])  # 4 experts x capacity 2 = 8 rows
    m = build_row_map(slot_N, 3, 2, rows_N, num_rows=8)
    assert m.slot_M.tolist() == [4, 0, -1, 2, 5, -1, 1, -1]
    assert m.pos_TK.tolist() == [[1, 6], [3, -1], [0, 4]] and m.padded


def test_no_assignments():
    m = build_row_map(torch.zeros(0, dtype=torch.long), 4, 2)
    assert m.num_rows == 0 and (m.pos_TK == -1).all() and m.pos_TK.shape == (4, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows_N=torch.tensor([0, 1])), "needs num_rows"),
    (dict(rows_N=torch.tensor([0]), num_rows=4), "rows_N shape"),
    (dict(num_rows=7), "num_rows=7"),
])
def test_inconsistent_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_row_map(torch.tensor([0, 3]), 2, 2, **kwargs)
