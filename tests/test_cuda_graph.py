"""`CudaGraphRunner` (bs_lightning/nn/cuda_graph.py) and the sparse modules on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning import ops
from bs_lightning.nn import (
    BalancedSparseConv1D,
    BalancedSparseConv2d,
    BalancedSparseLinear,
    BalancedSparseLSTM,
)
from bs_lightning.nn.cuda_graph import CudaGraphRunner

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_runner_rejects_cpu_and_missing_inputs():
    with pytest.raises(ValueError, match=r"example_inputs\[0\] must be a CUDA tensor, got cpu"):
        CudaGraphRunner(torch.sigmoid, [torch.randn(3)])
    with pytest.raises(ValueError, match=r"example_inputs\[0\] must be a CUDA tensor, got int"):
        CudaGraphRunner(torch.sigmoid, [3])
    with pytest.raises(ValueError, match="needs at least one example input"):
        CudaGraphRunner(torch.sigmoid, [])


def sparse_lstm(dtype):
    torch.manual_seed(0)
    dense = nn.LSTM(64, 96, num_layers=2).eval()
    return BalancedSparseLSTM.from_dense(dense, 16, sparsity=0.75).to("cuda", dtype).eval()


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch", [1, 3])
def test_lstm_step_loop_replays_like_eager(dtype, batch):
    assert ops.load() and ops.backend("cuda") == "compiled-cuda"
    lstm = sparse_lstm(dtype)
    x0 = torch.randn(12, batch, 64, device="cuda", dtype=dtype)
    runner = CudaGraphRunner(lstm, [x0])
    for _ in range(2):
        x = torch.randn(12, batch, 64, device="cuda", dtype=dtype)
        out, (h, c) = runner(x)
        with torch.no_grad():
            ref_out, (ref_h, ref_c) = lstm(x)
        # Same kernels in the same order; only cuBLAS (the input projection may take the
        # dense path) may pick another algorithm under capture: rounding-level differences.
        tol = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 2e-3}
        torch.testing.assert_close(out, ref_out, **tol)
        torch.testing.assert_close(h, ref_h, **tol)
        torch.testing.assert_close(c, ref_c, **tol)
    with pytest.raises(ValueError, match=r"input 0 has shape \(5, 1, 64\)"):
        runner(torch.randn(5, 1, 64, device="cuda", dtype=dtype))
    with pytest.raises(ValueError, match="expected 1 inputs, got 2"):
        runner(x, x)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize(
    "make",
    [
        lambda: (BalancedSparseLinear, nn.Linear(300, 130), (7, 300)),
        lambda: (BalancedSparseConv2d, nn.Conv2d(8, 24, 3, padding=1), (2, 8, 9, 9)),
        lambda: (BalancedSparseConv1D, Conv1D(130, 300), (2, 5, 300)),
        lambda: (BalancedSparseLSTM, nn.LSTM(48, 64, num_layers=2), (9, 2, 48)),
    ],
    ids=["linear", "conv2d", "conv1d", "lstm"],
)
def test_modules_on_cuda_match_their_dense_equivalent(make):
    """fp32 on the GPU: the sparse module (CUDA kernels) vs `to_dense()` (cuDNN/cuBLAS)."""
    assert ops.load() and ops.backend("cuda") == "compiled-cuda"
    torch.manual_seed(0)
    cls, dense, shape = make()
    sparse = cls.from_dense(dense.eval(), 8, sparsity=0.75).cuda().eval()
    ref = sparse.to_dense().cuda().eval()
    x = torch.randn(*shape, device="cuda")
    with torch.no_grad():
        got, want = sparse(x), ref(x)
    if isinstance(got, tuple):  # LSTM: (output, (h, c))
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
