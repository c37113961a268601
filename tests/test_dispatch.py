"""Measured dispatch: tiles or the dense copy per matrix and input size class, timed once on
the input itself (with a fake clock here: tests never time anything)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bs_lightning import ops
from bs_lightning.nn import BalancedSparseLinear, base
from bs_lightning.ops import CPU_DENSE_MIN_BATCH_ENV

pytestmark = pytest.mark.skipif(
    not (ops.load() and ops.cpu_tiles_supported(32)), reason="needs the tile kernel"
)


class FakeClock:
    """`time.perf_counter` that makes one kernel look `slow` times slower than the other."""

    def __init__(self, monkeypatch, slow_kernel: str):
        self.now, self.started, self.calls = 0.0, False, {"tiles": 0, "dense": 0}
        self.slow = slow_kernel
        real_tiled = torch.ops.bs_lightning.balanced_linear_tiled
        real_linear = F.linear
        monkeypatch.setattr(base.time, "perf_counter", self.perf_counter)
        monkeypatch.setattr(base.F, "linear", self._wrap("dense", real_linear))
        monkeypatch.setattr(base, "torch", _TorchWithOps(self._wrap("tiles", real_tiled)))

    def _wrap(self, name, fn):
        def call(*args):
            self.calls[name] += 1
            self.now += 10.0 if name == self.slow else 1.0
            return fn(*args)

        return call

    def perf_counter(self):
        return self.now


class _TorchWithOps:
    """`torch` as `nn/base.py` sees it, with `torch.ops.bs_lightning.balanced_linear_tiled`
    replaced."""

    def __init__(self, tiled):
        self.ops = type(
            "ops", (), {"bs_lightning": type("lib", (), {"balanced_linear_tiled": tiled})}
        )

    def __getattr__(self, name):
        return getattr(torch, name)


def _layer(sparsity=0.75):
    torch.manual_seed(0)
    sparse = BalancedSparseLinear.from_dense(nn.Linear(96, 40), 32, sparsity=sparsity).eval()
    sparse.measured_dispatch = True
    return sparse.requires_grad_(False)


@pytest.mark.parametrize("slow", ["tiles", "dense"])
def test_the_faster_kernel_is_chosen_once_per_size_class(monkeypatch, slow):
    sparse = _layer()
    clock = FakeClock(monkeypatch, slow)
    x32 = torch.randn(32, 96)
    torch.testing.assert_close(sparse(x32), F.linear(x32, sparse.to_dense().weight, sparse.bias))
    dense_wins = slow == "tiles"
    assert sparse._dispatch == {(("", None), (32).bit_length()): dense_wins}
    measured = dict(clock.calls)
    assert measured["tiles"] >= 3 and measured["dense"] >= 3
    # the same size class (32..63 rows) reuses the decision: one call, no timing
    sparse(torch.randn(40, 96))
    used = "dense" if dense_wins else "tiles"
    assert clock.calls[used] == measured[used] + 1
    # the dense copy is kept only where it runs
    assert bool(sparse._buffers["dense_weight"].numel()) == dense_wins
    plan = sparse._tile_plans[""]
    assert (plan.dense_weight is not None) == dense_wins
    # another size class measures again
    sparse(torch.randn(70, 96))
    assert len(sparse._dispatch) == 2


def test_one_row_is_measured_too(monkeypatch):
    # on CPUs with slow cross-lane permutes a small matrix is faster dense even at batch 1
    sparse = _layer(sparsity=0.9)  # the rule would always take the tiles
    clock = FakeClock(monkeypatch, "tiles")
    x = torch.randn(1, 96)
    torch.testing.assert_close(sparse(x), F.linear(x, sparse.to_dense().weight, sparse.bias))
    assert sparse._dispatch == {(("", None), 1): True}
    assert clock.calls["tiles"] >= 3 and clock.calls["dense"] >= 3


def test_the_switch_uses_the_rule(monkeypatch):
    # the rule's crossover depends on the CPU (never on an AVX-512 AMD): pin it
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "128")
    sparse = _layer(sparsity=0.5)
    clock = FakeClock(monkeypatch, "tiles")
    sparse.measured_dispatch = False
    sparse(torch.randn(1, 96))
    assert clock.calls == {"tiles": 1, "dense": 0}  # the rule, untimed
    rows = ops.dense_crossover(sparse.k, 32)
    sparse(torch.randn(rows, 96))
    assert sparse._dispatch[(("", None), rows.bit_length())] is True  # the rule
    assert clock.calls == {"tiles": 1, "dense": 1}  # no measurement


def test_compiled_code_follows_the_measured_choice(monkeypatch):
    sparse = _layer(sparsity=0.9)  # the rule would always take the tiles
    FakeClock(monkeypatch, "tiles")
    x = torch.randn(32, 96)
    sparse(x)
    monkeypatch.undo()
    assert sparse._dispatch[(("", None), (32).bit_length())] is True
    graph = []

    def backend(gm, inputs):
        graph.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(sparse, backend=backend, fullgraph=True)(x)
    assert not any("balanced_linear_tiled" in name for name in graph)
    torch.testing.assert_close(got, F.linear(x, sparse.to_dense().weight, sparse.bias))


def test_cuda_crossover_rule_and_override(monkeypatch):
    monkeypatch.delenv("BS_LIGHTNING_CUDA_DENSE_MIN_BATCH", raising=False)
    # N* = ceil(2 * elem_bytes * 2 / density), clamped to [2, 4096]
    assert ops.cuda_dense_crossover(3, 32, 2) == 86  # fp16 at 90.6%
    assert ops.cuda_dense_crossover(16, 32, 2) == 16  # fp16 at 50%
    assert ops.cuda_dense_crossover(32, 32, 4) == 16
    assert ops.cuda_dense_crossover(1, 256, 4) == 4096
    monkeypatch.setenv("BS_LIGHTNING_CUDA_DENSE_MIN_BATCH", "5")
    assert ops.cuda_dense_crossover(3, 32, 2) == 5
    monkeypatch.setenv("BS_LIGHTNING_CUDA_DENSE_MIN_BATCH", "zero")
    with pytest.raises(ValueError, match="BS_LIGHTNING_CUDA_DENSE_MIN_BATCH must be an integer"):
        ops.cuda_dense_crossover(3, 32, 2)
    monkeypatch.delenv("BS_LIGHTNING_CUDA_DENSE_MIN_BATCH")
    with pytest.raises(ValueError, match=r"need 1 <= k <= bank_size.*k=0"):
        ops.cuda_dense_crossover(0, 32, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_large_batch_runs_the_cached_dense_copy(monkeypatch):
    monkeypatch.delenv("BS_LIGHTNING_CUDA_DENSE_MIN_BATCH", raising=False)
    dense = nn.Linear(256, 128).cuda().half()
    layer = BalancedSparseLinear.from_dense(dense, sparsity=0.9, bank_size=32).cuda()
    layer.measured_dispatch = False  # the rule
    pruned = layer.to_dense()
    crossover = ops.cuda_dense_crossover(layer.k, 32, 2)
    with torch.inference_mode():
        small = torch.randn(crossover - 1, 256, device="cuda", dtype=torch.half)
        layer(small)
        assert layer.dense_weight.numel() == 0  # the gather kernel ran it
        big = torch.randn(crossover, 256, device="cuda", dtype=torch.half)
        torch.testing.assert_close(layer(big), pruned(big), rtol=2e-3, atol=2e-3)
        assert layer.dense_weight.shape == (128, 256)  # cached, not unpacked per call
        weight = layer.dense_weight
        layer(big)
        assert layer.dense_weight is weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_choice_is_measured_per_size_class_outside_capture():
    dense = nn.Linear(256, 128).cuda().half()
    layer = BalancedSparseLinear.from_dense(dense, sparsity=0.5, bank_size=32).cuda().eval()
    layer.measured_dispatch = True  # tests pin the rule (conftest)
    pruned = layer.to_dense()
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    key = (("", None, "cuda"), (64).bit_length())
    with torch.inference_mode():
        # a capture without a cached choice takes the rule and leaves the class unmeasured
        graph = torch.cuda.CUDAGraph()
        layer(x)  # warm-up outside the capture (lazy cuBLAS set-up): measures and caches
        layer._dispatch.clear()
        with torch.cuda.graph(graph):
            layer(x)
        assert key not in layer._dispatch
        torch.testing.assert_close(layer(x), pruned(x), rtol=2e-3, atol=2e-3)
        dense_wins = layer._dispatch[key]  # measured on that eager call
        assert bool(layer.dense_weight.numel()) == dense_wins
        layer(torch.randn(100, 256, device="cuda", dtype=torch.half))  # same class: reused
        assert len(layer._dispatch) == 1
