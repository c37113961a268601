"""BalancedSparseConv1D (Hugging Face GPT-2 `Conv1D`, weight stored [in, out])."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning.nn import BalancedSparseConv1D
from bs_lightning.sparsity import balanced_mask


def _pruned_conv1d(nf, nx, bank, sparsity):
    torch.manual_seed(0)
    conv = Conv1D(nf, nx)
    with torch.no_grad():
        nn.init.normal_(conv.bias)
        # banks run along the input dimension: the matrix view is weight.t()
        conv.weight.mul_(balanced_mask(conv.weight.t(), sparsity, bank).t())
    return conv


@pytest.mark.parametrize(("nf", "nx", "bank", "sparsity"), [(48, 64, 16, 0.75), (30, 100, 32, 0.9)])
def test_matches_masked_conv1d(nf, nx, bank, sparsity):
    conv = _pruned_conv1d(nf, nx, bank, sparsity)
    sparse = BalancedSparseConv1D.from_dense(conv, bank)
    assert (sparse.in_features, sparse.out_features) == (nx, nf)
    x = torch.randn(2, 5, nx)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-5)
    dense = sparse.to_dense()
    assert type(dense) is Conv1D
    assert torch.equal(dense.weight, conv.weight) and torch.equal(dense.bias, conv.bias)


def test_banks_run_along_the_input_dimension():
    conv = Conv1D(4, 8)  # weight [8 in, 4 out]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[[1, 2, 5, 7], :] = 1.0  # every output row keeps 2 of each bank of 4 inputs
    sparse = BalancedSparseConv1D.from_dense(conv, 4)
    assert sparse.k == 2
    assert sparse.indices.tolist() == [[1, 2, 1, 3]] * 4


def test_from_dense_rejects_other_modules():
    with pytest.raises(TypeError, match="expects a transformers.pytorch_utils.Conv1D, got Linear"):
        BalancedSparseConv1D.from_dense(nn.Linear(8, 4), 4)
