"""Reader for the IDX format of (Fashion-)MNIST (http://yann.lecun.com/exdb/mnist/)."""

import gzip
from pathlib import Path

import numpy as np
import torch

# IDX type byte -> numpy dtype (big-endian where it matters)
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file, gzip-compressed (`.gz`) or not.

    Args:
        path: the file.

    Returns:
        The array as a tensor of the file's shape (e.g. `[n, 28, 28]` uint8 images or `[n]`
        uint8 labels).

    Raises:
        ValueError: if the file does not start with a valid IDX header or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 0
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says shape {shape}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))
