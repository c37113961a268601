"""VGG-style convolutional classifier."""

from torch import nn

from bs_lightning.models.classifier import ClassifierModule


class VGGClassifier(ClassifierModule):
    """Blocks of `convs_per_block` x (3x3 conv, BatchNorm, ReLU) each followed by 2x2 max-pool
    (VGG, Simonyan & Zisserman 2015), then Linear-ReLU-Dropout-Linear.

    Args:
        num_classes: output classes.
        input_shape: `(channels, height, width)` of one image; height and width must survive
            one halving per block.
        channels: output channels of each block.
        convs_per_block: 3x3 convolutions per block.
        hidden_size: width of the classifier's hidden layer.
        dropout: dropout probability before the last layer.
        batch_norm: BatchNorm after every convolution.
        optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start: see
            `bs_lightning.models.optim.build_optimizer`.

    Raises:
        ValueError: for an input too small for the number of blocks, a non-positive size,
            dropout outside [0, 1), or a bad optimizer setting.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        channels: tuple[int, ...] = (32, 64, 128),
        convs_per_block: int = 2,
        hidden_size: int = 512,
        dropout: float = 0.3,
        batch_norm: bool = True,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        lr_decay: float = 1.0,
        lr_decay_start: int = 0,
    ) -> None:
        super().__init__(
            num_classes, optimizer, lr, weight_decay, momentum, lr_decay, lr_decay_start
        )
        channels = list(channels)
        in_channels, height, width = input_shape
        if not channels or min(channels) < 1 or convs_per_block < 1 or hidden_size < 1:
            raise ValueError(
                "VGGClassifier: channels, convs_per_block and hidden_size must be positive, got "
                f"channels={channels}, convs_per_block={convs_per_block}, hidden_size={hidden_size}"
            )
        if min(height, width) < 2 ** len(channels):
            raise ValueError(
                f"VGGClassifier: input {height}x{width} is too small for {len(channels)} blocks "
                f"(each halves it); use at most {max(1, min(height, width).bit_length() - 1)} "
                "entries in channels"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"VGGClassifier: dropout must be in [0, 1), got {dropout}")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for out_channels in channels:
            for _ in range(convs_per_block):
                # no conv bias when BatchNorm follows: BN's shift replaces it
                layers.append(
                    nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
                )
                if batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(nn.ReLU())
                in_channels = out_channels
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        layers += [
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden_size),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        ]
        self.net = nn.Sequential(*layers)
