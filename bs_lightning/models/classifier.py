"""Common LightningModule logic of the image classifiers: cross-entropy, accuracy."""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from bs_lightning.models.optim import build_optimizer, check_optim_args


class ClassifierModule(pl.LightningModule):
    """Base of the classifiers. Subclasses build `self.net` (`[batch, *input_shape]` ->
    logits `[batch, num_classes]`) after calling `super().__init__`.

    Logs `{train,val,test}/loss` and `{train,val,test}/acc` (top-1 accuracy).
    """

    test_metric = "test/acc"
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        optimizer: str,
        lr: float,
        weight_decay: float,
        momentum: float,
        lr_decay: float,
        lr_decay_start: int,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if num_classes < 2:
            raise ValueError(f"{owner}: num_classes must be >= 2, got {num_classes}")
        check_optim_args(owner, optimizer, lr, weight_decay, lr_decay, lr_decay_start)
        # one metric object per stage (keys "train"... would clash with Module.train)
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [batch, *input_shape]` -> logits `[batch, num_classes]`."""
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.hparams)
