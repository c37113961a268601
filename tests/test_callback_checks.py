"""Inputs the callback refuses or warns about: unconvertible banks, targets that prune nothing,
resumes that would regrow weights or ignore end_step, NaN weights, tied weights, a failed fit."""

import pytest
import torch
from conftest import TinyZoo, quiet_trainer, random_loader
from torch import nn

from bs_lightning import BalancedPruningCallback
from bs_lightning.sparsity import find_prunable


def _pruner(**overrides):
    kwargs = dict(sparsity=0.75, bank_size=8, frequency=2, end_step=4, verbose=False)
    kwargs.update(overrides)
    return BalancedPruningCallback(**kwargs)


def _fit(pruner, epochs=1, ckpt_path=None, model=None):
    torch.manual_seed(0)
    model = model or TinyZoo()
    trainer = quiet_trainer([pruner], max_epochs=epochs)
    trainer.fit(model, random_loader(), ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bank_size": 300}, r"bank_size=300 is more than 256: a converted layer stores"),
        ({"pattern": "nm", "n": 2, "m": 512}, r"m=512 is more than 256"),
    ],
)
def test_banks_that_cannot_convert_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedPruningCallback(**kwargs)


def test_target_that_prunes_nothing_warns():
    with pytest.warns(UserWarning, match=r"sparsity 0.1 at bank 4 prunes nothing"):
        BalancedPruningCallback(sparsity=0.1, bank_size=4)


def test_resume_with_a_lower_sparsity_raises(tmp_path):
    trainer, _ = _fit(_pruner())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"the keep-count never goes up"):
        _fit(_pruner(sparsity=0.5), epochs=2, ckpt_path=tmp_path / "a.ckpt")


def test_resume_with_another_end_step_is_refused_and_none_honours_it(tmp_path):
    trainer, _ = _fit(_pruner(end_step=12))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(
        ValueError, match=r"checkpoint was pruned with end_step=12 but this callback has end_step=6"
    ):
        _fit(_pruner(end_step=6), epochs=2, ckpt_path=tmp_path / "a.ckpt")
    resumed = _pruner(end_step=None)
    _fit(resumed, epochs=2, ckpt_path=tmp_path / "a.ckpt")
    assert resumed._resolved_end == 12  # the checkpoint's schedule, not the default


def test_nan_weights_at_a_mask_update_raise_naming_the_layer():
    torch.manual_seed(0)
    model = TinyZoo()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'head.weight' has NaN or inf weights at step 0"):
        _fit(_pruner(), model=model)


class _Failing(TinyZoo):
    def training_step(self, batch, batch_idx):
        if self.global_step >= 1:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_failed_fit_removes_the_optimizer_hooks():
    pruner = _pruner()
    torch.manual_seed(0)
    trainer = quiet_trainer([pruner])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(_Failing(), random_loader())
    assert pruner._hooks == []
    (optimizer,) = trainer.optimizers
    assert not optimizer._optimizer_step_post_hooks


class _TiedHead(nn.Module):
    """A Linear head declared before the embedding it shares its weight with."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 40, bias=False)
        self.embed = nn.Embedding(40, 16)
        self.embed.weight = self.head.weight
        self.fc = nn.Linear(16, 16)


def test_tied_embedding_weight_is_pruned_only_when_asked():
    model = _TiedHead()
    assert [p.name for p in find_prunable(model)] == ["fc.weight"]
    assert [p.name for p in find_prunable(model, include="head.weight")] == ["head.weight"]
