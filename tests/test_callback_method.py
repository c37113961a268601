"""BalancedPruningCallback(method="wanda" | "sparsegpt"): one-shot pruning at start_step from
the train dataloader's first batches, equal to prune_calibrated_ on the same model and batches."""

import copy
from itertools import islice

import pytest
import torch
from conftest import TinyZoo, quiet_trainer, random_loader

from bs_lightning import BalancedPruningCallback
from bs_lightning.sparsity import find_prunable, make_pattern
from bs_lightning.sparsity.oneshot import prune_calibrated_

# every layer whose inputs calibrate: Conv2d, GPT-2 Conv1D, Linear (not the LSTM, not the
# attention's projections, whose module forward nn.MultiheadAttention never calls)
INCLUDE = ["conv", "proj", "encoder.linear*", "head"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_one_shot_method_equals_prune_calibrated(method):
    torch.manual_seed(0)
    model = TinyZoo(lr=0.0, optimizer="sgd")  # training leaves the weights as pruned
    reference = copy.deepcopy(model).eval()
    pruner = BalancedPruningCallback(
        0.75,
        bank_size=8,
        schedule="one_shot",
        start_step=2,
        include=INCLUDE,
        method=method,
        calibration_batches=3,
        verbose=False,
    )
    quiet_trainer([pruner]).fit(model, random_loader())
    params = find_prunable(reference, INCLUDE)
    batches = list(islice(iter(random_loader()), 3))
    prune_calibrated_(
        lambda batch: reference(batch[0]), params, make_pattern("balanced", bank_size=8), 0.75,
        method, batches,
    )  # fmt: skip
    assert pruner.last_pruned_step == 2
    assert {layer.keep for layer in pruner.layers.values()} == {2}
    fitted = dict(model.named_parameters())
    for p in params:
        torch.testing.assert_close(fitted[p.name].detach(), p.param.detach(), rtol=0, atol=1e-6)
        layer = pruner.layers[p.name]
        assert torch.equal(layer.mask, p.param.detach() != 0) or method == "sparsegpt"
        assert (fitted[p.name].detach()[~layer.mask] == 0).all()
    assert model.training  # back in train mode after calibration


def test_sparsegpt_changes_kept_weights_and_wanda_does_not():
    torch.manual_seed(0)
    dense = TinyZoo(lr=0.0, optimizer="sgd")
    kept_changed = {}
    for method in ("wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        pruner = BalancedPruningCallback(
            0.5, bank_size=8, schedule="one_shot", include=["head"], method=method,
            calibration_batches=2, verbose=False,
        )  # fmt: skip
        quiet_trainer([pruner]).fit(model, random_loader())
        mask = pruner.layers["head.weight"].mask
        kept_changed[method] = not torch.equal(model.head.weight[mask], dense.head.weight[mask])
    assert kept_changed == {"wanda": False, "sparsegpt": True}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "sparsegpt"}, r"method 'sparsegpt' chooses the masks once.*got 'cubic'"),
        ({"method": "obs", "schedule": "one_shot"}, r"method must be one of \['magnitude'"),
        (
            {"method": "wanda", "schedule": "one_shot", "calibration_batches": 0},
            "calibration_batches must be an integer >= 1, got 0",
        ),
        (
            {"method": "wanda", "schedule": "one_shot", "calibration_forward": 3},
            "calibration_forward must be callable",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedPruningCallback(0.5, bank_size=8, **kwargs)


@pytest.mark.parametrize(
    ("include", "match"),
    [
        (None, r"lstm.weight_ih_l0: its parameter 'weight_ih_l0'"),
        (["head", "encoder.self_attn.out_proj"], r"out_proj.weight: it is nn.MultiheadAtt"),
    ],
)
def test_layer_that_cannot_calibrate_fails_at_setup_before_any_change(include, match):
    model = TinyZoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = BalancedPruningCallback(
        0.5, bank_size=8, schedule="one_shot", method="sparsegpt", include=include
    )
    with pytest.raises(TypeError, match=match):
        quiet_trainer([pruner]).fit(model, random_loader())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
