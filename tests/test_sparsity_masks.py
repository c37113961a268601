"""Balanced masks, keep-counts and the short last bank rule (ARCHITECTURE.md section 1)."""

import pytest
import torch
from torch import nn

from bs_lightning.sparsity import (
    balanced_mask,
    balanced_mask_k,
    bank_layout,
    keep_count,
    matrix_to_param,
    matrix_view,
)


def reference_balanced_mask(matrix, bank_size, k):
    """Loop reference: per row and bank, keep the k largest |w| (lower index wins ties)."""
    rows, length = matrix.shape
    mask = torch.zeros(rows, length, dtype=torch.bool)
    _, k_last = bank_layout(length, bank_size, k)
    for r in range(rows):
        for start in range(0, length, bank_size):
            bank = matrix[r, start : start + bank_size].abs().tolist()
            keep = k if len(bank) == bank_size else k_last
            order = sorted(range(len(bank)), key=lambda j: (-bank[j], j))[:keep]
            for j in order:
                mask[r, start + j] = True
    return mask


def test_hand_computed_b4_k2():
    w = torch.arange(1.0, 9.0).reshape(1, 8)
    kept = w * balanced_mask(w, 0.5, 4)
    assert kept.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_design_example_signs():
    w = torch.tensor([[0.8, -0.1, 0.2, 1.5, 1.0, 0.3, -0.4, -1.4]])
    kept = w * balanced_mask_k(w, 4, 2)
    assert torch.equal(kept, torch.tensor([[0.8, 0, 0, 1.5, 1.0, 0, 0, -1.4]]))


def test_ties_lower_index_wins():
    w = torch.ones(2, 8)
    mask = balanced_mask_k(w, 4, 1)
    assert mask.tolist() == [[True, False, False, False, True, False, False, False]] * 2


@pytest.mark.parametrize(
    ("bank_size", "sparsity", "k"),
    [(4, 0.5, 2), (32, 0.9, 3), (32, 0.0, 32), (16, 0.75, 4), (4, 0.375, 2), (1, 0.4, 1)],
)
def test_keep_count(bank_size, sparsity, k):
    assert keep_count(bank_size, sparsity) == k


@pytest.mark.parametrize(
    ("length", "bank_size", "k", "expected"),
    [
        (8, 4, 2, (2, 2)),
        (10, 4, 2, (3, 1)),
        (10, 4, 3, (3, 2)),
        (9, 4, 1, (3, 1)),
        (11, 4, 4, (3, 3)),
        (33, 32, 3, (2, 1)),
    ],
)
def test_bank_layout_short_last_bank(length, bank_size, k, expected):
    assert bank_layout(length, bank_size, k) == expected


def test_short_last_bank_mask():
    # L=10, B=4, k=2: banks [0..3], [4..7], [8..9]; last keeps min(2, max(1, round(1))) = 1
    w = torch.tensor([[1.0, 5, 2, 6, 9, 3, 8, 1, 4, 7]])
    mask = balanced_mask_k(w, 4, 2)
    assert mask.int().tolist() == [[0, 1, 0, 1, 1, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize(
    ("shape", "bank_size", "k"),
    [((7, 32), 8, 3), ((5, 3, 3, 3), 4, 3), ((6, 50), 16, 5), ((3, 12), 12, 12)],
)
def test_random_against_reference(shape, bank_size, k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    mask = balanced_mask_k(w, bank_size, k)
    assert mask.shape == w.shape
    assert torch.equal(
        mask.reshape(shape[0], -1), reference_balanced_mask(w.reshape(shape[0], -1), bank_size, k)
    )


def test_every_full_bank_keeps_exactly_k():
    w = torch.randn(64, 256)
    mask = balanced_mask(w, 0.9, 32)
    assert (mask.reshape(64, 8, 32).sum(-1) == 3).all()


def test_mask_of_half_precision_weight():
    w = torch.randn(4, 16).half()
    assert torch.equal(balanced_mask_k(w, 8, 2), balanced_mask_k(w.float(), 8, 2))


def test_keep_count_zero_raises():
    with pytest.raises(ValueError, match=r"sparsity=0.99 with bank_size=32 for layer 'fc' keeps"):
        keep_count(32, 0.99, name="fc")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan"), True, "0.5"])
def test_sparsity_out_of_range_raises(sparsity):
    with pytest.raises(ValueError, match=r"sparsity for layer 'lstm.weight_hh_l0' must be"):
        balanced_mask(torch.randn(4, 8), sparsity, 4, name="lstm.weight_hh_l0")


@pytest.mark.parametrize("bank_size", [0, -3, 2.0])
def test_bank_size_invalid_raises(bank_size):
    with pytest.raises(ValueError, match=r"bank_size for layer 'fc' must be an integer >= 1"):
        keep_count(bank_size, 0.5, name="fc")


def test_bank_longer_than_row_raises():
    with pytest.raises(
        ValueError,
        match=r"bank_size=16 for layer 'fc' is longer than a row \(8 columns\); use a bank_size in \[1, 8\]",
    ):
        balanced_mask(torch.randn(4, 8), 0.5, 16, name="fc")


@pytest.mark.parametrize("k", [0, 5, 1.5])
def test_bank_layout_bad_k_raises(k):
    with pytest.raises(ValueError, match=r"k for layer 'fc' must be an integer in \[1, 4\]"):
        bank_layout(8, 4, k, name="fc")


def test_balanced_mask_k_scalar_raises():
    with pytest.raises(ValueError, match="at least one dimension"):
        balanced_mask_k(torch.tensor(1.0), 1, 1)


def test_matrix_view_linear_conv_lstm_mha():
    lin = nn.Linear(6, 4)
    assert matrix_view(lin, "weight").data_ptr() == lin.weight.data_ptr()
    assert matrix_view(lin, "weight").shape == (4, 6)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    assert matrix_view(conv, "weight").shape == (6, 2 * 3 * 3)
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    assert matrix_view(lstm, "weight_hh_l1_reverse").shape == (28, 7)
    assert matrix_view(lstm, "weight_ih_l1").shape == (28, 14)
    mha = nn.MultiheadAttention(8, 2)
    assert matrix_view(mha, "in_proj_weight").shape == (24, 8)


def test_matrix_view_gpt2_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=6, nx=4)  # weight stored [in=4, out=6]
    view = matrix_view(conv, "weight")
    assert view.shape == (6, 4)
    x = torch.randn(3, 4)
    assert torch.allclose(conv(x), x @ view.t() + conv.bias, atol=1e-6)
    mask = balanced_mask_k(view, 2, 1)
    back = matrix_to_param(conv, "weight", mask)
    assert back.shape == conv.weight.shape
    assert torch.equal(back, mask.t())
    # writing through the view changes the parameter
    with torch.no_grad():
        view.mul_(mask)
    assert int((conv.weight != 0).sum()) == 6 * 2


def test_matrix_view_errors():
    lin = nn.Linear(3, 2)
    with pytest.raises(
        ValueError, match=r"Linear has no parameter 'weight_ih'; valid names: \['bias', 'weight'\]"
    ):
        matrix_view(lin, "weight_ih")
    with pytest.raises(ValueError, match=r"expected the parameter's shape \(2, 3\)"):
        matrix_view(lin, "weight", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="only parameters with >= 2 dimensions"):
        matrix_view(lin, "bias")
