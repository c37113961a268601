"""Balanced-sparsity masks (Yao et al., AAAI 2019): keep-counts, bank layout, masks.

A weight's matrix view has rows = output features and columns = input features. Each row is
cut into contiguous banks of `bank_size` columns and every bank keeps the same number `k` of
weights, the `k` largest by |w| (ties: the lower column index wins).

Short last bank rule: a row of length `L` that is not a multiple of `B` has
`ceil(L / B)` banks; the last one has `r = L % B` columns and keeps
`min(r, max(1, round(k * r / B)))` weights (see `bank_layout`).
"""

from __future__ import annotations

import math

import torch

from bs_lightning.validation import check_int, check_sparsity
from bs_lightning.validation import where as _where

__all__ = [
    "balanced_mask",
    "balanced_mask_k",
    "bank_layout",
    "check_sparsity",
    "keep_count",
    "topk_mask_lastdim",
]


def keep_count(bank_size: int, sparsity: float, name: str | None = None) -> int:
    """Number of weights each full bank keeps: `k = round(bank_size * (1 - sparsity))`.

    Python's `round` is used (halves round to even), so `keep_count(4, 0.375) == 2`.

    Args:
        bank_size: columns per bank `B`, >= 1.
        sparsity: target sparsity in [0, 1).
        name: layer name used in error messages.

    Returns:
        `k`, with `1 <= k <= bank_size`.

    Raises:
        ValueError: when `bank_size < 1`, `sparsity` is outside [0, 1), or the rule keeps
            0 weights per bank.
    """
    check_int(bank_size, "bank_size", 1, name=name)
    s = check_sparsity(sparsity, name)
    k = round(bank_size * (1.0 - s))
    if k == 0:
        # largest sparsity that still keeps one weight: B * (1 - s) >= 1 is always safe
        raise ValueError(
            f"sparsity={s} with bank_size={bank_size}{_where(name)} keeps "
            f"round({bank_size} * (1 - {s})) = 0 weights per bank; use sparsity <= "
            f"{1 - 1 / bank_size:.6g} or a larger bank_size"
        )
    return k


def bank_layout(row_length: int, bank_size: int, k: int, name: str | None = None):
    """Bank count and the last bank's keep-count for one row (short last bank rule).

    Args:
        row_length: number of columns `L` of the matrix view.
        bank_size: columns per bank `B`, `1 <= B <= L`.
        k: keep-count of a full bank, `1 <= k <= B`.
        name: layer name used in error messages.

    Returns:
        `(n_banks, k_last)`: `n_banks = ceil(L / B)`; `k_last = k` when `B` divides `L`,
        else `min(r, max(1, round(k * r / B)))` with `r = L % B`.

    Raises:
        ValueError: when `bank_size < 1`, `bank_size > row_length` or `k` is not in
            [1, bank_size].
    """
    check_int(bank_size, "bank_size", 1, name=name)
    if bank_size > row_length:
        raise ValueError(
            f"bank_size={bank_size}{_where(name)} is longer than a row ({row_length} "
            f"columns); use a bank_size in [1, {row_length}]"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= bank_size):
        raise ValueError(f"k{_where(name)} must be an integer in [1, {bank_size}], got {k!r}")
    n_banks = math.ceil(row_length / bank_size)
    r = row_length % bank_size
    k_last = k if r == 0 else min(r, max(1, round(k * r / bank_size)))
    return n_banks, k_last


def topk_mask_lastdim(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Marks the `k` largest entries along the last dimension (ties: lower index wins).

    Args:
        scores: `[..., n]` tensor of non-negative scores (e.g. |w|).
        k: number of entries to keep per slice, `0 <= k <= n`.

    Returns:
        Bool tensor `[..., n]`, True at the kept entries.
    """
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    if k >= scores.shape[-1]:
        return mask.fill_(True)
    # A stable descending sort keeps equal scores in index order, which makes ties
    # deterministic (torch.topk does not document an order for ties).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return mask.scatter_(-1, order, True)


def balanced_mask_k(
    weight: torch.Tensor,
    bank_size: int,
    k: int,
    name: str | None = None,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced mask keeping an explicit `k` weights per bank.

    Computed on the matrix view `weight.reshape(weight.shape[0], -1)` (for a conv weight,
    one row per output channel). A weight stored transposed (GPT-2 `Conv1D`) must be passed
    through `matrix_view` first.

    Args:
        weight: `[out, ...]` tensor; its matrix view is `[out, L]`.
        bank_size: columns per bank `B`, `1 <= B <= L`.
        k: weights kept per full bank, `1 <= k <= B`; the short last bank keeps
            `bank_layout(L, B, k)[1]`.
        name: layer name used in error messages.
        prev_mask: optional bool tensor of `weight`'s shape; entries False there are never
            kept (they rank below every other entry), so on a schedule the mask only shrinks.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when `weight` has no dimension, or `bank_size`/`k` are invalid for it
            (see `bank_layout`).
    """
    if weight.dim() == 0:
        raise ValueError(f"weight{_where(name)} must have at least one dimension, got a scalar")
    rows = weight.shape[0]
    matrix = weight.detach().reshape(rows, -1)  # [out, L]
    length = matrix.shape[1]
    n_banks, k_last = bank_layout(length, bank_size, k, name)
    scores = matrix.abs().float()
    if prev_mask is not None:
        # |w| >= 0, so -1 ranks every previously pruned weight last
        scores = scores.masked_fill(~prev_mask.reshape(rows, -1), -1.0)
    n_full = length // bank_size
    mask = torch.empty(matrix.shape, dtype=torch.bool, device=weight.device)
    full = n_full * bank_size
    if n_full:
        # [out, n_full, B] -> top-k inside each bank
        banks = scores[:, :full].reshape(rows, n_full, bank_size)
        mask[:, :full] = topk_mask_lastdim(banks, k).reshape(rows, full)
    if n_banks > n_full:
        mask[:, full:] = topk_mask_lastdim(scores[:, full:], k_last)
    return mask.reshape(weight.shape)


def balanced_mask(
    weight: torch.Tensor, sparsity: float, bank_size: int, name: str | None = None
) -> torch.Tensor:
    """Balanced mask at a target sparsity: every bank keeps `keep_count(bank_size, sparsity)`.

    Example (B=4, k=2): `[[1, 2, 3, 4, 5, 6, 7, 8]]` -> kept `[[0, 0, 1, 1, 0, 0, 1, 1]]`.

    Args:
        weight: `[out, ...]` tensor; its matrix view is `weight.reshape(out, -1)` `[out, L]`.
        sparsity: target sparsity in [0, 1).
        bank_size: columns per bank `B`, `1 <= B <= L`.
        name: layer name used in error messages.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when `sparsity` is outside [0, 1), `bank_size` is < 1 or longer than a
            row, or the sparsity keeps 0 weights per bank.
    """
    return balanced_mask_k(weight, bank_size, keep_count(bank_size, sparsity, name), name)
