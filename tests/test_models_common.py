"""The models' shared base (`bs_lightning.models.recipe_module.RecipeModule`): metric names
logged per stage, the order of construction errors, the optimizer rebuilt from hparams."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from bs_lightning.models import LSTMLanguageModel, MLPClassifier
from bs_lightning.models.recipe_module import RecipeModule

torch.set_num_threads(1)


def _fit_and_test(model: pl.LightningModule, batches: list) -> tuple[set[str], set[str]]:
    """Fit one epoch and test on `batches` (already batched); return the logged keys."""
    loader = DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader, loader)
    fit_keys = set(trainer.callback_metrics)
    test_keys = set(trainer.test(model, loader, verbose=False)[0])
    return fit_keys, test_keys


@pytest.mark.parametrize(
    ("build", "batch", "name"),
    [
        (
            lambda: MLPClassifier(3, (4,), [8]),
            lambda: (torch.randn(5, 4), torch.randint(0, 3, (5,))),
            "acc",
        ),
        (
            lambda: LSTMLanguageModel(7, 4, 4, dropout=0.0),
            lambda: (torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3))),
            "ppl",
        ),
    ],
)
def test_each_stage_logs_its_loss_and_metric(build, batch, name):
    torch.manual_seed(0)
    model = build()
    assert isinstance(model, RecipeModule) and model.test_metric == f"test/{name}"
    fit_keys, test_keys = _fit_and_test(model, [batch() for _ in range(2)])
    # the training loss is logged per step and per epoch, everything else per epoch only
    train = {"train/loss", "train/loss_step", "train/loss_epoch", f"train/{name}"}
    assert fit_keys == train | {"val/loss", f"val/{name}"}
    assert test_keys == {"test/loss", f"test/{name}"}


def test_the_size_is_checked_before_the_optimizer_settings():
    with pytest.raises(ValueError, match="MLPClassifier: num_classes must be >= 2, got 1"):
        MLPClassifier(1, (4,), lr=0)
    with pytest.raises(ValueError, match="LSTMLanguageModel: vocab_size must be >= 2, got 0"):
        LSTMLanguageModel(0, optimizer="adam")


def test_optimizer_comes_from_the_saved_hyperparameters():
    model = MLPClassifier(3, (4,), [8], optimizer="sgd", lr=0.5, momentum=0.7, weight_decay=0.1)
    rebuilt = MLPClassifier(**model.hparams)
    optimizer = rebuilt.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.7, 0.1)
