"""Autograd of `balanced_linear`: gradients for x, values and bias; indices and padding fixed."""

import pytest
import torch
from torch import nn

from bs_lightning import ops, ops_backward
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.nn.format import bank_counts, unpack_balanced
from bs_lightning.sparsity import bank_layout

if not ops.load():  # the ops below exist only in the compiled library
    pytest.skip("needs the compiled library", allow_module_level=True)
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
    padding = ops_backward.padding_entries(values, indices, 8, in_features)
    if padding is None:  # whole banks: no padding
        padding = torch.zeros_like(indices, dtype=torch.bool)
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


TILED = torch.ops.bs_lightning.balanced_linear_tiled
LSTM_LAYER = torch.ops.bs_lightning.balanced_lstm_layer


@pytest.mark.parametrize("in_features", [16, 20])
def test_backward_kernels_equal_the_dense_products(in_features):
    x, values, indices, _ = _case(in_features, torch.float32)
    values = values.detach()
    dense = unpack_balanced(values, indices, 8, in_features)
    for rows in (1, 7, 300):
        grad, xs = torch.randn(rows, 6), torch.randn(rows, in_features)
        dx = torch.ops.bs_lightning.balanced_linear_grad_input(
            grad, values, indices, 8, in_features
        )
        torch.testing.assert_close(dx, grad @ dense, rtol=1e-4, atol=1e-4)
        dv = torch.ops.bs_lightning.balanced_linear_grad_values(grad, xs, indices, 8, in_features)
        full = grad.t() @ xs  # [out, in]: the entries' columns are gathered from it
        columns = torch.arange(values.size(1)) // 4 * 8 + indices.long()
        torch.testing.assert_close(dv, full.gather(1, columns), rtol=1e-4, atol=1e-4)


def test_tiled_op_gradcheck_fp64_and_opcheck():
    x, values, indices, bias = _case(16)  # whole banks: no padding entries to hold at 0
    tiles, tile_indices = ops.pack_tiles(values.detach(), indices)
    tiles.requires_grad_(True)

    def product(x, tiles, bias):
        return TILED(x, tiles, tile_indices, 8, 16, 6, bias)

    assert torch.autograd.gradcheck(product, (x, tiles, bias))
    result = torch.library.opcheck(TILED.default, (x, tiles, tile_indices, 8, 16, 6, bias))
    assert set(result.values()) == {"SUCCESS"}, result


def test_tiled_gradients_reach_row_major_values_and_skip_padding():
    x, values, indices, _ = _case(20)
    tile_indices = ops.pack_tiles(values.detach(), indices)[1]
    leaf = values.detach().clone().requires_grad_(True)
    TILED(x.detach(), ops.pack_tiles(leaf, indices)[0], tile_indices, 8, 20, 6).sum().backward()
    padding = ops_backward.padding_entries(leaf.detach(), indices, 8, 20)
    assert padding is not None and (leaf.grad[padding] == 0).all()
    assert (leaf.grad[~padding] != 0).any()


def _lstm_case(dtype):
    torch.manual_seed(0)
    sparse = BalancedSparseLinear.from_dense(nn.Linear(8, 32).to(dtype), 4, sparsity=0.5)
    tiles, tile_indices = ops.pack_tiles(sparse.values.detach(), sparse.indices)
    state = [torch.randn(5, 2, 32), torch.randn(2, 8), torch.randn(2, 8)]  # same in both dtypes
    leaves = [t.to(dtype).requires_grad_(True) for t in (*state, tiles)]
    return leaves, tile_indices


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_op_gradients_equal_its_reference(reverse):
    """The fused op (fp32) backpropagates as its step-by-step reference in fp64, which
    gradcheck verifies."""
    leaves64, ti = _lstm_case(torch.float64)

    def reference(*leaves):
        return ops_backward.lstm_layer_reference(*leaves, ti, 4, reverse)

    assert torch.autograd.gradcheck(reference, leaves64)
    leaves32, _ = _lstm_case(torch.float32)
    weights = [torch.randn(5, 2, 8), torch.randn(2, 8), torch.randn(2, 8)]
    for fn, leaves in ((LSTM_LAYER, leaves32), (reference, leaves64)):
        outs = fn(*leaves, ti, 4, reverse) if fn is LSTM_LAYER else fn(*leaves)
        sum(o.mul(w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True)).backward()
    for fused, ref in zip(leaves32, leaves64, strict=True):
        torch.testing.assert_close(fused.grad, ref.grad.float(), rtol=1e-4, atol=1e-5)
    result = torch.library.opcheck(LSTM_LAYER.default, (*leaves32, ti, 4, reverse))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("bank_size,in_features", [(8, 40), (16, 48), (32, 100), (64, 128)])
def test_tile_backward_kernels_equal_the_dense_products(bank_size, in_features):
    if not ops.cpu_tiles_supported(bank_size):
        pytest.skip("no tile kernel in this build")
    torch.manual_seed(0)
    sparse = BalancedSparseLinear.from_dense(nn.Linear(in_features, 37), bank_size, sparsity=0.75)
    values, indices = sparse.values.detach(), sparse.indices
    tiles, tile_indices = ops.pack_tiles(values, indices)
    dense = unpack_balanced(values, indices, bank_size, in_features)
    columns = ops_backward._columns(indices, bank_size, in_features)
    for rows in (1, 20, 33, 130):
        grad, xs = torch.randn(rows, 37), torch.randn(rows, in_features)
        dx = torch.ops.bs_lightning.balanced_linear_tiled_grad_input(
            grad, tiles, tile_indices, bank_size, in_features
        )
        torch.testing.assert_close(dx, grad @ dense, rtol=1e-4, atol=1e-4)
        dtiles = torch.ops.bs_lightning.balanced_linear_tiled_grad_values(
            grad, xs, tile_indices, bank_size, in_features
        )
        dv = ops.unpack_tiles(dtiles, tile_indices, 37)[0]
        torch.testing.assert_close(dv, (grad.t() @ xs).gather(1, columns), rtol=1e-4, atol=1e-4)
        assert (dtiles[-1, :, 37 - 32 :] == 0).all()  # the rows past out stay zero
