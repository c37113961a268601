"""Resuming in the middle of the schedule gives the same masks and position as a straight run."""

import pytest
import torch
from conftest import TinyZoo, quiet_trainer, random_loader

from bs_lightning import BalancedPruningCallback


def make_pruner(**overrides):
    kwargs = dict(sparsity=0.75, bank_size=8, frequency=4, end_step=28, verbose=False)
    kwargs.update(overrides)
    return BalancedPruningCallback(**kwargs)


def run(pruner, epochs, ckpt_path=None, model=None):
    torch.manual_seed(0)
    model = model or TinyZoo()
    trainer = quiet_trainer([pruner], max_epochs=epochs)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return trainer, model


def test_resume_mid_schedule_matches_straight_run(tmp_path):
    straight = make_pruner()
    _, straight_model = run(straight, epochs=5)

    first = make_pruner()
    trainer, _ = run(first, epochs=2)  # stops at step 16, schedule runs to step 28
    assert 2 < first.layers["lstm.weight_hh_l0"].keep < 8  # mid schedule
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    resumed = make_pruner()
    trainer, resumed_model = run(resumed, epochs=5, ckpt_path=tmp_path / "mid.ckpt")
    assert trainer.global_step == 40
    assert resumed.last_pruned_step == straight.last_pruned_step <= 28
    assert resumed._resolved_end == straight._resolved_end == 28
    for name, layer in straight.layers.items():
        assert resumed.layers[name].keep == layer.keep == 2
        assert torch.equal(resumed.layers[name].mask, layer.mask), name
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_state_dict_round_trip_keeps_schedule_position(tmp_path):
    pruner = make_pruner()
    run(pruner, epochs=1)
    state = pruner.state_dict()
    assert state["last_pruned_step"] == 4 and state["end_step"] == 28
    assert state["layers"]["head.weight"]["mask"].dtype == torch.bool
    other = make_pruner()
    other.load_state_dict(state)
    assert other._loaded is state


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"bank_size": 4},
            r"checkpoint was pruned with bank_size=8 but this callback has bank_size=4",
        ),
        (
            {"pattern": "unstructured"},
            r"checkpoint was pruned with pattern='balanced' but this callback has pattern='unstructured'",
        ),
    ],
)
def test_load_state_dict_mismatch_raises(overrides, match):
    pruner = make_pruner()
    run(pruner, epochs=1)
    with pytest.raises(ValueError, match=match):
        make_pruner(**overrides).load_state_dict(pruner.state_dict())


def test_resume_with_other_selection_raises(tmp_path):
    first = make_pruner()
    trainer, _ = run(first, epochs=1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(
        ValueError,
        match=r"checkpoint prunes \[.*'conv.weight'.*\] but this callback selects \['head.weight'\]",
    ):
        run(make_pruner(include="head"), epochs=2, ckpt_path=tmp_path / "a.ckpt")
