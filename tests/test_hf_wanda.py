"""Wanda one-shot pruning in `prune_and_convert`: masks rank |w| * the input column's norm
over the calibration batches; bad methods and calibration fail before any weight changes."""

import copy

import pytest
import torch
from helpers import tiny_bert

from bs_lightning.hf import prune_and_convert
from bs_lightning.hf.select import select_params
from bs_lightning.nn.format import unpack_balanced
from bs_lightning.sparsity import balanced_mask_k


def _calibration(n_batches=3, rows=4, length=12, vocab=96):
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(5, vocab, (rows, length), generator=g)}
        for _ in range(n_batches)
    ]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_wanda_keeps_the_largest_weight_times_input_norm_per_bank():
    model = tiny_bert().eval()
    batches = _calibration()
    # the inputs of every selected layer, recorded on the dense model
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        p.module.register_forward_pre_hook(
            lambda m, args, name=p.module_name: inputs.setdefault(name, []).append(args[0])
        )
        for p in select_params(model)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    dense = copy.deepcopy(model)
    prune_and_convert(model, 0.75, 16, method="wanda", calibration=batches)
    for name, xs in inputs.items():
        weight = dense.get_submodule(name).weight.detach()
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        score = weight.abs() * x.norm(dim=0)[None, :]
        expected = balanced_mask_k(score, 16, 4)
        sparse = model.get_submodule(name)
        got = unpack_balanced(sparse.values.detach(), sparse.indices, 16, weight.shape[1]) != 0
        assert torch.equal(got, expected), name


def test_wanda_and_magnitude_choose_different_weights():
    model, batches = tiny_bert().eval(), _calibration()
    wanda = prune_and_convert(copy.deepcopy(model), 0.75, 16, method="wanda", calibration=batches)
    magnitude = prune_and_convert(copy.deepcopy(model), 0.75, 16)
    layer = "encoder.layer.0.attention.self.query"
    assert not torch.equal(
        wanda.get_submodule(layer).indices, magnitude.get_submodule(layer).indices
    )


_GOOD = {"input_ids": torch.ones(2, 4, dtype=torch.long)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"method": "obs"},
            r"method must be one of \['magnitude', 'wanda', 'sparsegpt'\], got 'obs'",
        ),
        *[
            case
            for method in ("wanda", "sparsegpt")
            for case in (
                ({"method": method}, f"method '{method}' needs calibration batches"),
                ({"method": method, "calibration": []}, "calibration is empty"),
                (
                    {"method": method, "calibration": [{"input_ids": torch.zeros(2, 4)}]},
                    "calibration batch 0 cannot be run by the model",
                ),
                (
                    {"method": method, "calibration": [{"pixel_values": torch.zeros(2, 4)}]},
                    "calibration batch 0 cannot be run by the model: .*input_ids or inputs_embeds",
                ),
                (  # a later batch fails: still before any weight changes
                    {"method": method, "calibration": [_GOOD, _GOOD, {"bad": 1}]},
                    "calibration batch 2 cannot be run by the model",
                ),
            )
        ],
    ],
)
def test_bad_method_or_calibration_changes_nothing(kwargs, match):
    model = tiny_bert().eval()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        prune_and_convert(model, 0.75, 16, **kwargs)
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
