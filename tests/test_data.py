"""Data modules: digits, Fashion-MNIST (IDX), PTB (BPTT windows), missing-data errors."""

import numpy as np
import pytest
import torch
from helpers.fake_datasets import (
    REAL_FASHION_MNIST,
    REAL_PTB,
    write_fashion_mnist,
    write_idx,
    write_ptb,
)
from sklearn.datasets import load_digits

from bs_lightning.data import DigitsDataModule, FashionMNISTDataModule, PTBDataModule
from bs_lightning.data.idx import read_idx
from bs_lightning.data.ptb import BPTTWindows

# ---------------------------------------------------------------- digits


def test_digits_splits_are_disjoint_complete_and_seeded():
    dm = DigitsDataModule(batch_size=16, val_fraction=0.1, test_fraction=0.2, seed=3)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 1797 - 180 - 359, "val": 180, "test": 359}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # the three splits together hold every image exactly once: same label histogram and
    # same pixel sum as the whole set
    digits = load_digits()
    xs = torch.cat([dm.splits[s].tensors[0] for s in ("train", "val", "test")])
    ys = torch.cat([dm.splits[s].tensors[1] for s in ("train", "val", "test")])
    assert torch.equal(torch.bincount(ys), torch.bincount(torch.tensor(digits.target)))
    assert float(xs.double().sum() * 16) == pytest.approx(float(digits.images.sum()))
    again = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"].tensors[1], dm.splits["test"].tensors[1])
    other = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=4)
    other.setup()
    assert not torch.equal(other.splits["test"].tensors[0], dm.splits["test"].tensors[0])
    assert dm.model_kwargs() == {"num_classes": 10, "input_shape": (1, 8, 8)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_fraction": 0.0}, "val_fraction must be in"),
        ({"test_fraction": 1.5}, "test_fraction must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave training data"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


# ---------------------------------------------------------------- IDX / Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "a-idx3-ubyte", array, compress=compress)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and torch.equal(out, torch.from_numpy(array))


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    path = write_idx(tmp_path / "t", np.zeros((5, 4), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_fashion_mnist_from_idx_files(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=100, n_test=30)
    dm = FashionMNISTDataModule(
        root=str(root), batch_size=8, val_size=20, train_subset=50, test_subset=10
    )
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 50, "val": 20, "test": 10}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.max()) <= 9
    # test images are the first test_subset of the file, labels as written
    assert dm.splits["test"].tensors[1].tolist() == list(range(10))


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"Looked in data.root=.*nowhere.*apt-get install"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"val_size": -1}, "val_size must be >= 0"),
        ({"train_subset": 0}, "train_subset must be None or >= 1"),
    ],
)
def test_fashion_mnist_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FashionMNISTDataModule(**kwargs)


def test_fashion_mnist_val_size_too_large(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=30, n_test=10)
    with pytest.raises(ValueError, match="leaves no training images"):
        FashionMNISTDataModule(root=str(root), val_size=30).setup()


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_fashion_mnist_real_debian_files():
    dm = FashionMNISTDataModule(root=str(REAL_FASHION_MNIST), val_size=5000, test_subset=1000)
    dm.setup()
    assert len(dm.splits["train"]) == 55000 and len(dm.splits["test"]) == 1000
    labels = dm.splits["train"].tensors[1]
    assert labels.min() == 0 and labels.max() == 9
    # normalised with the training mean/std: close to zero mean, unit std
    x = dm.splits["train"].tensors[0][:5000]
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


# ---------------------------------------------------------------- PTB


def test_bptt_windows_continue_each_row():
    stream = torch.arange(50)
    windows = BPTTWindows(stream, batch_size=3, bptt=4)
    # 50 // 3 = 16 columns per row; 15 next-token pairs -> windows of 4, 4, 4, 3
    assert len(windows) == 4
    x0, y0 = windows[0]
    assert x0.tolist() == [[0, 1, 2, 3], [16, 17, 18, 19], [32, 33, 34, 35]]
    assert torch.equal(y0, x0 + 1)
    x1, _ = windows[1]
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # row r of window 1 continues row r of window 0
    x3, y3 = windows[3]
    assert x3.shape == (3, 3) and y3[:, -1].tolist() == [15, 31, 47]
    with pytest.raises(IndexError):
        windows[4]


def test_bptt_windows_too_short():
    with pytest.raises(ValueError, match="too short for batch_size=4"):
        BPTTWindows(torch.arange(5), batch_size=4, bptt=2)


def test_ptb_local_folder(tmp_path):
    root = write_ptb(tmp_path / "ptb", words=30)
    dm = PTBDataModule(root=str(root), batch_size=4, eval_batch_size=2, bptt=5)
    dm.setup()
    # vocabulary: the 30 words, <unk> and <eos>; "oov" (not in train) maps to <unk>
    assert dm.vocab_size == 32 and {"<eos>", "<unk>"} <= set(dm.vocab)
    assert "oov" not in dm.vocab
    test_text = (root / "ptb.test.txt").read_text().split()
    n_test = len(test_text) + len((root / "ptb.test.txt").read_text().splitlines())
    assert dm.streams["test"].numel() == n_test  # every word plus one <eos> per line
    assert int((dm.streams["test"] == dm.vocab["<unk>"]).sum()) >= test_text.count("oov")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 5) and torch.equal(x[:, 1:], y[:, :-1])
    assert next(iter(dm.val_dataloader()))[0].shape == (2, 5)
    assert dm.model_kwargs() == {"vocab_size": 32}


def test_ptb_token_limits(tmp_path):
    root = write_ptb(tmp_path / "ptb")
    dm = PTBDataModule(root=str(root), max_train_tokens=100, max_eval_tokens=40)
    dm.setup()
    assert [dm.streams[s].numel() for s in ("train", "val", "test")] == [100, 40, 40]


def test_ptb_missing_files_say_where_and_how(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a b\n")
    dm = PTBDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"lacks .*ptb\.valid\.txt.*simple-examples"):
        dm.setup()


def test_ptb_hub_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"ptb_text_only.*ConnectionError.*data.root"):
        PTBDataModule(root=None).setup()


def test_ptb_bad_arguments():
    with pytest.raises(ValueError, match="bptt must be >= 1"):
        PTBDataModule(bptt=0)


@pytest.mark.skipif(not (REAL_PTB / "ptb.train.txt").is_file(), reason=f"PTB not in {REAL_PTB}")
def test_ptb_real_release():
    dm = PTBDataModule(root=str(REAL_PTB))
    dm.setup()
    assert dm.vocab_size == 10000
    assert [dm.streams[s].numel() for s in ("train", "val", "test")] == [929589, 73760, 82430]
