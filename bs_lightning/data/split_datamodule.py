"""Bases of the data modules: the three loaders from one `_loader(split, train)`, the
classification splits held as tensors, and the check of their size arguments."""

import lightning.pytorch as pl
from torch.utils.data import DataLoader, TensorDataset


def check_sizes(owner: str, **sizes: int | None) -> None:
    """Check size arguments (batch sizes, limits) at construction.

    Args:
        owner: class name for the message.
        **sizes: argument name -> value; None (no limit) passes.

    Raises:
        ValueError: naming `owner` and the first argument that is < 1.
    """
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{owner}: {name} must be >= 1, got {value}")


class SplitDataModule(pl.LightningDataModule):
    """A data module of three splits, "train", "val" and "test", whose loaders differ only in
    the split and in whether it is read for training (shuffled, training batch size) or for
    evaluation.

    Subclasses implement `_loader(split, train)`.
    """

    def _loader(self, split: str, train: bool) -> DataLoader:
        """The loader of `split`; `train` is True for the training split only."""
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class TensorSplitDataModule(SplitDataModule):
    """Classification splits held in memory: `setup()` fills `self.splits` with one
    `TensorDataset(x [n, *input_shape], y [n] int64)` per split.

    Subclasses set the class attributes `num_classes` and `input_shape` and the instance
    attribute `batch_size` (training and evaluation alike), and may set `num_workers`.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    # DataLoader's own default: the loading happens in the main process
    num_workers = 0

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, TensorDataset] = {}

    def model_kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "input_shape": self.input_shape}

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
        )
