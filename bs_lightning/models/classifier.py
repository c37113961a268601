"""Common LightningModule logic of the classifiers: cross-entropy, accuracy."""

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from bs_lightning.models.recipe_module import RecipeModule


class ClassifierModule(RecipeModule):
    """Base of the classifiers. Subclasses build `self.net` (`[batch, *input_shape]` ->
    logits `[batch, num_classes]`) after calling `super().__init__`.

    Logs `{train,val,test}/loss` and `{train,val,test}/acc` (top-1 accuracy).

    Args:
        num_classes: output classes, >= 2.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer` (read back from `self.hparams`).

    Raises:
        ValueError: naming the model class, for `num_classes < 2` or a bad optimizer setting.
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
        super().__init__(
            "num_classes", num_classes, optimizer, lr, weight_decay, lr_decay, lr_decay_start
        )
        # one metric object per stage (keys "train"... would clash with Module.train)
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [batch, *input_shape]` -> logits `[batch, num_classes]`."""
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch  # [batch, *input_shape], [batch]
        logits = self(x)  # [batch, num_classes]
        loss = F.cross_entropy(logits, y)
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        self._log_stage(stage, loss, "acc", acc, prog_bar=True)
        return loss
