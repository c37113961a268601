"""Masks of the other patterns (nm, unstructured, block, vector) and the pattern objects."""

import pytest
import torch

from bs_lightning.sparsity import (
    balanced_mask_k,
    block_mask,
    make_pattern,
    nm_mask,
    unstructured_mask,
    vector_mask,
)

W = torch.arange(1.0, 13.0).reshape(3, 4)


def test_nm_2_4_hand_computed():
    w = torch.tensor([[4.0, -1, 3, 2, 0.5, -7, 1, 6]])
    assert nm_mask(w, 2, 4).int().tolist() == [[1, 0, 1, 0, 0, 1, 0, 1]]


def test_unstructured_hand_computed():
    assert unstructured_mask(W, 0.5).int().tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_unstructured_keeps_largest_anywhere():
    w = torch.zeros(4, 8)
    w[3, 7], w[0, 0] = 5.0, -6.0
    mask = unstructured_mask(w, 1 - 2 / 32)
    assert mask.sum() == 2 and mask[3, 7] and mask[0, 0]


def test_block_hand_computed_with_edge_tiles():
    # 2x2 tiles of a 3x4 matrix; the bottom tiles are 1x2. Norms: TL sqrt(66), TR sqrt(138),
    # BL sqrt(181), BR sqrt(265) -> keep BR and BL.
    assert block_mask(W, 0.5, 2).int().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_block_4x4_whole_tiles():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    mask = block_mask(w, 0.75, 4)
    tiles = mask.reshape(4, 4, 8, 4).permute(0, 2, 1, 3).reshape(32, 16)
    assert set(tiles.sum(1).tolist()) <= {0, 16}
    assert int(tiles.any(1).sum()) == 8
    norms = w.reshape(4, 4, 8, 4).permute(0, 2, 1, 3).reshape(32, 16).norm(dim=1)
    assert torch.equal(tiles.any(1), norms >= norms.sort(descending=True).values[7])


def test_vector_hand_computed_short_last_run():
    # runs of 3 per row: [1,2,3] [4] | [5,6,7] [8] | [9,10,11] [12]; keep the 3 largest norms
    assert vector_mask(W, 0.5, 3).int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_prev_mask_never_regrows():
    w = torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]])
    prev = torch.tensor([[True, False, True, True, False, True, True, True]])
    # an unpruned exact zero (index 5) must beat a pruned one at a lower index (4) on ties
    mask = balanced_mask_k(w, 4, 3, prev_mask=prev)
    assert mask.int().tolist() == [[1, 0, 1, 1, 0, 1, 1, 1]]
    assert not (unstructured_mask(w, 0.25, prev_mask=prev) & ~prev).any()
    zero_blocks = torch.zeros(4, 4)
    prev_b = torch.zeros(4, 4, dtype=torch.bool)
    prev_b[2:, 2:] = True
    assert torch.equal(block_mask(zero_blocks, 0.75, 2, prev_mask=prev_b), prev_b)
    prev_v = torch.zeros(2, 4, dtype=torch.bool)
    prev_v[1, 2:] = True
    assert torch.equal(vector_mask(torch.zeros(2, 4), 0.75, 2, prev_mask=prev_v), prev_v)


def test_conv_weight_flattened_per_output_channel():
    w = torch.randn(6, 2, 3, 3)
    mask = block_mask(w, 0.5, 3)
    assert mask.shape == w.shape
    assert int(mask.sum()) == 6 * 9  # 2 x 6 tiles of 3x3 on the [6, 18] view, keep 6


@pytest.mark.parametrize(
    ("spec", "sparsity", "keep"),
    [
        (make_pattern("balanced", bank_size=8), 0.75, 2),
        (make_pattern("nm", n=2, m=4), 0.0, 4),
        (make_pattern("nm", n=2, m=4), 0.5, 2),
        (make_pattern("unstructured"), 0.75, 32),
        (make_pattern("block", block_size=4), 0.5, 4),
        (make_pattern("vector", vector_size=4), 0.75, 8),
    ],
)
def test_pattern_keep_and_mask(spec, sparsity, keep):
    w = torch.randn(8, 16)
    assert spec.keep(w, sparsity) == keep
    mask = spec.mask(w, keep)
    assert mask.shape == w.shape
    assert mask.float().mean().item() == pytest.approx(1 - sparsity)


def test_pattern_fixed_sparsity():
    assert make_pattern("nm", n=1, m=4).fixed_sparsity == 0.75
    assert make_pattern("balanced").fixed_sparsity is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"pattern": "diagonal"},
            r"pattern must be one of \['balanced', 'nm', 'unstructured', 'row', 'block', 'vector'\], got 'diagonal'",
        ),
        ({"bank_size": 0}, r"bank_size must be an integer >= 1, got 0"),
        ({"pattern": "nm", "n": 5, "m": 4}, r"n must be an integer in \[1, m=4\], got 5"),
        ({"block_size": 0}, r"block_size must be an integer >= 1, got 0"),
        ({"vector_size": -1}, r"vector_size must be an integer >= 1, got -1"),
        ({"m": 0}, r"m must be an integer >= 1, got 0"),
    ],
)
def test_pattern_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pattern(**kwargs)


def test_pattern_keep_errors_name_the_layer():
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"m=4 for layer 'fc' must divide the row length 10"):
        make_pattern("nm").keep(w, 0.5, "fc")
    with pytest.raises(ValueError, match=r"bank_size=16 for layer 'fc' is longer than a row"):
        make_pattern("balanced", bank_size=16).keep(w, 0.5, "fc")
    with pytest.raises(
        ValueError, match=r"sparsity=0.99 for layer 'fc' keeps round\(4 \* \(1 - 0.99\)\) = 0 units"
    ):
        make_pattern("block", block_size=4).keep(torch.randn(8, 8), 0.99, "fc")


def test_nm_row_not_multiple_raises():
    with pytest.raises(
        ValueError, match=r"m=4 for layer 'fc' must be an integer >= 1 dividing the row length 6"
    ):
        nm_mask(torch.randn(2, 6), 2, 4, name="fc")


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (
            unstructured_mask,
            {"sparsity": 1.0},
            r"sparsity for layer 'fc' must be in \[0, 1\), got 1.0",
        ),
        (unstructured_mask, {"sparsity": 0.999}, r"keeps round\(24 \* \(1 - 0.999\)\) = 0 weights"),
        (
            block_mask,
            {"sparsity": 0.5, "block_size": 0},
            r"block_size for layer 'fc' must be an integer >= 1",
        ),
        (block_mask, {"sparsity": 0.9, "block_size": 4}, r"= 0 blocks of 2"),
        (
            vector_mask,
            {"sparsity": 0.5, "vector_size": 0},
            r"vector_size for layer 'fc' must be an integer >= 1",
        ),
        (vector_mask, {"sparsity": 0.97, "vector_size": 2}, r"= 0 vectors of 12"),
    ],
)
def test_mask_errors(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(4, 6), name="fc", **kwargs)


def test_scalar_weight_raises():
    with pytest.raises(ValueError, match="at least one dimension"):
        unstructured_mask(torch.tensor(2.0), 0.5)


def test_row_pattern_keeps_the_largest_of_each_row():
    pattern = make_pattern("row")
    w = torch.tensor([[1.0, -9, 3, 2], [8.0, 7, 6, 5], [0.5, 0, 0, -0.25]])
    keep = pattern.keep(w, 0.5, "fc")
    assert keep == 2 and pattern.units(w) == 4 and not pattern.converts
    assert pattern.mask(w, keep).int().tolist() == [[0, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]]
    # a previously pruned weight stays pruned even when it is the largest
    prev = torch.ones(3, 4, dtype=torch.bool)
    prev[1, 0] = False
    assert pattern.mask(w, keep, prev)[1].int().tolist() == [0, 1, 1, 0]
    with pytest.raises(
        ValueError, match=r"0.9 for layer 'fc' keeps round\(4 \* \(1 - 0.9\)\) = 0 weights"
    ):
        pattern.keep(w, 0.9, "fc")
