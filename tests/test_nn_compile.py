"""Converted modules under torch.compile(fullgraph=True) run the same tile kernel as eager."""

import pytest
import torch
from torch import nn

from bs_lightning import convert_to_sparse, ops
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.ops import CPU_DENSE_MIN_BATCH_ENV
from bs_lightning.sparsity import BalancedPattern, find_prunable, prune_once_

pytestmark = pytest.mark.skipif(
    not (ops.load() and ops.cpu_tiles_supported(32)),
    reason="the CPU tile kernel needs the compiled library built for AVX2 or AVX-512",
)


def _converted(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16)).eval()
    plan = prune_once_(find_prunable(model), BalancedPattern(32), 0.875)
    return convert_to_sparse(model, plan=plan)


def _ops_in_graph(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the bs_lightning ops in the graph Dynamo captures (fullgraph)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(x)
    return [
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and "bs_lightning" in str(node.target)
    ]


def test_compiled_graph_calls_the_tile_kernel_below_the_crossover():
    model = _converted()
    names = _ops_in_graph(model, torch.randn(4, 64))
    assert len(names) == 2 and all("balanced_linear_tiled" in n for n in names), names


def test_compiled_graph_takes_the_general_op_for_row_slices():
    attn = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    plan = prune_once_(find_prunable(attn), BalancedPattern(32), 0.875)
    sparse = convert_to_sparse(attn, plan=plan)
    q, kv = torch.randn(2, 3, 64), torch.randn(2, 5, 64)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = sparse

        def forward(self, q):
            return self.attn(q, kv, kv, need_weights=False)[0]

    names = _ops_in_graph(Cross(), q)
    # query rows and key/value rows are slices: the row-major op; out_proj: the tile kernel
    assert sorted(n.rsplit(".", 1)[-1] for n in names) == [
        "balanced_linear",
        "balanced_linear",
        "balanced_linear_tiled",
    ], names


def test_inductor_fullgraph_matches_eager():
    model = _converted()
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_tile_copy_follows_load_state_dict_and_refresh():
    model = _converted()
    x = torch.randn(2, 64)
    fresh = nn.Sequential(
        BalancedSparseLinear(64, 64, 32, 4), nn.ReLU(), BalancedSparseLinear(64, 16, 32, 4)
    ).eval()
    state = model.state_dict()
    assert not any("tile_" in key for key in state)  # a derived copy: never saved
    fresh.load_state_dict(state)
    # the compiled path reads the tile buffers as they are: loading must have rebuilt them
    torch.testing.assert_close(
        fresh[0]._compiled_product("", x, fresh[0].bias, None), model[0](x), rtol=0, atol=0
    )
    with torch.no_grad():
        fresh[0].values.mul_(2.0)
    fresh[0].refresh_tiles()
    doubled = fresh[0]._compiled_product("", x, None, None)
    torch.testing.assert_close(doubled, 2.0 * (model[0](x) - model[0].bias), rtol=1e-6, atol=1e-6)


def test_compiled_graph_uses_the_dense_copy_from_the_crossover_on(monkeypatch):
    # the rule's crossover depends on the CPU (never on an AVX-512 AMD): pin it
    monkeypatch.setenv(CPU_DENSE_MIN_BATCH_ENV, "128")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64)).eval()
    plan = prune_once_(find_prunable(model), BalancedPattern(32), 0.5)
    model = convert_to_sparse(model, plan=plan)
    rows = ops.dense_crossover(model[0].k, 32)
    assert rows < 2**20  # half the weights kept: the dense copy wins from some batch on
    x = torch.randn(rows, 64)
    assert _ops_in_graph(model, x) == []  # F.linear on the dense copy, no sparse op
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "lstm", "encoder"])
def test_conv_lstm_and_encoder_compile_fullgraph_on_the_eager_kernels(kind):
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(32, 32, 3, groups=2))
        x, want = torch.randn(1, 8, 6, 6), {"balanced_linear", "balanced_linear_tiled"}
    elif kind == "lstm":
        model = nn.LSTM(32, 32, num_layers=2)
        x, want = torch.randn(5, 1, 32), {"balanced_linear_tiled", "balanced_lstm_layer"}
    else:
        model = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        x, want = torch.randn(1, 6, 32), {"balanced_linear_tiled"}
    model.eval()
    plan = prune_once_(find_prunable(model), BalancedPattern(32), 0.875)
    model = convert_to_sparse(model, plan=plan)
    with torch.no_grad():
        expected = model(x)
    # the grouped conv's second layer multiplies row slices: the row-major op
    assert {n.rsplit(".", 1)[-1] for n in _ops_in_graph(model, x)} == want
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="eager", fullgraph=True)(x)
    first = (lambda out: out[0]) if kind == "lstm" else (lambda out: out)
    torch.testing.assert_close(first(got), first(expected), rtol=1e-6, atol=1e-6)
