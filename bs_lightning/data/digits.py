"""scikit-learn's bundled 8x8 digits as a LightningDataModule (offline, no download)."""

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from bs_lightning.data.split_datamodule import TensorSplitDataModule, check_sizes
from bs_lightning.data.splits import split_indices


class DigitsDataModule(TensorSplitDataModule):
    """1797 grey 8x8 images of the digits 0-9, split train/val/test at random.

    Batches are `(x [batch, 1, 8, 8] float32 in [0, 1], y [batch] int64)`.

    Args:
        batch_size: examples per training batch (evaluation uses the same).
        val_fraction: fraction of all images held out for validation.
        test_fraction: fraction of all images held out for testing.
        seed: seed of the split.

    Raises:
        ValueError: if a fraction is outside (0, 1), the two leave no training data, or
            `batch_size < 1`.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"DigitsDataModule: {name} must be in (0, 1), got {value}")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                "DigitsDataModule: val_fraction + test_fraction must be < 1 to leave training "
                f"data, got {val_fraction} + {test_fraction}"
            )
        check_sizes("DigitsDataModule", batch_size=batch_size)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        # pixel values are 0..16
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        val, test, train = split_indices(len(y), (self.val_fraction, self.test_fraction), self.seed)
        self.splits = {
            name: TensorDataset(x[idx], y[idx])
            for name, idx in (("train", train), ("val", val), ("test", test))
        }
