"""CUDA kernels of `balanced_linear` (csrc/cuda/) against a float64 reference.

Error rule (flash-attention's): the kernel's max abs error against the float64 product of the
same (dtype-rounded) weights and inputs is at most twice the error of PyTorch's own dense
`F.linear` in that dtype, plus a floor of 1e-6 of the output scale for sums that both get
exactly right. Every case draws fresh random data (never zeros).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bs_lightning import _build, ops
from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import balanced_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DENSE_ENV = "BS_LIGHTNING_CUDA_DENSE_MIN_BATCH"  # crossover override read by the CUDA op
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def compiled_cuda():
    assert ops.load(), f"kernels did not build: {_build.last_error()}"
    assert ops.backend("cuda") == "compiled-cuda", _build.describe()


def make_layer(out, in_features, bank_size, sparsity, dtype, seed, bias=True):
    """Random balanced layer on the GPU.

    Returns:
        `(values [out, n_banks*k], indices, w64 [out, in] float64, bias [out] or None)`;
        `w64` holds exactly the dtype-rounded weights the kernel sees.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_features, generator=g)
    w = (w * balanced_mask(w, sparsity, bank_size)).to(dtype).float()
    values, indices, _ = pack_balanced(w, bank_size)
    b = torch.randn(out, generator=g).to(dtype).cuda() if bias else None
    return values.to(dtype).cuda(), indices.cuda(), w.double().cuda(), b


def rand_x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).cuda()


def assert_close_to_reference(y, x, w64, bias):
    """flash-attention rule against the float64 product; no NaN anywhere."""
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], w64.shape[0])
    assert not torch.isnan(y).any(), "output has NaN (unwritten or bad) elements"
    b64 = bias.double() if bias is not None else None
    ref = F.linear(x.double(), w64, b64)
    dense = F.linear(x, w64.to(x.dtype), bias)
    err = (y.double() - ref).abs().max().item()
    err_torch = (dense.double() - ref).abs().max().item()
    floor = 1e-6 * ref.abs().max().item()
    assert err <= 2 * err_torch + floor, f"error {err:.3g} vs PyTorch's {err_torch:.3g}"


def run(x, values, indices, bank_size, in_features, bias):
    return torch.ops.bs_lightning.balanced_linear(x, values, indices, bank_size, in_features, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 13, 64, 257, 4096])
def test_dtypes_and_batches(dtype, batch):
    values, indices, w64, bias = make_layer(300, 1000, 32, 0.9, dtype, seed=batch)
    x = rand_x((batch, 1000), dtype, seed=batch + 1)
    assert_close_to_reference(run(x, values, indices, 32, 1000, bias), x, w64, bias)


BANK_SPARSITY = [
    (b, s)
    for b in (4, 16, 32, 50, 128, 256)
    for s in (0.5, 0.75, 0.9, 0.97)
    if round(b * (1 - s)) >= 1
]


@pytest.mark.parametrize(("bank_size", "sparsity"), BANK_SPARSITY)
@pytest.mark.parametrize("batch", [1, 8])
def test_bank_sizes_sparsities_odd_shapes(bank_size, sparsity, batch):
    # 77 rows; a short last bank of bank_size // 2 + 1 columns.
    in_features = 2 * bank_size + bank_size // 2 + 1
    values, indices, w64, bias = make_layer(77, in_features, bank_size, sparsity, torch.float16, 7)
    x = rand_x((batch, in_features), torch.float16, seed=bank_size)
    assert_close_to_reference(run(x, values, indices, bank_size, in_features, bias), x, w64, bias)


@pytest.mark.parametrize("batch", [1, 6, 300])
@pytest.mark.parametrize("min_batch", ["1", "100000"])
def test_gather_and_dense_paths_agree(monkeypatch, batch, min_batch):
    """Both sides of the batch crossover (forced through the override) compute the product."""
    monkeypatch.setenv(DENSE_ENV, min_batch)
    values, indices, w64, bias = make_layer(129, 777, 50, 0.9, torch.float16, 3)
    x = rand_x((batch, 777), torch.float16, seed=4)
    assert_close_to_reference(run(x, values, indices, 50, 777, bias), x, w64, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_weights_and_input(dtype):
    """Storage offsets of one element: no 16-byte loads possible, scalar fallbacks."""
    values, indices, w64, bias = make_layer(65, 512, 32, 0.9, dtype, 5)
    v_buf = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")
    i_buf = torch.empty(indices.numel() + 1, dtype=torch.uint8, device="cuda")
    v_off = v_buf[1:].view_as(values).copy_(values)
    i_off = i_buf[1:].view_as(indices).copy_(indices)
    assert v_off.data_ptr() % 16 != 0 and i_off.data_ptr() % 2 != 0
    for batch in (1, 3, 8):
        x_buf = rand_x((batch * 512 + 1,), dtype, seed=batch)
        x = x_buf[1:].view(batch, 512)
        assert_close_to_reference(run(x, v_off, i_off, 32, 512, bias), x, w64, bias)


def test_leading_shapes_and_non_contiguous_input():
    values, indices, w64, bias = make_layer(96, 640, 32, 0.75, torch.float16, 11)
    x3 = rand_x((2, 3, 5, 640), torch.float16, seed=1)
    assert_close_to_reference(run(x3, values, indices, 32, 640, bias), x3, w64, bias)
    x_t = rand_x((640, 6), torch.float16, seed=2).t()  # [6, 640], stride (1, 6)
    assert not x_t.is_contiguous()
    assert_close_to_reference(run(x_t, values, indices, 32, 640, None), x_t, w64, None)
    x_s = rand_x((4, 1280), torch.float16, seed=3)[:, ::2]  # [4, 640], stride (1280, 2)
    assert_close_to_reference(run(x_s, values, indices, 32, 640, bias), x_s, w64, bias)


@pytest.mark.parametrize("batch", [1, 8, 37])
def test_every_output_element_written(batch):
    """Free NaN-filled blocks of the output's size first, so the op's output reuses them."""
    values, indices, w64, bias = make_layer(333, 960, 32, 0.9, torch.float16, 13)
    x = rand_x((batch, 960), torch.float16, seed=batch)
    poison = [torch.full((batch, 333), float("nan"), dtype=torch.float16, device="cuda")]
    poison += [torch.full_like(poison[0], float("nan")) for _ in range(7)]
    del poison
    assert_close_to_reference(run(x, values, indices, 32, 960, bias), x, w64, bias)


@pytest.mark.parametrize(("in_features", "dtype"), [(25088, torch.float16), (60000, torch.float32)])
@pytest.mark.parametrize("batch", [1, 8])
def test_long_rows(in_features, dtype, batch):
    """Multi-pass rows, fewer batch columns per block when x is long, dense fallback when
    even one column of x does not fit in shared memory (60000 fp32 = 240 KB)."""
    values, indices, w64, bias = make_layer(48, in_features, 32, 0.9, dtype, 17)
    x = rand_x((batch, in_features), dtype, seed=batch)
    assert_close_to_reference(run(x, values, indices, 32, in_features, bias), x, w64, bias)


def test_float64_runs_dense_product():
    values, indices, w64, bias = make_layer(40, 200, 20, 0.8, torch.float64, 19)
    x = rand_x((3, 200), torch.float64, seed=0)
    y = run(x, values, indices, 20, 200, bias)
    torch.testing.assert_close(y, F.linear(x, w64, bias))


@pytest.mark.parametrize("batch", [1, 8, 300])
def test_inside_cuda_graph(batch):
    values, indices, w64, bias = make_layer(200, 1500, 50, 0.9, torch.float16, 23)
    static_x = rand_x((batch, 1500), torch.float16, seed=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        run(static_x, values, indices, 50, 1500, bias)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = run(static_x, values, indices, 50, 1500, bias)
    for seed in (1, 2):
        static_x.copy_(rand_x((batch, 1500), torch.float16, seed=seed))
        graph.replay()
        assert_close_to_reference(static_y, static_x, w64, bias)


def test_errors_are_clear(monkeypatch):
    values, indices, _, bias = make_layer(16, 64, 16, 0.75, torch.float16, 29)
    x = rand_x((2, 64), torch.float16, seed=0)
    with pytest.raises(ValueError, match="must be on the same device"):
        run(x.cpu(), values, indices, 16, 64, None)
    with pytest.raises(TypeError, match=r"values.dtype \(.*\) must equal x.dtype"):
        run(x.float(), values, indices, 16, 64, None)
    with pytest.raises(TypeError, match="indices must be torch.uint8"):
        run(x, values, indices.long(), 16, 64, None)
    with pytest.raises(ValueError, match=r"bias must have shape \[out=16\]"):
        run(x, values, indices, 16, 64, bias[:8])
    with pytest.raises(ValueError, match=r"x must have shape \[..., in_features=64\]"):
        run(x[:, :32], values, indices, 16, 64, None)
    monkeypatch.setenv(DENSE_ENV, "zero")
    with pytest.raises(ValueError, match=f"{DENSE_ENV} must be an integer >= 1"):
        run(x, values, indices, 16, 64, None)
