"""The fused LSTM time step `torch.ops.bs_lightning.balanced_lstm_cell` (CUDA only) and
`BalancedSparseLSTM`'s CUDA step loop built on it, against float64 references.

Error rule as in test_cuda_kernels.py: at most twice the error of PyTorch's own unfused step
(`F.linear`, `sigmoid`, `tanh` in the same dtype) plus 1e-6 of the output scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.op_calls import OpCalls
from torch import nn

from bs_lightning import _build, ops
from bs_lightning.nn import BalancedSparseLSTM
from bs_lightning.nn.cuda_graph import CudaGraphRunner
from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import balanced_mask

CELL = "bs_lightning::balanced_lstm_cell"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module", autouse=True)
def compiled_cuda():
    assert ops.load(), f"kernels did not build: {_build.last_error()}"
    assert hasattr(torch.ops.bs_lightning, "balanced_lstm_cell"), _build.describe()


def cell_reference(gates_x, h, c, weight):
    """One LSTM step in the inputs' dtype (PyTorch's own precision) or float64."""
    i, f, g, o = (gates_x + F.linear(h, weight)).chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def make_step(batch, hidden, bank_size, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4 * hidden, hidden, generator=g) / hidden**0.5
    w = (w * balanced_mask(w, sparsity, bank_size)).to(dtype).float()
    values, indices, _ = pack_balanced(w, bank_size)
    gates_x, h, c = (
        torch.randn(*shape, generator=g).to(dtype).cuda()
        for shape in ((batch, 4 * hidden), (batch, hidden), (batch, hidden))
    )
    return gates_x, h, c, values.to(dtype).cuda(), indices.cuda(), w.double().cuda()


def assert_step_close(got, gates_x, h, c, w64):
    ref = cell_reference(gates_x.double(), h.double(), c.double(), w64)
    torch_own = cell_reference(gates_x, h, c, w64.to(h.dtype))
    for out, r, t in zip(got, ref, torch_own, strict=True):
        assert out.shape == h.shape and out.dtype == h.dtype
        assert not torch.isnan(out).any(), "unwritten (NaN) elements"
        err = (out.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        assert err <= 2 * err_torch + 1e-6 * r.abs().max().item(), (err, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8, 11])
@pytest.mark.parametrize(
    ("hidden", "bank_size", "sparsity"), [(1500, 50, 0.9), (1500, 32, 0.9), (96, 16, 0.5)]
)
def test_cell_matches_reference(dtype, batch, hidden, bank_size, sparsity):
    gates_x, h, c, values, indices, w64 = make_step(batch, hidden, bank_size, sparsity, dtype, 1)
    poison = [torch.full_like(h, float("nan")) for _ in range(8)]  # freed blocks of h's size
    del poison
    got = torch.ops.bs_lightning.balanced_lstm_cell(gates_x, h, c, values, indices, bank_size)
    assert_step_close(got, gates_x, h, c, w64)


def test_cell_with_misaligned_weights():
    """Values one element past a 16-byte boundary: the scalar-load kernel."""
    gates_x, h, c, values, indices, w64 = make_step(2, 200, 20, 0.8, torch.float16, 2)
    buf = torch.empty(values.numel() + 1, dtype=values.dtype, device="cuda")
    v_off = buf[1:].view_as(values).copy_(values)
    got = torch.ops.bs_lightning.balanced_lstm_cell(gates_x, h, c, v_off, indices, 20)
    assert_step_close(got, gates_x, h, c, w64)


def test_cell_errors_are_clear():
    gates_x, h, c, values, indices, _ = make_step(2, 64, 16, 0.75, torch.float16, 3)
    cell = torch.ops.bs_lightning.balanced_lstm_cell
    with pytest.raises(ValueError, match=r"gates_x must have shape \[2, 256\]"):
        cell(gates_x[:, :128], h, c, values, indices, 16)
    with pytest.raises(TypeError, match="c and gates_x must have h's dtype"):
        cell(gates_x, h, c.float(), values, indices, 16)
    with pytest.raises(ValueError, match=r"values must have 4 \* hidden = 256 rows"):
        cell(gates_x, h, c, values[:128], indices[:128], 16)
    with pytest.raises(ValueError, match=r"c shape \[2, 32\] must equal h shape \[2, 64\]"):
        cell(gates_x, h, c[:, :32], values, indices, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_runs_the_fused_step_and_replays_it(dtype):
    """BalancedSparseLSTM on CUDA runs one fused step per time step and layer; its error
    against the module in float64 (same rounded weights, unfused) is at most twice cuDNN's
    in the same dtype; the captured step loop replays it exactly."""
    torch.manual_seed(0)
    dense = nn.LSTM(80, 120, num_layers=2).eval()
    sparse = BalancedSparseLSTM.from_dense(dense, 20, sparsity=0.8).to("cuda", dtype).eval()
    sparse64 = copy.deepcopy(sparse).double()
    twin = sparse.to_dense().eval()  # cuDNN on the same rounded weights
    x = torch.randn(7, 2, 80, device="cuda").to(dtype)
    with torch.no_grad(), OpCalls(CELL) as calls:
        fused = sparse(x)
    assert calls.count == 7 * 2
    with torch.no_grad():
        torch_own = twin(x)
        ref = sparse64(x.double())
    for got, own, want in zip(
        (fused[0], *fused[1]), (torch_own[0], *torch_own[1]), (ref[0], *ref[1]), strict=True
    ):
        err = (got.double() - want).abs().max().item()
        err_torch = (own.double() - want).abs().max().item()
        assert err <= 2 * err_torch + 1e-6 * want.abs().max().item(), (err, err_torch)
    graphed_out, (graphed_h, _) = CudaGraphRunner(sparse, [x])(x)
    torch.testing.assert_close(graphed_out, fused[0], rtol=0, atol=0)
    torch.testing.assert_close(graphed_h, fused[1][0], rtol=0, atol=0)
