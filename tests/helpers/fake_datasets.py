"""Small stand-ins for the real data sets, written in their real file formats, so that the data
modules and recipes can be tested where /work/shared/data or the Debian package is absent."""

import gzip
import random
import struct
from pathlib import Path

import numpy as np

REAL_PTB = Path(__file__).resolve().parents[3] / "shared" / "data" / "ptb"
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_ptb(root: Path, words: int = 60, lines: tuple[int, int, int] = (300, 40, 40)) -> Path:
    """Write `ptb.{train,valid,test}.txt` of random sentences over a small vocabulary.

    The training split uses `w0`..`w{words-1}` and `<unk>`; validation and test also contain
    `oov`, a word the training split lacks (it must map to `<unk>`).
    """
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    vocab = [f"w{i}" for i in range(words)] + ["<unk>"]
    for split, n in zip(("train", "valid", "test"), lines, strict=True):
        extra = [] if split == "train" else ["oov"]
        text = [
            " " + " ".join(rng.choice(vocab + extra) for _ in range(rng.randint(3, 12))) + " "
            for _ in range(n)
        ]
        (root / f"ptb.{split}.txt").write_text("\n".join(text) + "\n")
    return root


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed when `compress`)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_fashion_mnist(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    """Write the four Fashion-MNIST IDX files with random 28x28 images and labels 0-9."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root
