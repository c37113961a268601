"""Autograd of `balanced_linear`: gradients for x, values and bias; indices and padding fixed."""

import pytest
import torch
from torch import nn

from bs_lightning import ops
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.nn.format import bank_counts, unpack_balanced
from bs_lightning.sparsity import bank_layout

pytestmark = pytest.mark.skipif(not ops.load(), reason="needs the compiled library")
OP = torch.ops.bs_lightning.balanced_linear


def _case(in_features: int, dtype=torch.float64):
    torch.manual_seed(0)
    sparse = BalancedSparseLinear.from_dense(nn.Linear(in_features, 6).to(dtype), 8, sparsity=0.5)
    values = sparse.values.detach().clone().requires_grad_(True)
    bias = sparse.bias.detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, in_features, dtype=dtype, requires_grad=True)
    return x, values, sparse.indices, bias


def test_gradcheck_fp64_and_opcheck():
    x, values, indices, bias = _case(16)
    assert torch.autograd.gradcheck(lambda x, v, b: OP(x, v, indices, 8, 16, b), (x, values, bias))
    result = torch.library.opcheck(OP.default, (x, values, indices, 8, 16, bias))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("in_features", [16, 18, 20])
def test_gradients_match_the_reference_except_on_padding(in_features):
    x, values, indices, bias = _case(in_features)
    OP(x, values, indices, 8, in_features, bias).square().sum().backward()
    ref = [t.detach().clone().requires_grad_(True) for t in (x, values, bias)]
    ops.balanced_linear_reference(
        ref[0], ref[1], indices, 8, in_features, ref[2]
    ).square().sum().backward()
    _, padding = ops._entry_columns(values, indices, 8, in_features)
    torch.testing.assert_close(x.grad, ref[0].grad)
    torch.testing.assert_close(bias.grad, ref[2].grad)
    torch.testing.assert_close(values.grad[~padding], ref[1].grad[~padding])
    assert (values.grad[padding] == 0).all()
    # a short last bank of r columns keeps round(k * r / 8) weights: the rest is padding
    k, r = 4, in_features % 8
    per_row = 0 if r == 0 else k - bank_layout(in_features, 8, k)[1]
    assert int(padding.sum()) == per_row * values.size(0)


def test_sgd_on_values_keeps_the_balanced_pattern():
    x, values, indices, bias = _case(20, torch.float32)
    opt = torch.optim.SGD([values, bias], lr=0.5)
    target = torch.randn(2, 3, 6)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (OP(x.detach(), values, indices, 8, 20, bias) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    full, last = bank_counts(unpack_balanced(values.detach(), indices, 8, 20), 8)
    assert int(full.max()) <= 4 and int(last.max()) <= bank_layout(20, 8, 4)[1]
