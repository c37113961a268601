"""Compact balanced format: values + uint8 in-bank indices (docs/ARCHITECTURE.md section 2).

For a matrix `W [out, in]` with bank size `B <= 256` and keep-count `k`:

- `values [out, n_banks * k]` (weight dtype) and `indices [out, n_banks * k]` (uint8), both
  contiguous and row-major, `n_banks = ceil(in / B)`. Entry `j` of row `o` stands for column
  `(j // k) * B + indices[o, j]` with weight `values[o, j]`. Inside a bank the entries are
  sorted by column.
- A bank that holds fewer than `k` nonzeros (the short last bank, or a kept weight that is
  zero by chance) is padded to `k` entries with value exactly `0` and an in-range index,
  possibly repeating a kept one; `unpack_balanced` sums duplicates, so padding is harmless.

The short last bank keeps `bank_layout(in, B, k)[1]` weights (see `bs_lightning.sparsity`).
"""

from __future__ import annotations

import torch

from bs_lightning import validation
from bs_lightning.sparsity.masks import bank_layout
from bs_lightning.validation import MAX_BANK_SIZE

__all__ = [
    "MAX_BANK_SIZE",
    "bank_counts",
    "check_bank_size",
    "check_indices",
    "infer_bank_layout",
    "infer_keep_count",
    "pack_balanced",
    "unpack_balanced",
]


def _where(name: str | None) -> str:
    return f" of layer {name!r}" if name else ""


def check_bank_size(bank_size: int, in_features: int, name: str | None = None) -> int:
    """Validates a bank size for rows of `in_features` columns stored with uint8 indices.

    Args:
        bank_size: columns per bank.
        in_features: columns of the matrix view.
        name: layer name used in error messages.

    Returns:
        `bank_size`.

    Raises:
        ValueError: when `bank_size` is not an integer in [1, min(in_features, 256)].
    """
    validation.check_bank_size(bank_size, name)
    if bank_size > in_features:
        raise ValueError(
            f"bank_size={bank_size}{_where(name)} is longer than a row ({in_features} "
            f"columns); use a bank_size in [1, {min(in_features, MAX_BANK_SIZE)}]"
        )
    return bank_size


def _check_matrix(matrix: torch.Tensor, bank_size: int, name: str | None) -> None:
    if matrix.dim() != 2:
        raise ValueError(
            f"matrix{_where(name)} must be 2-D [out, in], got shape {tuple(matrix.shape)}"
        )
    check_bank_size(bank_size, matrix.shape[1], name)


def bank_counts(matrix: torch.Tensor, bank_size: int, name: str | None = None):
    """Nonzeros per bank of every row.

    Args:
        matrix: `[out, in]` matrix view.
        bank_size: columns per bank `B`, `1 <= B <= min(in, 256)`.
        name: layer name used in error messages.

    Returns:
        `(full, last)`: `full [out, in // B]` int64 nonzero counts of the full banks;
        `last [out]` counts of the short last bank, or None when `B` divides `in`.

    Raises:
        ValueError: when `matrix` is not 2-D or `bank_size` is not in [1, min(in, 256)].
    """
    _check_matrix(matrix, bank_size, name)
    rows, length = matrix.shape
    n_full = length // bank_size
    nonzero = matrix != 0  # [out, in]
    full = nonzero[:, : n_full * bank_size].reshape(rows, n_full, bank_size).sum(-1)
    last = nonzero[:, n_full * bank_size :].sum(-1) if length % bank_size else None
    return full, last


def _count_rule(full, last, length: int, bank_size: int) -> tuple[int, str | None]:
    """Applies the balance rule to bank counts: returns `(k, None)` or `(k, reason)`."""
    if full.numel() == 0:
        return 0, f"it has no full bank of {bank_size} columns"
    k = int(full.max())
    if k == 0:
        return 0, "it is all zeros"
    at_k = int((full == k).sum())
    if 2 * at_k <= full.numel():
        return k, (
            f"it is not balanced at bank_size={bank_size}: only {at_k} of {full.numel()} "
            f"banks hold the largest count {k} of nonzeros"
        )
    if last is not None:
        k_last = bank_layout(length, bank_size, k)[1]
        if int(last.max()) > k_last:
            return k, (
                f"it is not balanced at bank_size={bank_size}, k={k}: a short last bank "
                f"holds {int(last.max())} nonzeros, more than its keep-count {k_last}"
            )
        # the short banks follow the same majority rule; without it a bank size a little
        # shorter than a whole-row bank would pass (its full banks lose what the tail holds)
        at_k_last = int((last == k_last).sum())
        if 2 * at_k_last <= last.numel():
            return k, (
                f"it is not balanced at bank_size={bank_size}, k={k}: only {at_k_last} of "
                f"{last.numel()} short last banks hold their keep-count {k_last}"
            )
    return k, None


def infer_keep_count(matrix: torch.Tensor, bank_size: int, name: str | None = None) -> int:
    """Keep-count `k` of a balanced matrix, read from its zeros.

    Rule: `k` is the largest nonzero count of a full bank. The matrix counts as balanced at
    `bank_size` when more than half of its full banks hold exactly `k` nonzeros (the others
    hold fewer: kept weights that are zero by chance) and, with a short last bank, no short
    bank holds more than its keep-count `k_last = bank_layout(in, B, k)[1]` and more than
    half hold exactly `k_last`. A dense matrix is balanced with `k == B`.

    Args:
        matrix: `[out, in]` matrix view.
        bank_size: columns per bank `B`, `1 <= B <= min(in, 256)`.
        name: layer name used in error messages.

    Returns:
        `k`, `1 <= k <= bank_size`.

    Raises:
        ValueError: when the matrix is not 2-D, `bank_size` is invalid, the matrix has no
            full bank or no nonzero, or it is not balanced at `bank_size`.
    """
    full, last = bank_counts(matrix, bank_size, name)
    k, reason = _count_rule(full, last, matrix.shape[1], bank_size)
    if reason is not None:
        raise ValueError(f"matrix{_where(name)} of shape {tuple(matrix.shape)}: {reason}")
    return k


def infer_bank_layout(matrix: torch.Tensor, name: str | None = None) -> tuple[int, int]:
    """Bank size and keep-count of a balanced matrix, read from its zeros.

    Bank sizes `B = 2, 3, ..., min(in, 256)` are tried in order with the rule of
    `infer_keep_count`; the first one where the matrix is balanced *and sparse* (`k < B`)
    wins. Why the smallest: a multiple of the pruner's bank size (up to the whole row) is
    balanced too, so the smallest is the pruner's. Why sparse: at a bank size smaller than
    the pruner's, a mildly sparse matrix can look dense with a few zeros by chance
    (`k == B`); such readings are skipped. A matrix with no sparse reading but a dense one is
    dense. Whatever this picks packs the matrix exactly; a `SparsityPlan` (the callback's,
    passed to `convert_to_sparse`) avoids guessing.

    Args:
        matrix: `[out, in]` matrix view with `in >= 2`.
        name: layer name used in error messages.

    Returns:
        `(bank_size, k)`; `k == bank_size` means the matrix is dense (up to chance zeros).

    Raises:
        ValueError: when the matrix is not 2-D, has fewer than 2 columns or no nonzero, or
            is balanced at no bank size.
    """
    if matrix.dim() != 2 or matrix.shape[1] < 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"matrix{_where(name)} must be 2-D [out, in] with out >= 1 and in >= 2, got "
            f"shape {tuple(matrix.shape)}"
        )
    rows, length = matrix.shape
    # prefix sums of the nonzeros of each row: the count of any bank is one subtraction
    nnz = torch.zeros(rows, length + 1, dtype=torch.int32, device=matrix.device)
    torch.cumsum(matrix != 0, dim=1, dtype=torch.int32, out=nnz[:, 1:])
    dense = None  # first bank size whose reading is dense (k == B)
    for bank_size in range(2, min(length, MAX_BANK_SIZE) + 1):
        n_full = length // bank_size
        edges = torch.arange(0, (n_full + 1) * bank_size, bank_size, device=matrix.device)
        at_edges = nnz[:, edges]  # [out, n_full + 1]
        full = at_edges[:, 1:] - at_edges[:, :-1]  # [out, n_full]
        last = nnz[:, length] - at_edges[:, -1] if length % bank_size else None
        k, reason = _count_rule(full, last, length, bank_size)
        if reason is None:
            if k < bank_size:
                return bank_size, k
            dense = dense or (bank_size, k)
    if dense is None:
        if int(nnz[:, length].sum()) == 0:
            raise ValueError(f"matrix{_where(name)} is all zeros; it has no balanced pattern")
        raise ValueError(
            f"matrix{_where(name)} of shape {tuple(matrix.shape)} is balanced at no bank size "
            f"in 2..{min(length, MAX_BANK_SIZE)}: some banks hold more nonzeros than most"
        )
    return dense


def pack_balanced(
    matrix: torch.Tensor, bank_size: int, k: int | None = None, name: str | None = None
):
    """Packs a balanced matrix into values + uint8 in-bank indices.

    Args:
        matrix: `[out, in]` matrix view, every full bank holding at most `k` nonzeros and
            the short last bank at most `bank_layout(in, B, k)[1]`.
        bank_size: columns per bank `B`, `1 <= B <= min(in, 256)`.
        k: keep-count per full bank; None infers it with `infer_keep_count`.
        name: layer name used in error messages.

    Returns:
        `(values, indices, k)`: `values [out, n_banks * k]` in `matrix.dtype`,
        `indices [out, n_banks * k]` uint8, both contiguous; `k` as an int.

    Raises:
        ValueError: when the matrix is not 2-D, `bank_size` or `k` is invalid, or a bank
            holds more nonzeros than its keep-count (the matrix is not balanced).
    """
    if k is None:
        k = infer_keep_count(matrix, bank_size, name)
    else:
        full, last = bank_counts(matrix, bank_size, name)
        k_last = bank_layout(matrix.shape[1], bank_size, k, name)[1]
        if full.numel() and int(full.max()) > k:
            raise ValueError(
                f"matrix{_where(name)} is not balanced at bank_size={bank_size}, k={k}: a "
                f"bank holds {int(full.max())} nonzeros"
            )
        if last is not None and int(last.max()) > k_last:
            raise ValueError(
                f"matrix{_where(name)} is not balanced at bank_size={bank_size}, k={k}: the "
                f"short last bank holds {int(last.max())} nonzeros, more than {k_last}"
            )
    rows, length = matrix.shape
    n_banks = -(-length // bank_size)
    padded = matrix.new_zeros(rows, n_banks * bank_size)
    padded[:, :length] = matrix
    banks = padded.reshape(rows, n_banks, bank_size)  # [out, n_banks, B]

    col = torch.arange(bank_size, device=matrix.device)
    in_row = (torch.arange(n_banks, device=matrix.device)[:, None] * bank_size + col) < length
    # Selection key: nonzeros first, then the in-row zeros (the padding of banks holding fewer
    # than k nonzeros), lower columns first; columns past the row end come last.
    key = (banks != 0).long() * (2 * bank_size) + (bank_size - col)
    key = torch.where(in_row, key, torch.zeros_like(key))
    chosen = torch.topk(key, k, dim=-1, sorted=False).indices  # [out, n_banks, k]
    # A short bank with fewer than k columns can pick columns past the row end: point them
    # at the bank's last real column (their value is the padding's exact 0).
    last_col = (length - 1) % bank_size
    chosen[:, -1].clamp_(max=last_col)
    chosen = chosen.sort(dim=-1).values
    values = banks.gather(-1, chosen)  # [out, n_banks, k]
    # entries that duplicate a column carry the value once: zero the repeats
    repeat = torch.zeros_like(chosen, dtype=torch.bool)
    repeat[..., 1:] = chosen[..., 1:] == chosen[..., :-1]
    values = values.masked_fill(repeat, 0)
    return (
        values.reshape(rows, n_banks * k).contiguous(),
        chosen.to(torch.uint8).reshape(rows, n_banks * k).contiguous(),
        k,
    )


def check_indices(
    indices: torch.Tensor, bank_size: int, in_features: int, k: int, name: str | None = None
) -> None:
    """Checks that every in-bank index stays inside its bank (once, at load time).

    Entry `j` of a row belongs to bank `j // k`; a full bank has `bank_size` columns, the
    short last bank `in_features % bank_size`. The compiled kernels read indices unchecked,
    so an index past its bank would give wrong numbers (never an out-of-bounds read).

    Args:
        indices: `[out, n_banks * k]`, any integer dtype.
        bank_size: columns per bank.
        in_features: columns of the dense matrix.
        k: entries per bank.
        name: layer name used in the error message.

    Raises:
        ValueError: naming the layer, the first bad row and entry, the bad value and the
            valid range.
    """
    width = indices.shape[-1]
    # columns of the bank each entry belongs to: bank_size, the last bank possibly fewer
    bank_start = torch.arange(width, device=indices.device) // k * bank_size
    limit = (in_features - bank_start).clamp(max=bank_size)  # [width]
    bad = indices.long() >= limit
    if not bool(bad.any()):
        return
    row, entry = (int(v) for v in bad.nonzero()[0])
    value, valid = int(indices[row, entry]), int(limit[entry])
    what = "a short last bank" if valid < bank_size else "a bank"
    raise ValueError(
        f"indices{_where(name)}: row {row}, entry {entry} holds in-bank index {value}, past "
        f"{what} of {valid} columns (valid 0..{valid - 1}, bank_size={bank_size}, "
        f"in_features={in_features})"
    )


def unpack_balanced(
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    in_features: int,
    name: str | None = None,
) -> torch.Tensor:
    """Rebuilds the dense matrix from the compact format.

    Args:
        values: `[out, n_banks * k]` values.
        indices: `[out, n_banks * k]` uint8 in-bank indices.
        bank_size: columns per bank `B`, `1 <= B <= min(in_features, 256)`.
        in_features: columns of the matrix.
        name: layer name used in error messages.

    Returns:
        `[out, in_features]` matrix in `values.dtype` (duplicate entries are summed).

    Raises:
        ValueError: when the shapes, dtypes, `bank_size` or `in_features` do not fit together
            or an index points past its bank or the row end.
    """
    if values.dim() != 2 or indices.shape != values.shape:
        raise ValueError(
            f"values and indices{_where(name)} must both be 2-D of the same shape, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if indices.dtype != torch.uint8:
        raise ValueError(f"indices{_where(name)} must be torch.uint8, got {indices.dtype}")
    validation.check_int(in_features, "in_features", 1, name=name)
    check_bank_size(bank_size, in_features, name)
    rows, width = values.shape
    n_banks = -(-in_features // bank_size)
    if width == 0 or width % n_banks:
        raise ValueError(
            f"values{_where(name)} has {width} columns, not a positive multiple of the "
            f"{n_banks} banks of in_features={in_features}, bank_size={bank_size}"
        )
    k = width // n_banks
    idx = indices.long()
    # a compiled graph cannot branch on the data: there the checks are scatter_add_'s own
    # bounds check (compiled code asserts indirect indices)
    checked = not torch.compiler.is_compiling()
    if checked and idx.numel() and int(idx.max()) >= bank_size:
        raise ValueError(
            f"indices{_where(name)} must be < bank_size={bank_size}, found {int(idx.max())}"
        )
    columns = (torch.arange(width, device=values.device) // k) * bank_size + idx  # [out, width]
    if checked and columns.numel() and int(columns.max()) >= in_features:
        raise ValueError(
            f"indices{_where(name)} point past the row end (in_features={in_features})"
        )
    matrix = values.new_zeros(rows, in_features)
    return matrix.scatter_add_(1, columns, values)
