"""Base LightningModule of the recipes' models: the data-dependent size and the optimizer
settings checked at construction, one `_step(batch, stage)` behind the train/val/test steps,
the logging of a stage's loss and metric, the optimizer set-up (`bs_lightning.models.optim`)."""

import lightning.pytorch as pl
import torch
from torchmetrics import Metric

from bs_lightning.models.optim import build_optimizer, check_optim_args


class RecipeModule(pl.LightningModule):
    """Base of `ClassifierModule` and `LanguageModelModule`.

    Subclasses implement `_step(batch, stage) -> loss` for `stage` "train", "val" or "test"
    and log through `_log_stage`. The concrete models call `save_hyperparameters()`;
    `configure_optimizers` reads the optimizer settings back from `self.hparams`, so a model
    rebuilt from its checkpoint's hyperparameters gets the same optimizer.

    Args:
        size_name: name of the size argument from the data module's `model_kwargs()`
            ("num_classes", "vocab_size"), for the message.
        size: its value; >= 2 (with one class or one word there is nothing to predict).
        optimizer, lr, weight_decay, lr_decay, lr_decay_start: only checked here; see
            `bs_lightning.models.optim.build_optimizer` for their meaning.

    Raises:
        ValueError: naming the model class and the parameter, for `size < 2` or a bad
            optimizer setting (the size first).
    """

    def __init__(
        self,
        size_name: str,
        size: int,
        optimizer: str,
        lr: float,
        weight_decay: float,
        lr_decay: float,
        lr_decay_start: int,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if size < 2:
            raise ValueError(f"{owner}: {size_name} must be >= 2, got {size}")
        check_optim_args(owner, optimizer, lr, weight_decay, lr_decay, lr_decay_start)

    def _step(self, batch, stage: str) -> torch.Tensor:
        """One batch of `stage` ("train", "val" or "test"): log and return the loss `[]`."""
        raise NotImplementedError

    def _log_stage(
        self, stage: str, loss: torch.Tensor, name: str, metric: Metric, **loss_kwargs
    ) -> None:
        """Log `{stage}/loss` and `{stage}/{name}` (e.g. "val/acc").

        Args:
            stage: "train", "val" or "test".
            loss: the batch's loss `[]`; logged per step too while training, else per epoch.
            name: the metric's name in the key.
            metric: the stage's metric object, already updated with the batch; logged per
                epoch and shown in the progress bar.
            **loss_kwargs: extra `self.log` arguments for the loss (`prog_bar`, `batch_size`).
        """
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, **loss_kwargs)
        self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        return build_optimizer(self, self.hparams)
