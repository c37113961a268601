"""Optimizer and learning-rate schedule shared by the models (one dict maps names to
classes, one place validates them)."""

import torch

OPTIMIZERS = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}


def check_optim_args(
    owner: str, optimizer: str, lr: float, weight_decay: float, lr_decay: float, lr_decay_start: int
) -> None:
    """Validate the optimizer settings of a model at construction.

    Raises:
        ValueError: naming `owner` and the parameter, for an unknown optimizer, `lr <= 0`,
            `weight_decay < 0`, `lr_decay` outside (0, 1] or `lr_decay_start < 0`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"{owner}: unknown optimizer {optimizer!r}; valid values: {sorted(OPTIMIZERS)}"
        )
    if lr <= 0:
        raise ValueError(f"{owner}: lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"{owner}: weight_decay must be >= 0, got {weight_decay}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"{owner}: lr_decay must be in (0, 1], got {lr_decay}")
    if lr_decay_start < 0:
        raise ValueError(f"{owner}: lr_decay_start must be >= 0, got {lr_decay_start}")


def build_optimizer(module: torch.nn.Module, hp) -> dict:
    """Optimizer plus a per-epoch exponential decay, as `configure_optimizers` returns them.

    Args:
        module: the model whose parameters are optimized.
        hp: the model's hyperparameters with `optimizer`, `lr`, `weight_decay`, `momentum`,
            `lr_decay` (factor per epoch) and `lr_decay_start` (first epoch that decays).

    Returns:
        `{"optimizer": ..., "lr_scheduler": {"scheduler": LambdaLR, "interval": "epoch"}}`.
    """
    kwargs = {"lr": hp.lr, "weight_decay": hp.weight_decay}
    if hp.optimizer == "sgd":
        kwargs["momentum"] = hp.momentum
    optimizer = OPTIMIZERS[hp.optimizer](module.parameters(), **kwargs)

    def factor(epoch: int) -> float:
        # Zaremba et al.: constant lr, then multiplied by lr_decay after every epoch
        return hp.lr_decay ** max(0, epoch + 1 - hp.lr_decay_start)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
