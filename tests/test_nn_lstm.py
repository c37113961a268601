"""BalancedSparseLSTM against the masked nn.LSTM."""

import io

import pytest
import torch
from helpers.op_calls import OpCalls
from torch import nn

from bs_lightning import ops
from bs_lightning.nn import BalancedSparseLSTM, base
from bs_lightning.nn import lstm as lstm_module
from bs_lightning.nn.lstm import lstm_weight_names
from bs_lightning.sparsity import balanced_mask

ops.load()  # the skip conditions below ask which kernels this build has
CELL = "bs_lightning::balanced_lstm_cell"


def _pruned_lstm(bank, sparsity, seed=0, **kwargs):
    torch.manual_seed(seed)
    lstm = nn.LSTM(**kwargs).eval()
    with torch.no_grad():
        for name in lstm_weight_names(lstm.num_layers, lstm.bidirectional):
            weight = getattr(lstm, name)
            weight.mul_(balanced_mask(weight, sparsity, bank))
    return lstm


def _assert_same(got, expected):
    (out, (h, c)), (out_ref, (h_ref, c_ref)) = got, expected
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "bank", "sparsity", "batch"),
    [
        (dict(input_size=20, hidden_size=16), 8, 0.75, 1),
        (dict(input_size=24, hidden_size=32, num_layers=2, bidirectional=True), 8, 0.5, 3),
        (dict(input_size=40, hidden_size=32, num_layers=3, batch_first=True), 16, 0.9, 5),
        (
            dict(input_size=32, hidden_size=48, bidirectional=True, batch_first=True, bias=False),
            16,
            0.8,
            2,
        ),
    ],
)
def test_matches_masked_lstm(kwargs, bank, sparsity, batch):
    lstm = _pruned_lstm(bank, sparsity, **kwargs)
    sparse = BalancedSparseLSTM.from_dense(lstm, bank).eval()
    steps = 6
    shape = (batch, steps, lstm.input_size) if lstm.batch_first else (steps, batch, lstm.input_size)
    x = torch.randn(shape)
    _assert_same(sparse(x), lstm(x))
    directions = 2 if lstm.bidirectional else 1
    h0 = torch.randn(lstm.num_layers * directions, batch, lstm.hidden_size)
    c0 = torch.randn_like(h0)
    _assert_same(sparse(x, (h0, c0)), lstm(x, (h0, c0)))
    # unbatched input and state
    x1 = x[0] if lstm.batch_first else x[:, 0]
    _assert_same(sparse(x1, (h0[:, 0], c0[:, 0])), lstm(x1, (h0[:, 0], c0[:, 0])))
    # non-contiguous input
    x_nc = torch.randn(shape[::-1]).permute(2, 1, 0)
    _assert_same(sparse(x_nc), lstm(x_nc))


def _count_calls(monkeypatch, sparse):
    """Records the input shape of every `_product` and every fused layer call."""
    calls = []
    product, layer = sparse._product, ops.balanced_lstm_layer

    def counting_product(prefix, x, *args, **kwargs):
        calls.append(("product", tuple(x.shape)))
        return product(prefix, x, *args, **kwargs)

    def counting_layer(gates_x, *args, **kwargs):
        calls.append(("layer", tuple(gates_x.shape)))
        return layer(gates_x, *args, **kwargs)

    monkeypatch.setattr(sparse, "_product", counting_product)
    monkeypatch.setattr(ops, "balanced_lstm_layer", counting_layer)
    return calls


def test_python_loop_one_product_for_the_input_and_one_per_step(monkeypatch):
    # without the compiled CPU op (here: forced reference) the recurrence runs in Python
    monkeypatch.setenv(ops.FORCE_REFERENCE_ENV, "1")
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16, num_layers=2, bidirectional=True)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8)
    calls = _count_calls(monkeypatch, sparse)
    steps, batch = 5, 3
    x = torch.randn(steps, batch, 16)
    _assert_same(sparse(x), lstm(x))
    # per layer and direction: the whole sequence at once, then one [B, H] x [4H, H] per step
    first = [("product", (steps, batch, 16))] + [("product", (batch, 16))] * steps
    second = [("product", (steps, batch, 32))] + [("product", (batch, 16))] * steps
    assert calls == first * 2 + second * 2


@pytest.mark.skipif(not ops.cpu_tiles_supported(8), reason="needs the AVX-512/AVX2 tile kernel")
def test_fused_cpu_layer_one_call_per_layer_and_direction(monkeypatch):
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16, num_layers=2, bidirectional=True)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8)
    calls = _count_calls(monkeypatch, sparse)
    steps, batch = 5, 3
    x = torch.randn(steps, batch, 16)
    _assert_same(sparse(x), lstm(x))
    first = [("product", (steps, batch, 16)), ("layer", (steps, batch, 64))]
    second = [("product", (steps, batch, 32)), ("layer", (steps, batch, 64))]
    assert calls == first * 2 + second * 2


@pytest.mark.skipif(not ops.cpu_tiles_supported(50), reason="needs the AVX-512/AVX2 tile kernel")
@pytest.mark.parametrize("hidden, bank, batch", [(200, 50, 1), (37, 16, 4), (64, 64, 2)])
def test_fused_cpu_layer_matches_nn_lstm_with_state(hidden, bank, batch):
    # odd hidden sizes leave a masked tail in the gate loop and a padded last tile
    lstm = _pruned_lstm(bank, 0.875, input_size=hidden, hidden_size=hidden, num_layers=2)
    sparse = BalancedSparseLSTM.from_dense(lstm, bank)
    x = torch.randn(7, batch, hidden)
    h0, c0 = torch.randn(2, batch, hidden), torch.randn(2, batch, hidden)
    _assert_same(sparse(x, (h0, c0)), lstm(x, (h0, c0)))
    big = 30 * torch.randn(7, batch, hidden)  # saturated gates: exp clamps, no inf or NaN
    _assert_same(sparse(big), lstm(big))


@pytest.fixture
def fused_step_here(monkeypatch):
    """The CUDA step loop on the CPU: the fused step counts as available and the compiled
    CPU layer is skipped, so the op's CPU kernel (its PyTorch reference) runs each step."""
    if not hasattr(torch.ops.bs_lightning, "balanced_lstm_cell"):
        pytest.skip("needs the compiled kernels (the op's schema)")
    monkeypatch.setattr(lstm_module, "_fused_step_available", lambda h: True)
    monkeypatch.setattr(BalancedSparseLSTM, "_cpu_tiles", lambda self, prefix, h: None)


def test_fused_step_loop_one_cell_per_step(fused_step_here):
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=24, num_layers=2, bidirectional=True)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8).eval()
    steps, batch = 5, 3
    x = torch.randn(steps, batch, 16)
    h0, c0 = torch.randn(4, batch, 24), torch.randn(4, batch, 24)
    with torch.no_grad(), OpCalls(CELL) as calls:
        got = sparse(x, (h0, c0))
    assert calls.count == steps * 2 * 2  # every step of both layers and directions
    with torch.no_grad():
        _assert_same(got, lstm(x, (h0, c0)))


def test_fused_step_loop_left_for_autograd_and_large_batches(fused_step_here):
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8)
    x = torch.randn(4, 2, 16, requires_grad=True)
    with OpCalls(CELL) as calls:
        out, _ = sparse(x)
    assert calls.count == 0  # the fused step has no backward: PyTorch's gate ops record it
    out.sum().backward()
    assert x.grad is not None
    big = ops.cuda_dense_crossover(2, 8, 4)  # k = 2 of 8 at 75%, fp32
    with torch.no_grad(), OpCalls(CELL) as calls:
        sparse(torch.randn(2, big, 16))
    assert calls.count == 0  # past the crossover the dense copy runs the recurrent product
    with torch.no_grad(), OpCalls(CELL) as calls:
        sparse.double()(torch.randn(2, 1, 16, dtype=torch.float64))
    assert calls.count == 0  # no float64 kernel


class _FakeLayerClock:
    """`time.perf_counter` as the measured dispatch sees it: a call of the `slow` path (the
    sparse or the dense recurrence) advances it 10 units, the other 1."""

    def __init__(self, monkeypatch, slow: str):
        self.now, self.calls = 0.0, {"sparse": 0, "dense": 0}
        monkeypatch.setattr(base.time, "perf_counter", lambda: self.now)
        for path in self.calls:
            method = f"_{path}_direction"
            real = getattr(BalancedSparseLSTM, method)

            def call(module, *args, path=path, real=real):
                self.calls[path] += 1
                self.now += 10.0 if path == slow else 1.0
                return real(module, *args)

            monkeypatch.setattr(BalancedSparseLSTM, method, call)


@pytest.mark.parametrize("bias", [True, False])
def test_measured_dense_recurrence_runs_where_faster(monkeypatch, bias):
    lstm = _pruned_lstm(
        8, 0.75, input_size=16, hidden_size=24, num_layers=2, bidirectional=True, bias=bias
    )
    sparse = BalancedSparseLSTM.from_dense(lstm, 8).eval().requires_grad_(False)
    sparse.measured_dispatch = True  # tests pin the rule (conftest)
    clock = _FakeLayerClock(monkeypatch, slow="sparse")
    x, h0 = torch.randn(5, 3, 16), torch.randn(4, 3, 24)
    c0 = torch.randn_like(h0)
    with torch.inference_mode():
        _assert_same(sparse(x, (h0, c0)), lstm(x, (h0, c0)))
        choices = {key: v for key, v in sparse._dispatch.items() if key[0][2:] == ("lstm",)}
        # one choice per layer and direction, for the size class of 5 steps x 3 sequences
        assert len(choices) == 4 and all(choices.values())
        assert {size for _, size in choices} == {((5).bit_length(), (3).bit_length())}
        assert all(getattr(sparse, w + "_dense_weight").numel() for w in lstm_weight_names(2, True))
        measured = dict(clock.calls)
        _assert_same(sparse(x + 1), lstm(x + 1))  # the same size class: the cached choice
        assert clock.calls == {"sparse": measured["sparse"], "dense": measured["dense"] + 4}
        sparse(torch.randn(9, 3, 16))  # another size class measures again
        assert len([key for key in sparse._dispatch if key[0][2:] == ("lstm",)]) == 8


def test_measured_sparse_recurrence_drops_the_dense_copies(monkeypatch):
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=24, num_layers=2)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8).eval().requires_grad_(False)
    sparse.measured_dispatch = True
    clock = _FakeLayerClock(monkeypatch, slow="dense")
    x = torch.randn(5, 1, 16)
    with torch.inference_mode():
        _assert_same(sparse(x), lstm(x))
        assert clock.calls["dense"] == 2 * (base.MEASURE_REPEATS + 1)  # measured only
        assert not any(
            getattr(sparse, w + "_dense_weight").numel() for w in lstm_weight_names(2, False)
        )
        sparse(x)
    assert clock.calls["dense"] == 2 * (base.MEASURE_REPEATS + 1)


def test_recurrence_choice_left_alone_for_autograd_and_the_rule(monkeypatch):
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8)
    sparse.measured_dispatch = True
    clock = _FakeLayerClock(monkeypatch, slow="sparse")
    out, _ = sparse(torch.randn(4, 2, 16))  # the values are trainable: autograd records
    out.sum().backward()
    assert clock.calls["dense"] == 0
    sparse.measured_dispatch = False
    with torch.no_grad():
        sparse(torch.randn(4, 2, 16))
    assert clock.calls["dense"] == 0
    assert not [key for key in sparse._dispatch if key[0][2:] == ("lstm",)]


def test_fused_layer_errors_name_the_argument():
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16, num_layers=1)
    values, indices = ops.pack_tiles(
        *[
            getattr(BalancedSparseLSTM.from_dense(lstm, 8), "weight_hh_l0_" + n)
            for n in ("values", "indices")
        ]
    )
    gates, h = torch.randn(5, 2, 64), torch.randn(2, 16)
    with pytest.raises(TypeError, match="h0 must be torch.float32"):
        ops.balanced_lstm_layer(gates, h.double(), h, values, indices, 8)
    with pytest.raises(ValueError, match=r"gates_x must be \[T, B=2, 4H=64\]"):
        ops.balanced_lstm_layer(gates[..., :60], h, h, values, indices, 8)
    with pytest.raises(ValueError, match=r"values must be W_hh \[4H, H\] in the tile layout"):
        ops.balanced_lstm_layer(gates, h, h, values[:2], indices[:2], 8)
    torch.library.opcheck(
        torch.ops.bs_lightning.balanced_lstm_layer, (gates, h, h, values, indices, 8, True)
    )


def test_per_matrix_bank_sizes_and_to_dense():
    lstm = nn.LSTM(6, 32, num_layers=2).eval()
    banks = {name: (6 if name == "weight_ih_l0" else 32) for name in lstm_weight_names(2, False)}
    with torch.no_grad():
        for name, bank in banks.items():
            weight = getattr(lstm, name)
            weight.mul_(balanced_mask(weight, 0.5, bank))
    sparse = BalancedSparseLSTM.from_dense(lstm, banks)
    assert sparse._layouts["weight_ih_l0_"] == (128, 6, 6, 3)
    assert sparse._layouts["weight_hh_l1_"] == (128, 32, 32, 16)
    x = torch.randn(4, 2, 6)
    _assert_same(sparse(x), lstm(x))
    dense = sparse.to_dense()
    assert type(dense) is nn.LSTM and not dense.training
    for name in banks:
        assert torch.equal(getattr(dense, name), getattr(lstm, name)), name
    _assert_same(dense(x), lstm(x))


def test_from_dense_with_sparsity():
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 16)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8, sparsity=0.75)
    expected = lstm.weight_hh_l0 * balanced_mask(lstm.weight_hh_l0, 0.75, 8)
    assert torch.equal(sparse.to_dense().weight_hh_l0, expected)


def test_state_dict_round_trip_and_layout_error():
    lstm = _pruned_lstm(8, 0.75, input_size=16, hidden_size=16, bidirectional=True)
    sparse = BalancedSparseLSTM.from_dense(lstm, 8)
    assert "bias_l0_reverse" in sparse.state_dict() and "bias_ih_l0" not in sparse.state_dict()
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    rebuilt = BalancedSparseLSTM(16, 16, bank_size=8, k=2, bidirectional=True)
    rebuilt.load_state_dict(state)
    x = torch.randn(3, 2, 16)
    _assert_same(rebuilt(x), sparse(x))
    model = nn.ModuleDict({"rnn": BalancedSparseLSTM(16, 16, 16, 4, bidirectional=True)})
    with pytest.raises(RuntimeError, match=r"layer 'rnn': weight_ih_l0_layout .*\(64, 16, 8, 2\)"):
        model.load_state_dict({"rnn." + k: v for k, v in state.items()})


def test_errors():
    with pytest.raises(TypeError, match="expects an nn.LSTM, got GRU"):
        BalancedSparseLSTM.from_dense(nn.GRU(4, 4), 4)
    with pytest.raises(ValueError, match="LSTM 'rnn' has proj_size=4"):
        BalancedSparseLSTM.from_dense(nn.LSTM(8, 8, proj_size=4), 4, name="rnn")
    with pytest.raises(
        ValueError, match="bank_size of BalancedSparseLSTM has no entry for 'weight_hh_l0'"
    ):
        BalancedSparseLSTM(8, 8, {"weight_ih_l0": 4}, 2)
    unstructured = nn.LSTM(8, 8)
    with torch.no_grad():
        unstructured.weight_ih_l0[
            torch.rand(32, 8, generator=torch.Generator().manual_seed(0)) < 0.7
        ] = 0
    with pytest.raises(ValueError, match=r"layer 'rnn.weight_ih_l0'.*not balanced at bank_size=4"):
        BalancedSparseLSTM.from_dense(unstructured, 4, name="rnn")
    sparse = BalancedSparseLSTM(8, 8, 4, 2, num_layers=2)
    with pytest.raises(ValueError, match=r"input of BalancedSparseLSTM must be \[T, B, 8\]"):
        sparse(torch.randn(3, 2, 5))
    with pytest.raises(
        ValueError, match=r"hx of BalancedSparseLSTM must be two tensors of shape \(2, 2, 8\)"
    ):
        sparse(torch.randn(3, 2, 8), (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 8), [3, 2])
    with pytest.raises(TypeError, match="does not take a PackedSequence"):
        sparse(packed)
