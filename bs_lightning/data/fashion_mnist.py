"""Fashion-MNIST as a LightningDataModule: IDX files of the Debian package
`dataset-fashion-mnist`, or the Hugging Face hub when online."""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bs_lightning.data.idx import read_idx
from bs_lightning.data.split_datamodule import TensorSplitDataModule, check_sizes
from bs_lightning.data.splits import split_indices

HUB_NAME = "zalando-datasets/fashion_mnist"
# split -> (images file, labels file), as named by the original release
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Fashion-MNIST training-set pixel mean and std (of values scaled to [0, 1])
_MEAN, _STD = 0.2860, 0.3530


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


class FashionMNISTDataModule(TensorSplitDataModule):
    """70k grey 28x28 images of clothes in 10 classes (60k train, 10k test).

    Looks for `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` in `root`; when they are
    not there it tries the hub data set `zalando-datasets/fashion_mnist`. Batches are
    `(x [batch, 1, 28, 28] float32 normalised, y [batch] int64)`.

    Args:
        root: folder of the IDX files (Debian: /usr/share/datasets/fashion-mnist).
        batch_size: examples per batch.
        val_size: training images held out (at random) for validation.
        train_subset: use only this many training images (after the validation split);
            None for all.
        test_subset: use only the first this many test images; None for all.
        num_workers: DataLoader worker processes.
        seed: seed of the validation split.

    Raises:
        ValueError: for a `batch_size`, `val_size` or subset size < 1 (`val_size` may be 0).
        FileNotFoundError: at `setup()`, when neither the files nor the hub are reachable;
            the message says where it looked and how to get the data.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        root: str | None = "/usr/share/datasets/fashion-mnist",
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_sizes("FashionMNISTDataModule", batch_size=batch_size)
        if val_size < 0:
            raise ValueError(f"FashionMNISTDataModule: val_size must be >= 0, got {val_size}")
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(
                    f"FashionMNISTDataModule: {name} must be None or >= 1, got {value}"
                )
        self.root = Path(root) if root else None
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.num_workers = num_workers
        self.seed = seed

    def _load_local(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        if self.root is None:
            return None
        found = {}
        for split, (images, labels) in _FILES.items():
            paths = (_find(self.root, images), _find(self.root, labels))
            if None in paths:
                return None
            found[split] = (read_idx(paths[0]), read_idx(paths[1]))
        return found

    def _load_hub(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        import datasets

        loaded = datasets.load_dataset(HUB_NAME)
        out = {}
        for split in ("train", "test"):
            ds = loaded[split]
            images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
            out[split] = (torch.from_numpy(images), torch.tensor(ds["label"]))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self._load_local()
        if raw is None:
            try:
                raw = self._load_hub()
            except Exception as err:  # offline, hub error: one clear message instead
                looked = self.root if self.root is not None else "(no root given)"
                raise FileNotFoundError(
                    f"Fashion-MNIST not found. Looked in data.root={looked} for "
                    f"{', '.join(f'{stem}[.gz]' for pair in _FILES.values() for stem in pair)} "
                    f"and on the Hugging Face hub ({HUB_NAME}: {type(err).__name__}: {err}). "
                    "Get it with `apt-get install dataset-fashion-mnist` (files in "
                    "/usr/share/datasets/fashion-mnist), or download the four files from "
                    "https://github.com/zalandoresearch/fashion-mnist into a folder and set "
                    "data.root to it, or go online for the hub."
                ) from err
        tensors = {}
        for split, (images, labels) in raw.items():
            x = (images.float().unsqueeze(1) / 255.0 - _MEAN) / _STD
            tensors[split] = (x, labels.long())
        x, y = tensors["train"]
        if self.val_size >= len(y):
            raise ValueError(
                f"FashionMNISTDataModule: val_size={self.val_size} leaves no training images "
                f"(training set has {len(y)})"
            )
        val, train = split_indices(len(y), (self.val_size / len(y),), self.seed)
        if self.train_subset is not None:
            train = train[: self.train_subset]
        x_test, y_test = tensors["test"]
        if self.test_subset is not None:
            x_test, y_test = x_test[: self.test_subset], y_test[: self.test_subset]
        self.splits = {
            "train": TensorDataset(x[train], y[train]),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x_test, y_test),
        }
