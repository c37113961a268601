"""Masks of the patterns the paper compares besides balanced: N:M, unstructured, block, vector.

All functions work on a matrix view `[out, in]` (see `matrix_view`) or any `[out, ...]`
weight, which is flattened per output row. True = kept. Every function accepts `prev_mask`:
entries False there are never kept again, so a mask computed on a gradual schedule only
shrinks (a weight that happens to be 0 cannot win a tie against an already pruned one).

- N:M: `n` of every `m` consecutive columns; the row length must be a multiple of `m`.
- unstructured: the largest |w| of the whole layer.
- block: `block_size x block_size` tiles of the matrix view, ranked by L2 norm; tiles at
  the right/bottom edge may be smaller and are ranked by their own norm.
- vector: 1-D runs of `vector_size` consecutive columns in a row, ranked by L2 norm; the
  last run of a row may be shorter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bs_lightning.sparsity.masks import balanced_mask_k, topk_mask_lastdim
from bs_lightning.validation import check_int, check_sparsity
from bs_lightning.validation import where as _where

__all__ = [
    "block_mask",
    "nm_mask",
    "tile_count",
    "tile_mask",
    "unstructured_mask",
    "unstructured_mask_k",
    "units_to_keep",
    "vector_mask",
]


def _as_matrix(weight: torch.Tensor, name: str | None) -> torch.Tensor:
    if weight.dim() == 0:
        raise ValueError(f"weight{_where(name)} must have at least one dimension, got a scalar")
    return weight.detach().reshape(weight.shape[0], -1)


def units_to_keep(n_units: int, sparsity: float, unit: str, name: str | None) -> int:
    """Units (weights, blocks, runs) kept at `sparsity`: `round(n_units * (1 - sparsity))` >= 1."""
    s = check_sparsity(sparsity, name)
    keep = round(n_units * (1.0 - s))
    if keep == 0:
        raise ValueError(
            f"sparsity={s}{_where(name)} keeps round({n_units} * (1 - {s})) = 0 {unit}s of "
            f"{n_units}; use sparsity <= {1 - 1 / n_units:.6g}"
        )
    return keep


def _prune_scores(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    # |w| and norms are >= 0, so -1 ranks every previously pruned unit last.
    return scores if allowed is None else scores.masked_fill(~allowed, -1.0)


def nm_mask(
    weight: torch.Tensor,
    n: int,
    m: int,
    name: str | None = None,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """N:M mask: `n` kept in every group of `m` consecutive columns of each row.

    Args:
        weight: `[out, ...]` tensor with matrix view `[out, L]`, `L` a multiple of `m`.
        n: weights kept per group, `1 <= n <= m`.
        m: group length.
        name: layer name used in error messages.
        prev_mask: optional bool tensor of `weight`'s shape; False entries stay pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when the row length is not a multiple of `m`, or `n`/`m` are invalid.
    """
    length = _as_matrix(weight, name).shape[1]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or length % m:
        raise ValueError(
            f"m={m!r}{_where(name)} must be an integer >= 1 dividing the row length {length}"
        )
    return balanced_mask_k(weight, m, n, name, prev_mask=prev_mask)


def unstructured_mask(
    weight: torch.Tensor,
    sparsity: float,
    name: str | None = None,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer-wise magnitude mask: keeps the `round(numel * (1 - sparsity))` largest |w|.

    Ties: the lower flat index wins.

    Args:
        weight: any tensor with at least one dimension.
        sparsity: target sparsity in [0, 1).
        name: layer name used in error messages.
        prev_mask: optional bool tensor of `weight`'s shape; False entries stay pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when `sparsity` is outside [0, 1) or keeps no weight.
    """
    matrix = _as_matrix(weight, name)
    keep = units_to_keep(matrix.numel(), sparsity, "weight", name)
    return unstructured_mask_k(weight, keep, prev_mask)


def unstructured_mask_k(
    weight: torch.Tensor, keep: int, prev_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Keeps the `keep` largest |w| of the whole tensor (ties: the lower flat index wins).

    Args:
        weight: any tensor with at least one dimension.
        keep: number of weights kept, `0 <= keep <= numel`.
        prev_mask: optional bool tensor of `weight`'s shape; False entries stay pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.
    """
    allowed = None if prev_mask is None else prev_mask.reshape(-1)
    scores = _prune_scores(weight.detach().abs().float().reshape(-1), allowed)
    return topk_mask_lastdim(scores, keep).reshape(weight.shape)


def tile_mask(
    weight: torch.Tensor,
    tile_rows: int,
    tile_cols: int,
    keep_tiles: int,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keeps the `keep_tiles` tiles of the matrix view with the largest L2 norm.

    The matrix view `[R, C]` is cut into `ceil(R / tile_rows) x ceil(C / tile_cols)` tiles
    (edge tiles smaller). Ties: the lower row-major tile index wins.

    Args:
        weight: `[out, ...]` tensor with matrix view `[R, C]`.
        tile_rows: tile height.
        tile_cols: tile width.
        keep_tiles: number of tiles kept, `0 <= keep_tiles <= number of tiles`.
        prev_mask: optional bool tensor of `weight`'s shape; a tile with no kept entry there
            stays pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.
    """
    matrix = _as_matrix(weight, None).float()
    rows, cols = matrix.shape
    tr, tc = math.ceil(rows / tile_rows), math.ceil(cols / tile_cols)
    # zero padding does not change a tile's norm: [tr * tile_rows, tc * tile_cols]
    padded = F.pad(matrix, (0, tc * tile_cols - cols, 0, tr * tile_rows - rows))
    # [tr, tile_rows, tc, tile_cols] -> squared norm per tile [tr, tc]
    tiles = padded.reshape(tr, tile_rows, tc, tile_cols)
    scores = tiles.square().sum(dim=(1, 3)).reshape(-1)
    allowed = None
    if prev_mask is not None:
        prev = F.pad(
            prev_mask.reshape(rows, cols).float(),
            (0, tc * tile_cols - cols, 0, tr * tile_rows - rows),
        )
        allowed = prev.reshape(tr, tile_rows, tc, tile_cols).amax(dim=(1, 3)).reshape(-1) > 0
    kept = topk_mask_lastdim(_prune_scores(scores, allowed), keep_tiles).reshape(tr, tc)
    full = kept.repeat_interleave(tile_rows, 0).repeat_interleave(tile_cols, 1)
    return full[:rows, :cols].reshape(weight.shape)


def tile_count(weight: torch.Tensor, tile_rows: int, tile_cols: int) -> int:
    """Number of `tile_rows x tile_cols` tiles (edge tiles smaller) of the matrix view."""
    rows = weight.shape[0]
    cols = weight[0].numel() if rows else 0
    return math.ceil(rows / tile_rows) * math.ceil(cols / tile_cols)


def block_mask(
    weight: torch.Tensor,
    sparsity: float,
    block_size: int,
    name: str | None = None,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block mask: keeps the `block_size x block_size` tiles with the largest L2 norm.

    Args:
        weight: `[out, ...]` tensor with matrix view `[R, C]`.
        sparsity: fraction of tiles removed, in [0, 1).
        block_size: tile side `b >= 1`.
        name: layer name used in error messages.
        prev_mask: optional bool tensor of `weight`'s shape; False tiles stay pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when `block_size < 1`, or `sparsity` is outside [0, 1) or keeps no tile.
    """
    check_int(block_size, "block_size", 1, name=name)
    _as_matrix(weight, name)
    keep = units_to_keep(tile_count(weight, block_size, block_size), sparsity, "block", name)
    return tile_mask(weight, block_size, block_size, keep, prev_mask)


def vector_mask(
    weight: torch.Tensor,
    sparsity: float,
    vector_size: int,
    name: str | None = None,
    prev_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vector mask: keeps the 1-D runs of `vector_size` columns with the largest L2 norm.

    Args:
        weight: `[out, ...]` tensor with matrix view `[R, C]`.
        sparsity: fraction of runs removed, in [0, 1).
        vector_size: run length `v >= 1` along a row.
        name: layer name used in error messages.
        prev_mask: optional bool tensor of `weight`'s shape; False runs stay pruned.

    Returns:
        Bool tensor of `weight`'s shape, True = kept.

    Raises:
        ValueError: when `vector_size < 1`, or `sparsity` is outside [0, 1) or keeps no run.
    """
    check_int(vector_size, "vector_size", 1, name=name)
    _as_matrix(weight, name)
    keep = units_to_keep(tile_count(weight, 1, vector_size), sparsity, "vector", name)
    return tile_mask(weight, 1, vector_size, keep, prev_mask)
