"""The CPU tile layout and balanced_linear_tiled, against the masked dense product.

Random cases draw a fresh seed every run (printed in the failure message to reproduce).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers.kernels import assert_close_to_dense, fresh_seed, make_case, make_layer_case

from bs_lightning import ops
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.ops import CPU_DENSE_MIN_BATCH_ENV

op = torch.ops.bs_lightning.balanced_linear_tiled if ops.load() else None


@pytest.fixture(scope="module", autouse=True)
def compiled_op():
    assert ops.load(), f"kernels failed to build: {ops._build.last_error()}"


def tiled(values, indices):
    return ops.pack_tiles(values, indices)


def test_pack_tiles_layout_and_round_trip():
    values = torch.arange(1.0, 1.0 + 18 * 4).view(18, 4)  # 18 rows: two tiles, 14 pad rows
    indices = (torch.arange(18 * 4) % 7).to(torch.uint8).view(18, 4)
    tv, ti = ops.pack_tiles(values, indices)
    assert tv.shape == ti.shape == (2, 4, 16)
    assert torch.equal(tv[0, :, 3], values[3])  # lane l of tile t is row 16 t + l
    assert torch.equal(ti[1, :, 1], indices[17])
    assert not tv[1, :, 2:].any() and not ti[1, :, 2:].any()  # padding rows are zero
    back_v, back_i = ops.unpack_tiles(tv, ti, 18)
    assert torch.equal(back_v, values) and torch.equal(back_i, indices)


def test_hand_case_short_last_bank():
    # in=10, B=4, k=2 (as test_ops): columns 0, 3, 5, 6, 9 of row 0
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]])
    indices = torch.tensor([[0, 3, 1, 2, 1, 1]], dtype=torch.uint8)
    x = torch.arange(1.0, 11.0)[None]
    tv, ti = tiled(values, indices)
    expected = torch.tensor([[1 * 1 + 2 * 4 + 3 * 6 + 4 * 7 + 5 * 10.0]])
    assert torch.equal(op(x, tv, ti, 4, 10, 1, None), expected)
    assert torch.equal(op(x.expand(5, 10), tv, ti, 4, 10, 1, None), expected.expand(5, 1))


# 1..8 run one pass per tile, 9+ several (past the rule's crossover the op unpacks: below)
BATCHES = [1, 2, 5, 8, 9, 16, 23, 64, 130, 300]


@pytest.mark.parametrize("batch", [1, 130])
def test_the_unpack_path_matches_masked_dense(batch, monkeypatch):
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "1")  # every batch unpacks + GEMM
    check_random_cases(batch)


def test_the_crossover_rule_and_its_override(monkeypatch):
    never = 1 << 62
    rule = ops.dense_crossover(16, 32)  # half kept
    assert rule in (128, never)
    assert ops.dense_crossover(3, 32) == never  # 90.6%: the kernel wins at every batch
    assert ops.dense_crossover(12, 32) in (512, never) and ops.dense_crossover(12, 32) >= rule
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "7")
    assert ops.dense_crossover(3, 32) == 7
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "zero")
    with pytest.raises(
        ValueError, match="BS_LIGHTNING_CPU_DENSE_MIN_BATCH must be an integer >= 1"
    ):
        ops.dense_crossover(3, 32)


@pytest.mark.parametrize("batch", BATCHES)
def test_random_cases_match_masked_dense(batch):
    check_random_cases(batch)


def check_random_cases(batch: int) -> None:
    """Four random layers (bank, shape, sparsity, bias) at `batch` rows against dense."""
    seed = fresh_seed()
    for _ in range(4):
        bank_size = random.choice([1, 4, 5, 8, 16, 17, 32, 33, 48, 64])
        inn = random.randint(bank_size, 3 * bank_size + 40)
        out = random.randint(1, 70)
        sparsity = random.uniform(0.5, min(0.97, 1 - 1 / bank_size)) if bank_size > 1 else 0.0
        weight, values, indices = make_case(out, inn, bank_size, sparsity)
        bias = torch.randn(out) if random.random() < 0.5 else None
        x = torch.randn(batch, inn)
        what = f"out={out} in={inn} B={bank_size} s={sparsity:.2f} bias={bias is not None}"
        tv, ti = tiled(values, indices)
        assert_close_to_dense(op(x, tv, ti, bank_size, inn, out, bias), x, weight, bias, seed, what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [1, 12, 200])
def test_other_dtypes(dtype, batch):
    seed = fresh_seed()
    weight, values, indices, bias, x = make_layer_case(45, 200, 32, 0.5, batch, dtype)
    tv, ti = tiled(values, indices)
    y = op(x, tv, ti, 32, 200, 45, bias)
    assert_close_to_dense(y, x, weight, bias, seed, str(dtype))


def test_wide_rows_keep_blocked_accuracy():
    # 12000 columns at 50%: 6000 entries per row, summed in blocks like a GEMM
    seed = fresh_seed()
    weight, values, indices = make_case(40, 12000, 32, 0.5)
    x = torch.randn(3, 12000)
    tv, ti = tiled(values, indices)
    assert_close_to_dense(op(x, tv, ti, 32, 12000, 40, None), x, weight, None, seed)


def test_leading_dims_and_non_contiguous_input():
    seed = fresh_seed()
    weight, values, indices = make_case(20, 96, 32, 0.75)
    tv, ti = tiled(values, indices)
    x = torch.randn(96, 2, 3).permute(1, 2, 0)  # [2, 3, 96], non-contiguous
    y = op(x, tv, ti, 32, 96, 20, None)
    assert y.shape == (2, 3, 20)
    assert_close_to_dense(y.reshape(6, 20), x.reshape(6, 96), weight, None, seed)


def test_opcheck_and_compile():
    _, values, indices = make_case(24, 96, 32, 0.9)
    tv, ti = tiled(values, indices)
    for x, bias in [(torch.randn(3, 96), torch.randn(24)), (torch.randn(2, 4, 96), None)]:
        torch.library.opcheck(op, (x, tv, ti, 32, 96, 24, bias))

    def layer(x):
        return ops.balanced_linear_tiled(x, tv, ti, 32, 96, 24) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 96)
    torch.testing.assert_close(compiled(x), layer(x))


def test_reference_fallback(monkeypatch):
    seed = fresh_seed()
    weight, values, indices = make_case(30, 70, 16, 0.75)
    tv, ti = tiled(values, indices)
    x = torch.randn(4, 70)
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    assert not ops.cpu_tiles_supported(16)
    assert_close_to_dense(ops.balanced_linear_tiled(x, tv, ti, 16, 70, 30), x, weight, None, seed)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(bank_size=128), ValueError, r"bank_size must be in 1\.\.64"),
        (
            dict(out_features=40),
            ValueError,
            r"values must have shape \[ceil\(out_features / 16\) = 3",
        ),
        (dict(in_features=50), ValueError, r"x must have shape \[\.\.\., in_features=50\]"),
        (dict(indices="int"), TypeError, r"indices must be torch.uint8"),
        (dict(bias="short"), ValueError, r"bias must have shape \[out_features=20\]"),
    ],
)
@pytest.mark.parametrize("variant", ["compiled", "python"])
def test_input_errors_name_the_argument(variant, change, error, match):
    _, values, indices = make_case(20, 64, 16, 0.75)
    tv, ti = tiled(values, indices)
    args = dict(
        x=torch.randn(2, 64),
        values=tv,
        indices=ti,
        bank_size=16,
        in_features=64,
        out_features=20,
        bias=None,
    )
    if change.get("indices") == "int":
        change = dict(indices=ti.int())
    if change.get("bias") == "short":
        change = dict(bias=torch.randn(3))
    args.update(change)
    fn = op if variant == "compiled" else ops.check_tiled_inputs
    with pytest.raises(error, match=match):
        fn(*args.values())


# --- the module's kernel choice and its derived caches ----------------------------------------


def _layer(out=40, inn=96, bank=32, sparsity=0.9, bias=True):
    dense = torch.nn.Linear(inn, out, bias=bias)
    return dense, BalancedSparseLinear.from_dense(dense, bank, sparsity=sparsity)


def test_module_uses_tiles_and_rebuilds_them_when_weights_change():
    dense, sparse = _layer()
    x = torch.randn(3, 96)
    torch.testing.assert_close(sparse(x), sparse.to_dense()(x))
    kinds = {key[-1] for key in sparse._kernel_cache}
    assert kinds == ({"tiles"} if ops.cpu_tiles_supported(32) else set())
    # in place (as load_state_dict does): the cached tiles must not be reused
    other = BalancedSparseLinear.from_dense(torch.nn.Linear(96, 40), 32, sparsity=0.9)
    sparse.load_state_dict(other.state_dict())
    torch.testing.assert_close(sparse(x), other(x))
    with torch.no_grad():
        sparse.values.mul_(2.0)
    torch.testing.assert_close(sparse(x), F.linear(x, 2 * other.to_dense().weight, other.bias))


@torch.no_grad()  # inference: products that record autograd pack their tiles in the graph
def test_module_dense_fallback_at_large_batch_and_low_sparsity(monkeypatch):
    # the rule's crossover depends on the CPU (never on an AVX-512 AMD): pin it
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "128")
    _, sparse = _layer(sparsity=0.5)
    big = torch.randn(ops.dense_crossover(16, 32), 96)
    expected = sparse.to_dense()(big)
    torch.testing.assert_close(sparse(big), expected)
    if ops.cpu_tiles_supported(32):
        assert any(key[-1] == "dense" for key in sparse._kernel_cache)
    sparse._kernel_cache.clear()
    sparse.dense_fallback = False  # unpacks inside the op instead, keeps no dense copy
    torch.testing.assert_close(sparse(big), expected)
    assert not any(key[-1] == "dense" for key in sparse._kernel_cache)


def test_module_caches_are_dropped_on_to_and_not_saved():
    _, sparse = _layer()
    x = torch.randn(2, 96)
    sparse(x)
    state = sparse.state_dict()
    assert set(state) == {"values", "indices", "layout", "bias"}
    sparse.to(torch.float64)
    assert not sparse._kernel_cache
    torch.testing.assert_close(sparse(x.double()), sparse.to_dense()(x.double()))


@torch.no_grad()
def test_module_planned_calls_notice_every_weight_change(monkeypatch):
    # the rule's crossover depends on the CPU (never on an AVX-512 AMD): pin it
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "128")
    _, sparse = _layer()
    x = torch.randn(1, 96)
    torch.testing.assert_close(sparse(x), sparse.to_dense()(x))
    if not ops.cpu_tiles_supported(32):
        pytest.skip("no tile kernel in this build")
    assert "" in sparse._tile_plans  # the next calls take the planned path
    other = BalancedSparseLinear.from_dense(torch.nn.Linear(96, 40), 32, sparsity=0.9)
    # .data = keeps the tensor object and its version: the data pointer gives it away
    sparse.values.data = other.values.clone()
    sparse.indices.data = other.indices.clone()
    sparse.bias.data = other.bias.clone()
    torch.testing.assert_close(sparse(x), other(x))
    # a new parameter object
    sparse.values = torch.nn.Parameter(other.values * 3.0)
    expected = F.linear(x, 3.0 * other.to_dense().weight, other.bias)
    torch.testing.assert_close(sparse(x), expected)
    # past the dense crossover the cached dense copy runs, plan or not
    _, half = _layer(sparsity=0.5)
    torch.testing.assert_close(half(x), half.to_dense()(x))
    big = torch.randn(ops.dense_crossover(half.k, 32), 96)
    torch.testing.assert_close(half(big), half.to_dense()(big))
    assert ("", None, "dense") in half._kernel_cache
    sparse.to(torch.float64)
    assert not sparse._tile_plans
    torch.testing.assert_close(sparse(x.double()), sparse.to_dense()(x.double()))
