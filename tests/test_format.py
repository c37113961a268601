"""Compact balanced format: pack/unpack (docs/ARCHITECTURE.md section 2)."""

import random

import pytest
import torch

from bs_lightning.nn.format import (
    bank_counts,
    check_bank_size,
    infer_bank_layout,
    infer_keep_count,
    pack_balanced,
    unpack_balanced,
)
from bs_lightning.sparsity.masks import balanced_mask, balanced_mask_k, bank_layout


def _pruned(rows, cols, bank_size, sparsity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    return w * balanced_mask(w, sparsity, bank_size)


def test_hand_case_b4_k2():
    w = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8]])
    pruned = w * balanced_mask(w, 0.5, 4)
    values, indices, k = pack_balanced(pruned, 4)
    assert k == 2
    assert values.tolist() == [[3.0, 4.0, 7.0, 8.0]]
    assert indices.tolist() == [[2, 3, 2, 3]]
    assert indices.dtype == torch.uint8
    assert unpack_balanced(values, indices, 4, 8).tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]


def test_hand_case_short_last_bank_is_padded_with_zero():
    # L=6, B=4, k=2: last bank has r=2 columns and keeps round(2*2/4)=1 weight
    m = torch.tensor([[0.0, 5, 0, -1, 0, 9]])
    values, indices, k = pack_balanced(m, 4)
    assert k == 2
    # bank 0: columns 1, 3; bank 1: kept column 1 (= col 5) + padding at an in-range index
    assert values.tolist() == [[5.0, -1.0, 0.0, 9.0]]
    assert indices.tolist() == [[1, 3, 0, 1]]
    assert torch.equal(unpack_balanced(values, indices, 4, 6), m)


def test_short_bank_narrower_than_k_repeats_an_index_with_zero_value():
    # L=9, B=8, k=4: the last bank has one column, keeps 1, padded to 4 entries
    m = torch.zeros(2, 9)
    m[:, [0, 2, 4, 6]] = torch.tensor([1.0, 2, 3, 4])
    m[:, 8] = torch.tensor([7.0, 5.0])
    values, indices, k = pack_balanced(m, 8)
    assert k == 4
    assert indices[:, 4:].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert values[:, 4:].tolist() == [[7.0, 0, 0, 0], [5.0, 0, 0, 0]]
    assert torch.equal(unpack_balanced(values, indices, 8, 9), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_round_trip_is_exact(dtype):
    rng = random.Random()  # fresh cases each run; the seed is printed on failure
    seed = rng.randrange(1 << 30)
    for _ in range(12):
        bank = rng.choice([4, 7, 16, 25, 32, 50, 64, 100, 128, 256])
        cols = rng.randint(bank, 3 * bank + 5)
        rows = rng.randint(1, 17)
        sparsity = rng.uniform(0.5, 0.97)
        k = max(1, round(bank * (1 - sparsity)))
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rows, cols, generator=g).to(dtype)
        pruned = w * balanced_mask_k(w, bank, k)
        values, indices, k_packed = pack_balanced(pruned, bank)
        n_banks, _ = bank_layout(cols, bank, k)
        case = f"seed={seed} rows={rows} cols={cols} bank={bank} k={k}"
        assert k_packed == k, case
        assert values.shape == (rows, n_banks * k) and values.dtype == dtype, case
        assert values.is_contiguous() and indices.is_contiguous(), case
        assert torch.equal(unpack_balanced(values, indices, bank, cols), pruned), case
        # inside a bank the indices are sorted by column
        idx = indices.long().reshape(rows, n_banks, k)
        assert bool((idx[..., 1:] >= idx[..., :-1]).all()), case


def test_chance_zeros_keep_k_and_round_trip():
    pruned = _pruned(8, 64, 16, 0.75)
    pruned[0, pruned[0].nonzero()[:3, 0]] = 0  # three kept weights of row 0 become 0
    values, indices, k = pack_balanced(pruned, 16)
    assert k == 4
    assert torch.equal(unpack_balanced(values, indices, 16, 64), pruned)


def test_explicit_k_pads_sparser_matrix():
    pruned = _pruned(4, 32, 8, 0.75)  # k=2
    values, indices, k = pack_balanced(pruned, 8, k=4)
    assert k == 4 and values.shape == (4, 16)
    assert torch.equal(unpack_balanced(values, indices, 8, 32), pruned)


def test_dense_matrix_is_balanced_with_k_equal_bank():
    m = torch.randn(3, 12).abs() + 0.1
    assert infer_keep_count(m, 4) == 4


def test_bank_counts():
    m = torch.tensor([[1.0, 0, 2, 0, 3, 0, 4]])
    full, last = bank_counts(m, 3)
    assert full.tolist() == [[2, 1]]
    assert last.tolist() == [1]
    assert bank_counts(m[:, :6], 3)[1] is None
    with pytest.raises(ValueError, match=r"must be 2-D \[out, in\]"):
        bank_counts(m[0], 3)
    with pytest.raises(ValueError, match=r"bank_size=8 .* longer than a row \(7 columns\)"):
        bank_counts(m, 8)


def test_check_bank_size():
    assert check_bank_size(256, 300) == 256
    with pytest.raises(
        ValueError, match=r"bank_size for layer 'fc' must be an integer in \[1, 256\]"
    ):
        check_bank_size(257, 300, "fc")
    with pytest.raises(ValueError, match=r"use a bank_size in \[1, 12\]"):
        check_bank_size(16, 12)


def test_short_banks_must_mostly_hold_their_keep_count():
    # L=10, B=4, k=1: short banks (r=2) keep 1; three of four rows hold none there
    m = torch.zeros(4, 10)
    m[:, 0] = 1.0
    m[:, 4] = 2.0
    m[0, 9] = 3.0
    with pytest.raises(ValueError, match="only 1 of 4 short last banks hold their keep-count 1"):
        infer_keep_count(m, 4)


def test_unbalanced_matrix_raises():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(16, 64, generator=g)
    m[torch.rand(16, 64, generator=g) < 0.9] = 0  # unstructured 90%
    with pytest.raises(ValueError, match=r"layer 'fc'.*not balanced at bank_size=16"):
        pack_balanced(m, 16, name="fc")


def test_explicit_k_too_small_raises():
    pruned = _pruned(4, 32, 8, 0.5)  # k=4
    with pytest.raises(ValueError, match=r"not balanced at bank_size=8, k=2: a bank holds 4"):
        pack_balanced(pruned, 8, k=2)


def test_short_last_bank_over_its_keep_count_raises():
    m = torch.tensor([[1.0, 0, 0, 0, 2, 0, 0, 0, 3, 4]])  # last bank (r=2) keeps round(1*2/4)=1
    with pytest.raises(ValueError, match=r"short last bank holds 2 nonzeros"):
        pack_balanced(m, 4)
    with pytest.raises(ValueError, match=r"short last bank holds 2 nonzeros, more than 1"):
        pack_balanced(m, 4, k=1)


def test_all_zero_matrix_raises():
    with pytest.raises(ValueError, match="all zeros"):
        infer_keep_count(torch.zeros(2, 8), 4)


def test_no_full_bank_raises():
    with pytest.raises(ValueError, match="no full bank"):
        infer_keep_count(torch.ones(0, 8), 4)


@pytest.mark.parametrize("bank", [0, 257, 2.0, True])
def test_bad_bank_size_raises(bank):
    with pytest.raises(
        ValueError, match=r"bank_size for layer 'fc' must be an integer in \[1, 256\]"
    ):
        pack_balanced(torch.ones(2, 300), bank, name="fc")


def test_bank_longer_than_row_raises():
    with pytest.raises(ValueError, match=r"bank_size=16 .* longer than a row \(8 columns\)"):
        pack_balanced(torch.ones(2, 8), 16)


def test_non_matrix_raises():
    with pytest.raises(ValueError, match=r"must be 2-D \[out, in\]"):
        pack_balanced(torch.ones(2, 3, 4), 2)


def test_unpack_shape_errors():
    values, indices, _ = pack_balanced(_pruned(4, 32, 8, 0.75), 8)
    with pytest.raises(ValueError, match="same shape"):
        unpack_balanced(values, indices[:, :-1], 8, 32)
    with pytest.raises(ValueError, match="must be torch.uint8"):
        unpack_balanced(values, indices.long(), 8, 32)
    with pytest.raises(ValueError, match="not a positive multiple of the 3 banks"):
        unpack_balanced(values, indices, 8, 20)
    with pytest.raises(ValueError, match=r"in_features for layer 'fc' must be an integer >= 1"):
        unpack_balanced(values, indices, 8, 0, name="fc")
    with pytest.raises(ValueError, match="must be < bank_size=4"):
        unpack_balanced(values, indices, 4, 16)
    bad = indices.clone()
    bad[0, -1] = 7
    with pytest.raises(ValueError, match=r"point past the row end \(in_features=29\)"):
        unpack_balanced(values, bad, 8, 29)


@pytest.mark.parametrize(
    ("rows", "cols", "bank", "sparsity"),
    [
        (64, 100, 32, 0.9),  # short last bank of 4 columns
        (64, 256, 8, 0.25),  # mildly sparse: at bank 2 it looks dense with chance zeros
        (64, 256, 4, 0.5),  # 2:4
        (64, 300, 25, 0.8),
        (16, 64, 64, 0.5),  # one bank per row
        (32, 512, 256, 0.97),
        (3, 27, 9, 0.75),  # few rows
    ],
)
def test_infer_bank_layout_finds_the_pruning_bank(rows, cols, bank, sparsity):
    pruned = _pruned(rows, cols, bank, sparsity)
    assert infer_bank_layout(pruned) == (bank, round(bank * (1 - sparsity)))


def test_infer_bank_layout_tolerates_chance_zeros():
    pruned = _pruned(32, 128, 16, 0.75)
    kept = pruned.nonzero()
    pruned[kept[::40, 0], kept[::40, 1]] = 0  # one kept weight in 40 becomes 0
    assert infer_bank_layout(pruned) == (16, 4)
    values, indices, _ = pack_balanced(pruned, 16)
    assert torch.equal(unpack_balanced(values, indices, 16, 128), pruned)


def test_infer_bank_layout_of_dense_matrix_is_dense():
    bank, k = infer_bank_layout(torch.randn(8, 50))
    assert k == bank


def test_infer_bank_layout_errors():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 128, generator=g)
    m[torch.rand(64, 128, generator=g) < 0.9] = 0
    with pytest.raises(
        ValueError, match=r"layer 'fc' of shape \(64, 128\) is balanced at no bank size in 2..128"
    ):
        infer_bank_layout(m, name="fc")
    with pytest.raises(ValueError, match="all zeros"):
        infer_bank_layout(torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"must be 2-D \[out, in\] with out >= 1 and in >= 2"):
        infer_bank_layout(torch.ones(4, 1))
