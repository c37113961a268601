"""The balanced_linear op: compiled CPU kernel and reference against the masked dense product.

Random cases draw a fresh seed every run (printed in the failure message to reproduce).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import assert_close_to_dense, fresh_seed, make_case, make_layer_case

from bs_lightning import ops

op = torch.ops.bs_lightning.balanced_linear if ops.load() else None


@pytest.fixture(scope="module", autouse=True)
def compiled_op():
    """Every test here needs the compiled library (the build must work on the test machine)."""
    assert ops.load(), f"kernels failed to build: {ops._build.last_error()}"
    assert ops.backend("cpu") == "compiled-cpu"


# --- hand cases -----------------------------------------------------------------------------


def test_hand_case_bank4_keep2():
    # B=4, k=2 on [[1..8]] keeps [[0,0,3,4,0,0,7,8]] (DESIGN.md section 5).
    values = torch.tensor([[3.0, 4.0, 7.0, 8.0]])
    indices = torch.tensor([[2, 3, 2, 3]], dtype=torch.uint8)
    x = torch.eye(8)
    expected = torch.tensor([[0.0, 0, 3, 4, 0, 0, 7, 8]]).t()
    assert torch.equal(op(x, values, indices, 4, 8, None), expected)
    assert torch.equal(ops.balanced_linear_reference(x, values, indices, 4, 8), expected)
    ones = torch.ones(1, 8)
    bias = torch.tensor([0.5])
    assert torch.equal(op(ones, values, indices, 4, 8, bias), torch.tensor([[22.5]]))


def test_hand_case_short_last_bank_padding_counts_once():
    # in=10, B=4: banks [0..3], [4..7], [8, 9]; k=2; the short bank pads with a zero value.
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]])
    indices = torch.tensor([[0, 3, 1, 2, 1, 1]], dtype=torch.uint8)
    x = torch.arange(1.0, 11.0)[None]  # columns 0, 3, 5, 6, 9 -> x = 1, 4, 6, 7, 10
    expected = torch.tensor([[1 * 1 + 2 * 4 + 3 * 6 + 4 * 7 + 5 * 10.0]])
    assert torch.equal(op(x, values, indices, 4, 10, None), expected)
    assert torch.equal(op(x.expand(3, 10), values, indices, 4, 10, None), expected.expand(3, 1))


# --- random cases against the masked dense product --------------------------------------------

BATCHES = [1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 100, 257]


@pytest.mark.parametrize("batch", BATCHES)
def test_random_cases_match_masked_dense(batch):
    seed = fresh_seed()
    for _ in range(3):
        bank_size = random.choice([4, 5, 8, 16, 32, 50, 64, 128, 256])
        inn = random.randint(bank_size, 3 * bank_size + 40)
        out = random.randint(1, 70)
        # at most 0.97, and never so high that a bank keeps nothing (keep_count raises)
        sparsity = random.uniform(0.5, min(0.97, 1 - 1 / bank_size))
        weight, values, indices = make_case(out, inn, bank_size, sparsity)
        bias = torch.randn(out) if random.random() < 0.5 else None
        x = torch.randn(batch, inn)
        what = f"out={out} in={inn} B={bank_size} s={sparsity:.2f} bias={bias is not None}"
        y = op(x, values, indices, bank_size, inn, bias)
        assert_close_to_dense(y, x, weight, bias, seed, what)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_batch_4096(sparsity):
    # 50% takes the dense fallback at this batch, 90% the sparse tile kernel.
    seed = fresh_seed()
    weight, values, indices, bias, x = make_layer_case(48, 160, 32, sparsity, 4096)
    assert_close_to_dense(op(x, values, indices, 32, 160, bias), x, weight, bias, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_layer_in_column_chunks(dtype):
    # 9000 columns at bank 8: the batch-64 tile kernel splits each row into column chunks
    seed = fresh_seed()
    weight, values, indices, bias, x = make_layer_case(24, 9000, 8, 0.75, 64, dtype)
    assert_close_to_dense(op(x, values, indices, 8, 9000, bias), x, weight, bias, seed)


def test_two_threads_split_rows():
    seed = fresh_seed()
    weight, values, indices = make_case(203, 300, 32, 0.9)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for batch in (1, 5, 40):
            x = torch.randn(batch, 300)
            y = op(x, values, indices, 32, 300, None)
            assert_close_to_dense(y, x, weight, None, seed, f"batch={batch}")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 6, 40])
def test_leading_dims_and_non_contiguous_inputs(batch):
    seed = fresh_seed()
    weight, values, indices = make_case(37, 96, 16, 0.75)
    bias = torch.randn(37)
    x3 = torch.randn(2, batch, 96)
    y3 = op(x3, values, indices, 16, 96, bias)
    assert y3.shape == (2, batch, 37)
    assert_close_to_dense(y3, x3, weight, bias, seed, "3-D")
    transposed = torch.randn(96, 2 * batch).t()  # strides (1, 2*batch)
    assert_close_to_dense(
        op(transposed, values, indices, 16, 96, bias), transposed, weight, bias, seed, "t()"
    )
    strided = torch.randn(batch, 192)[:, ::2]
    assert_close_to_dense(
        op(strided, values, indices, 16, 96, bias), strided, weight, bias, seed, "step 2"
    )
    column = torch.randn(96, 1)
    broadcast = column.t().expand(batch, 96)  # stride 0 over the batch
    assert_close_to_dense(
        op(broadcast, values, indices, 16, 96, None), broadcast, weight, None, seed, "expand"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [1, 12, 70])
def test_other_dtypes(dtype, batch):
    # bf16/fp16 run the kernels with fp32 accumulation; fp64 takes the dense path.
    seed = fresh_seed()
    weight, values, indices, bias, x = make_layer_case(45, 200, 32, 0.875, batch, dtype)
    assert_close_to_dense(op(x, values, indices, 32, 200, bias), x, weight, bias, seed, str(dtype))


def test_one_dimensional_input():
    seed = fresh_seed()
    weight, values, indices = make_case(19, 64, 16, 0.75)
    x = torch.randn(64)
    y = op(x, values, indices, 16, 64, None)
    assert y.shape == (19,)
    assert_close_to_dense(y, x, weight, None, seed)
    assert op(x.to("meta"), values.to("meta"), indices.to("meta"), 16, 64, None).shape == (19,)


def test_empty_batch_and_empty_output():
    _, values, indices = make_case(5, 64, 32, 0.9)
    assert op(torch.randn(0, 64), values, indices, 32, 64, None).shape == (0, 5)
    assert op(torch.randn(3, 0, 64), values, indices, 32, 64, None).shape == (3, 0, 5)
    no_rows = op(torch.randn(4, 64), values[:0], indices[:0], 32, 64, None)
    assert no_rows.shape == (4, 0)


def test_reference_matches_masked_dense():
    seed = fresh_seed()
    weight, values, indices = make_case(30, 77, 8, 0.75)
    bias = torch.randn(30)
    x = torch.randn(3, 5, 77)
    y = ops.balanced_linear_reference(x, values, indices, 8, 77, bias)
    assert_close_to_dense(y, x, weight, bias, seed)


# --- dispatch, fallback, torch.compile, opcheck ----------------------------------------------


def test_entry_uses_compiled_op_and_forced_reference(monkeypatch):
    seed = fresh_seed()
    weight, values, indices = make_case(20, 64, 16, 0.75)
    x = torch.randn(4, 64)
    compiled = ops.balanced_linear(x, values, indices, 16, 64)
    assert torch.equal(compiled, op(x, values, indices, 16, 64, None))
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    assert ops.backend("cpu") == "reference"
    reference = ops.balanced_linear(x, values, indices, 16, 64)
    assert torch.equal(reference, ops.balanced_linear_reference(x, values, indices, 16, 64))
    assert_close_to_dense(reference, x, weight, None, seed)


def opcheck_cases():
    torch.manual_seed(0)
    cases = []
    for shape, out, inn, bank, sparsity, bias in [
        ((1, 64), 16, 64, 16, 0.75, False),
        ((9, 70), 12, 70, 32, 0.9, True),
        ((2, 3, 40), 8, 40, 8, 0.5, True),
    ]:
        _, values, indices = make_case(out, inn, bank, sparsity)
        b = torch.randn(out) if bias else None
        cases.append((torch.randn(shape), values, indices, bank, inn, b))
    return cases


@pytest.mark.parametrize("args", opcheck_cases())
def test_opcheck(args):
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    seed = fresh_seed()
    weight, values, indices = make_case(24, 96, 32, 0.9)
    bias = torch.randn(24)

    def layer(x):
        return torch.relu(ops.balanced_linear(x, values, indices, 32, 96, bias)) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for shape in [(3, 96), (2, 5, 96)]:
        x = torch.randn(shape)
        expected = torch.relu(F.linear(x, weight, bias)) * 2.0
        torch.testing.assert_close(compiled(x), expected, msg=f"seed={seed} {shape}")


def test_fake_tensor_shapes():
    _, values, indices = make_case(24, 96, 32, 0.9)
    x = torch.empty(7, 3, 96, device="meta")
    y = op(x, values.to("meta"), indices.to("meta"), 32, 96, None)
    assert y.shape == (7, 3, 24) and y.device.type == "meta"


# --- errors: the same checks in the compiled op, the reference and the fake -------------------

VARIANTS = {
    "compiled": lambda *a: op(*a),
    "reference": lambda *a: ops.balanced_linear_reference(*a),
    "fake": lambda *a: op(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in a)),
}


def error_cases():
    values = torch.randn(6, 8)  # in=64, B=32 -> 2 banks, k=4
    indices = torch.randint(0, 32, (6, 8), dtype=torch.uint8)
    x = torch.randn(3, 64)
    return [
        (TypeError, "indices must be torch.uint8", (x, values, indices.long(), 32, 64, None)),
        (TypeError, r"values.dtype \(torch.float64\)", (x, values.double(), indices, 32, 64, None)),
        (TypeError, "x must be floating point", (x.long(), values, indices, 32, 64, None)),
        (
            TypeError,
            r"bias.dtype \(torch.float16\)",
            (x, values, indices, 32, 64, torch.ones(6).half()),
        ),
        (ValueError, r"bank_size must be in 1..256 .*got 300", (x, values, indices, 300, 64, None)),
        (ValueError, "bank_size must be in 1..256", (x, values, indices, 0, 64, None)),
        (ValueError, "in_features must be >= 1", (x, values, indices, 32, 0, None)),
        (ValueError, r"shape \[..., in_features=65\]", (x, values, indices, 32, 65, None)),
        (ValueError, "values must be 2-D", (x, values.flatten(), indices.flatten(), 32, 64, None)),
        (ValueError, "indices shape", (x, values, indices[:, :4], 32, 64, None)),
        (
            ValueError,
            r"multiple of n_banks = .* = 3",
            (x[:, :48].contiguous(), values[:, :7], indices[:, :7], 16, 48, None),
        ),
        (
            ValueError,
            "k = 8 per bank exceeds bank_size = 4",
            (x[:, :4].contiguous(), values, indices, 4, 4, None),
        ),
        (
            ValueError,
            r"bias must have shape \[out=6\]",
            (x, values, indices, 32, 64, torch.ones(5)),
        ),
    ]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("error,match,args", error_cases())
def test_input_errors(variant, error, match, args):
    with pytest.raises(error, match=match):
        VARIANTS[variant](*args)


def test_device_mismatch_error():
    x = torch.randn(3, 64)
    values = torch.randn(6, 8)
    indices = torch.zeros(6, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must be on the same device"):
        ops.check_inputs(x, values.to("meta"), indices, 32, 64, None)
    with pytest.raises(ValueError, match="must be on x's device"):
        ops.check_inputs(x, values, indices, 32, 64, torch.ones(6, device="meta"))


def test_reference_rejects_index_past_in_features():
    values = torch.ones(1, 4)
    indices = torch.tensor([[0, 1, 0, 3]], dtype=torch.uint8)  # last bank has 2 columns
    with pytest.raises(ValueError, match="past in_features = 6"):
        ops.balanced_linear_reference(torch.ones(1, 6), values, indices, 4, 6)
