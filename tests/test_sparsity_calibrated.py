"""Calibrated one-shot pruning on any nn.Module: SparseGPT's math, the stages it measures,
convolution inputs, Wanda, and the errors that come before any weight changes."""

import copy

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2
from torch import nn

from bs_lightning.hf import prune_and_convert
from bs_lightning.hf.select import select_params
from bs_lightning.sparsity import find_prunable, make_pattern
from bs_lightning.sparsity.calibration import input_rows, run_inputs, stages
from bs_lightning.sparsity.oneshot import prune_calibrated_
from bs_lightning.sparsity.sparsegpt import sparsegpt_prune


def _correlated(n_batches=4, rows=256, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    return [torch.randn(rows, cols, generator=g) @ mix for _ in range(n_batches)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sparsegpt_one_pruned_column_gets_the_least_squares_update():
    # in = 2, bank 2 keeps 1: the smaller-saliency column goes and the other absorbs its
    # effect exactly, w1' = w1 + w0 * H01 / H11 (the least-squares optimum)
    x = torch.tensor([[1.0, 0.5], [0.2, 1.0], [-0.3, 0.8], [1.0, 1.0]])
    h = x.T @ x
    w = torch.tensor([[0.1, 2.0]])
    pruned, mask = sparsegpt_prune(w, h, make_pattern("balanced", bank_size=2), 1, damp=1e-9)
    assert mask.tolist() == [[False, True]]
    expected = w[0, 1] + w[0, 0] * h[0, 1] / h[1, 1]
    torch.testing.assert_close(pruned, torch.tensor([[0.0, expected.item()]]))
    best = torch.linalg.lstsq(x[:, 1:], x @ w.T).solution
    torch.testing.assert_close(pruned[0, 1], best[0, 0])


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    # H = I: every saliency is w^2 (same scale) and no error spreads to other columns
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 32, generator=g)
    pattern = make_pattern("balanced", bank_size=8)
    pruned, mask = sparsegpt_prune(w, torch.eye(32), pattern, 2)
    assert torch.equal(mask, pattern.mask(w, 2))
    torch.testing.assert_close(pruned, w * mask)


@pytest.mark.parametrize(
    ("name", "sparsity"), [("balanced", 0.75), ("row", 0.75), ("unstructured", 0.75), ("nm", 0.5)]
)
def test_sparsegpt_reconstructs_a_layer_better_than_wanda_and_magnitude(name, sparsity):
    torch.manual_seed(0)
    layer = nn.Linear(256, 48)  # two blocks of 128 columns
    batches = _correlated(rows=512, cols=256)
    pattern = make_pattern(name, bank_size=16)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = copy.deepcopy(layer)
        params = find_prunable(pruned)
        plan, masks = prune_calibrated_(
            run_inputs(pruned), params, pattern, sparsity, method, batches
        )
        weight = pruned.weight.detach()
        assert torch.equal(masks["weight"], weight != 0)
        assert plan["weight"].keep == pattern.keep(layer.weight, sparsity)
        assert torch.equal(
            masks["weight"], pattern.mask(masks["weight"].float(), plan["weight"].keep)
        )
        with torch.no_grad():
            errors[method] = sum(float((pruned(x) - layer(x)).square().sum()) for x in batches)
    assert errors["sparsegpt"] < 0.8 * min(errors["wanda"], errors["magnitude"]), errors


def test_sparsegpt_prunes_in_call_order_from_pruned_inputs():
    torch.manual_seed(0)
    # registered out of call order: the stages follow the forward pass, not named_modules
    model = nn.Sequential()
    model.add_module("b", nn.Linear(32, 16))
    model.add_module("a", nn.Linear(16, 32))
    model.forward = lambda x: model.b(torch.relu(model.a(x)))
    params = find_prunable(model)
    ordered, once = stages(run_inputs(model), params, torch.randn(4, 16))
    assert [[p.name for p in stage] for stage in ordered] == [["a.weight"], ["b.weight"]] and once
    batches = [torch.randn(64, 16) for _ in range(3)]
    dense = copy.deepcopy(model.b)
    pattern = make_pattern("balanced", bank_size=8)
    prune_calibrated_(run_inputs(model), params, pattern, 0.5, "sparsegpt", batches)
    # b's Hessian came from a's pruned outputs: replaying that on b's dense copy agrees
    with torch.no_grad():
        xs = [torch.relu(model.a(x)) for x in batches]
    h = sum(x.T @ x for x in xs)
    expected, _ = sparsegpt_prune(dense.weight.detach(), h, pattern, 4)
    torch.testing.assert_close(model.b.weight.detach(), expected)


def test_stages_group_query_key_value():
    model = tiny_bert().eval()
    params = select_params(model)
    batch = {"input_ids": torch.randint(5, 96, (2, 8))}
    ordered, once = stages(run_inputs(model), params, batch)
    names = [[p.module_name.split(".", 3)[-1] for p in stage] for stage in ordered[:4]]
    assert names == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]
    assert once and sum(len(s) for s in ordered) == len(params)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=False),
        nn.Conv2d(3, 8, (3, 2), dilation=(1, 2), bias=False),
        nn.Conv1d(4, 6, 3, padding=2, bias=False),
    ],
)
def test_conv_inputs_as_rows_reproduce_the_convolution(conv):
    x = torch.randn(2, conv.in_channels, *([9, 10] if isinstance(conv, nn.Conv2d) else [11]))
    (p,) = find_prunable(conv)
    rows = input_rows(p, x)
    with torch.no_grad():
        out = conv(x)  # [N, out, *spatial]
        flat = out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2).reshape(-1, out.shape[1])
        torch.testing.assert_close(rows @ p.matrix().T, flat, rtol=1e-5, atol=1e-5)


def test_sparsegpt_on_a_cnn_and_a_gpt2_keeps_exact_banks():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 10))
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    pattern = make_pattern("balanced", bank_size=9)
    prune_calibrated_(run_inputs(cnn), find_prunable(cnn), pattern, 2 / 3, "sparsegpt", batches)
    banks = cnn[0].weight.detach().reshape(16, 3, 9)
    assert ((banks != 0).sum(-1) == 3).all()
    gpt2 = tiny_gpt2().eval()
    calibration = [{"input_ids": torch.randint(0, 96, (2, 12))}]
    converted = prune_and_convert(gpt2, 0.75, 16, method="sparsegpt", calibration=calibration)
    with torch.no_grad():
        assert torch.isfinite(converted(**calibration[0]).logits).all()


def test_sparsegpt_keeps_a_bert_closer_to_dense_than_magnitude():
    dense = tiny_bert().eval()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(5, 96, (4, 16), generator=g)} for _ in range(4)]
    test = {"input_ids": torch.randint(5, 96, (8, 16), generator=g)}
    with torch.no_grad():
        ref = dense(**test).last_hidden_state
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = prune_and_convert(
            copy.deepcopy(dense), 0.75, 16, method=method, calibration=batches
        )
        with torch.no_grad():
            errors[method] = float((model(**test).last_hidden_state - ref).square().mean())
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_calibration_may_be_a_generator():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    batches = (x for x in _correlated(2, 32, 16))
    pattern = make_pattern("balanced", bank_size=8)
    prune_calibrated_(run_inputs(layer), find_prunable(layer), pattern, 0.5, "sparsegpt", batches)
    assert ((layer.weight.detach().reshape(8, 2, 8) != 0).sum(-1) == 4).all()


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        (
            nn.LSTM(8, 8),
            {"method": "wanda"},
            TypeError,
            r"method 'wanda' calibrates on layer inputs.*weight_ih_l0: its parameter",
        ),
        (
            nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)),
            {"method": "sparsegpt"},
            TypeError,
            r"0.weight: it is a grouped convolution \(groups=2\)",
        ),
        (nn.Linear(16, 8), {"method": "sparsegpt", "damp": 0}, ValueError, "damp must be"),
        (nn.Linear(16, 8), {"method": "sparsegpt", "blocksize": 0}, ValueError, "blocksize"),
        (nn.Linear(16, 8), {"method": "sparsegpt", "calibration": None}, ValueError, "needs"),
        (nn.Linear(16, 8), {"method": "wanda", "sparsity": 0.99}, ValueError, "keeps"),
    ],
)
def test_bad_input_changes_nothing(model, kwargs, error, match):
    before = _state(model)
    options = {"calibration": [torch.randn(2, 4, 8, 8)], "sparsity": 0.5, **kwargs}
    calibration, sparsity = options.pop("calibration"), options.pop("sparsity")
    method = options.pop("method")
    pattern = make_pattern("balanced", bank_size=8)
    with pytest.raises(error, match=match):
        prune_calibrated_(
            run_inputs(model),
            find_prunable(model),
            pattern,
            sparsity,
            method,
            calibration,
            **options,
        )
    after = _state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_sparsegpt_narrow_last_block_keeps_its_share():
    torch.manual_seed(0)
    layer = nn.Linear(130, 8)  # blocks of 128 + 2 columns
    batches = _correlated(2, 300, 130)
    pattern = make_pattern("unstructured")
    plan, masks = prune_calibrated_(
        run_inputs(layer), find_prunable(layer), pattern, 0.75, "sparsegpt", batches
    )
    kept = int(masks["weight"].sum())
    assert abs(kept - plan["weight"].keep) <= 1 and torch.equal(masks["weight"], layer.weight != 0)
