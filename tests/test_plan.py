"""The sparsity plan: from the callback's checkpoint to conversion, through save/load, and the
pattern registry it carries."""

import copy
import json

import pytest
import torch
from conftest import TinyZoo, quiet_trainer, random_loader
from helpers import tiny_bert
from transformers import BertForSequenceClassification

from bs_lightning import BalancedPruningCallback, SparsityPlan, convert_to_sparse
from bs_lightning.hf import load_sparse, prune_and_convert, save_sparse
from bs_lightning.hf.io import MARKER_FILE
from bs_lightning.nn import BalancedSparseConv1D, BalancedSparseLinear
from bs_lightning.nn.format import infer_bank_layout
from bs_lightning.sparsity import (
    PATTERNS,
    BalancedPattern,
    PlannedParam,
    UnstructuredPattern,
    make_pattern,
    matrix_view,
    pattern_from_dict,
)

X = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(1))


def _bank16_pruner() -> BalancedPruningCallback:
    """Bank 16, k=2 (87.5%) on TinyZoo's head, proj and LSTM."""
    include = ["head", "proj", "lstm"]
    return BalancedPruningCallback(
        sparsity=0.875, bank_size=16, frequency=2, end_step=4, include=include, verbose=False
    )


def _fit(pruner, epochs=1, ckpt_path=None):
    """TinyZoo (seed 0) trained with `pruner`; returns the model and its trainer."""
    torch.manual_seed(0)
    model = TinyZoo()
    trainer = quiet_trainer([pruner], max_epochs=epochs)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return model, trainer


def _fit_bank16(tmp_path):
    """TinyZoo pruned by `_bank16_pruner` for one epoch, and a checkpoint of it."""
    pruner = _bank16_pruner()
    model, trainer = _fit(pruner)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return model, pruner, path


def test_checkpoint_plan_converts_a_fresh_model_as_planned(tmp_path):
    model, pruner, path = _fit_bank16(tmp_path)
    plan = SparsityPlan.from_checkpoint(path)
    assert plan == pruner.plan
    assert plan["proj.weight"].compact_layout == (16, 2)
    assert plan["lstm.weight_hh_l1_reverse"].sparsity == 0.875

    fresh = TinyZoo.load_from_checkpoint(path).eval()  # a new model: nothing recorded for it
    assert SparsityPlan.recorded(fresh) is None
    expected = fresh(X)
    # the proj rows have 32 columns: a bank-16, k=2 mask is also a valid bank-32, k=4 mask
    view = matrix_view(fresh.proj, "weight").detach()
    assert ((view != 0).reshape(16, 1, 32).sum(-1) <= 4).all()
    converted = convert_to_sparse(copy.deepcopy(fresh), plan=plan)
    assert type(converted.proj) is BalancedSparseConv1D
    assert (converted.proj.bank_size, converted.proj.k) == (16, 2)
    assert (converted.head.bank_size, converted.head.k) == (16, 2)
    assert converted.lstm._layouts["weight_ih_l1_reverse_"][2:] == (16, 2)
    torch.testing.assert_close(converted(X), expected, rtol=1e-4, atol=1e-5)

    # the plan decides, not the zeros: a plan of bank 32, k=4 converts to exactly that
    wide = SparsityPlan(
        PlannedParam("proj", "weight", BalancedPattern(32), 0.875, 4, (32, 16))
        if e.name == "proj.weight"
        else e
        for e in plan
    )
    converted = convert_to_sparse(copy.deepcopy(fresh), plan=wide)
    assert (converted.proj.bank_size, converted.proj.k) == (32, 4)
    torch.testing.assert_close(converted(X), expected, rtol=1e-4, atol=1e-5)

    # without a plan: the documented inferred reading (the smallest balanced, sparse bank)
    inferred = convert_to_sparse(copy.deepcopy(fresh))
    assert (inferred.proj.bank_size, inferred.proj.k) == infer_bank_layout(view)
    assert inferred.proj.bank_size <= 16
    torch.testing.assert_close(inferred(X), expected, rtol=1e-4, atol=1e-5)


def test_callback_records_its_plan_for_the_trained_model(tmp_path):
    model, pruner, _ = _fit_bank16(tmp_path)
    assert SparsityPlan.recorded(model) == pruner.plan
    # a submodule gets the plan re-rooted at it
    assert SparsityPlan.recorded(model.lstm) == pruner.plan.rooted_at("lstm")
    assert [e.name for e in SparsityPlan.recorded(model.lstm)][0] == "weight_ih_l0"
    # nothing is stuck on the modules: a deep copy carries no plan
    assert SparsityPlan.recorded(copy.deepcopy(model)) is None
    assert not any(k.startswith("_bs") for m in model.modules() for k in vars(m))


def test_plan_survives_resume(tmp_path):
    _, first, path = _fit_bank16(tmp_path)
    resumed = _bank16_pruner()
    model, _ = _fit(resumed, epochs=2, ckpt_path=path)
    assert resumed.plan == first.plan
    assert SparsityPlan.recorded(model) == first.plan


def test_plan_json_round_trip(tmp_path):
    _, pruner, _ = _fit_bank16(tmp_path)
    data = json.loads(json.dumps(pruner.plan.to_dict()))
    assert SparsityPlan.from_dict(data) == pruner.plan


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"format": "other"}, r"not a sparsity plan"),
        ({"format": "bs_lightning.sparsity_plan", "version": 9}, r"version 9 is not supported"),
        (
            {"format": "bs_lightning.sparsity_plan", "version": 1, "params": [{"module": "fc"}]},
            r"has no 'param'",
        ),
        (
            {
                "format": "bs_lightning.sparsity_plan",
                "version": 1,
                "params": [
                    {
                        "module": "fc",
                        "param": "weight",
                        "pattern": {"pattern": "diagonal"},
                        "sparsity": 0.5,
                        "keep": 2,
                        "shape": [4, 4],
                    }
                ],
            },
            r"pattern must be one of",
        ),
    ],
)
def test_plan_from_bad_dict_raises(data, match):
    with pytest.raises(ValueError, match=match):
        SparsityPlan.from_dict(data)


def test_from_checkpoint_without_plan_raises(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "callbacks": {}}, path)
    with pytest.raises(ValueError, match=r"holds no sparsity plans"):
        SparsityPlan.from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        SparsityPlan.from_checkpoint(tmp_path / "missing.ckpt")


def test_duplicate_entry_raises():
    entry = PlannedParam("fc", "weight", BalancedPattern(8), 0.5, 4, (4, 8))
    with pytest.raises(ValueError, match=r"parameter 'fc.weight' is planned twice"):
        SparsityPlan([entry, entry])


def test_unstructured_plan_converts_nothing_and_warns():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    plan = SparsityPlan([PlannedParam("0", "weight", UnstructuredPattern(), 0.5, 16, (4, 8))])
    with pytest.warns(
        UserWarning, match=r"layers pruned to \['unstructured'\] stay dense.*\['0'\]"
    ):
        convert_to_sparse(model, plan=plan)
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_registered_pattern_round_trips(name):
    pattern = make_pattern(name, bank_size=8, n=1, m=4, block_size=2, vector_size=3)
    assert type(pattern) is PATTERNS[name] and pattern.name == name
    assert pattern_from_dict(json.loads(json.dumps(pattern.to_dict()))) == pattern
    assert pattern.describe().startswith(name) and pattern.label.startswith(name)
    w = torch.randn(8, 16)
    keep = pattern.keep(w, 0.75 if name != "nm" else 0.75)
    mask = pattern.mask(w, keep)
    assert mask.shape == w.shape and 0 < int(mask.sum()) < w.numel()
    # only the patterns stored with in-bank indices convert
    assert pattern.converts == (name in ("balanced", "nm"))


def test_pattern_from_dict_rejects_foreign_options():
    with pytest.raises(ValueError, match=r"pattern 'balanced' has no option\(s\) \['m'\]"):
        pattern_from_dict({"pattern": "balanced", "bank_size": 8, "m": 4})
    with pytest.raises(ValueError, match=r"unknown pattern option\(s\) \['bank'\]"):
        make_pattern("balanced", bank=8)


def test_plan_survives_save_and_load_sparse(tmp_path):
    model = tiny_bert(BertForSequenceClassification, num_labels=2)
    prune_and_convert(model, 0.75, bank_size=16)
    plan = SparsityPlan.recorded(model)
    assert len(plan) == 12 and {e.compact_layout for e in plan} == {(16, 4)}
    save_sparse(model, tmp_path)
    marker = json.loads((tmp_path / MARKER_FILE).read_text())
    assert SparsityPlan.from_dict(marker["plan"]) == plan
    loaded = load_sparse(tmp_path)
    assert SparsityPlan.recorded(loaded) == plan
    layer = loaded.get_submodule("bert.encoder.layer.1.output.dense")
    assert type(layer) is BalancedSparseLinear and (layer.bank_size, layer.k) == (16, 4)


def test_version_1_folder_loads_with_a_plan_read_off_its_layers(tmp_path):
    model = tiny_bert(BertForSequenceClassification, num_labels=2)
    prune_and_convert(model, 0.5, bank_size=8)
    save_sparse(model, tmp_path)
    marker_path = tmp_path / MARKER_FILE
    marker = json.loads(marker_path.read_text())
    del marker["plan"]
    marker["format_version"] = 1
    marker_path.write_text(json.dumps(marker))
    plan = SparsityPlan.recorded(load_sparse(tmp_path))
    assert plan == SparsityPlan.recorded(model)
