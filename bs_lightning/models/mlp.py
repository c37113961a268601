"""Multi-layer perceptron classifier."""

import math

from torch import nn

from bs_lightning.models.classifier import ClassifierModule


class MLPClassifier(ClassifierModule):
    """Flatten, then `[Linear, ReLU, Dropout]` per hidden size, then a Linear to the classes.

    Args:
        num_classes: output classes.
        input_shape: shape of one example, e.g. `(1, 8, 8)`.
        hidden_sizes: width of each hidden layer.
        dropout: dropout probability after each hidden layer.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer`.

    Raises:
        ValueError: for an empty or non-positive hidden size, dropout outside [0, 1), or a
            bad optimizer setting.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden_sizes: tuple[int, ...] = (1024, 1024),
        dropout: float = 0.1,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_decay: float = 1.0,
        lr_decay_start: int = 0,
    ) -> None:
        super().__init__(
            num_classes, optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start
        )
        hidden_sizes = list(hidden_sizes)
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ValueError(f"MLPClassifier: hidden_sizes must be positive, got {hidden_sizes}")
        if not 0 <= dropout < 1:
            raise ValueError(f"MLPClassifier: dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
