"""SparseGPT for one matrix (Frantar & Alistarh 2023): OBS masks with the weights updated.

Columns are pruned left to right. Pruning column `j` of a row changes the layer's output by
an error the remaining columns `j+1..` can partly cancel: with the inverse Hessian's upper
Cholesky factor `U` of `H = X^T X + damp * mean(diag) * I`, the row's error
`(w_j - q_j) / U[j, j]` is spread over them by `U[j, j:]`. A weight's saliency is
`w^2 / U[j, j]^2`.

Where the pattern fixes the mask per group of columns (`Pattern.row_group`: a balanced bank,
an N:M group), each group's mask is chosen when the sweep reaches its first column, from the
saliencies of that moment: this is SparseGPT's N:M rule with `N = k`, `M = B`. Other patterns
(unstructured, row, block, vector) choose the mask per block of `blocksize` columns at the
block's first column, SparseGPT's adaptive mask selection: each block keeps its share of
the layer's keep-count.
"""

from __future__ import annotations

import torch

from bs_lightning.sparsity.masks import topk_mask_lastdim
from bs_lightning.sparsity.patterns import Pattern

__all__ = ["sparsegpt_prune"]


def _inverse_factor(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, float32 `[in, in]`."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    # an input column that is always zero carries no information: an identity row keeps H
    # invertible and leaves that column's saliency to its weight's magnitude
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    try:
        lower = torch.linalg.cholesky(h)
        factor = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"SparseGPT: the Hessian of {name!r} is not positive definite even with "
            f"damp={damp}; use a larger damp or more calibration samples"
        ) from err
    return factor.float()


def _group_counts(pattern: Pattern, matrix: torch.Tensor, keep: int, group: int) -> list[int]:
    """Weights the pattern keeps in each column group of a row (the same in every row)."""
    reference = pattern.mask(matrix.abs(), keep)[0]
    return [int(reference[j : j + group].sum()) for j in range(0, matrix.shape[1], group)]


@torch.no_grad()
def sparsegpt_prune(
    matrix: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    keep: int,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes a `[out, in]` matrix to `pattern` and updates its remaining weights.

    Args:
        matrix: `[out, in]` matrix view of a weight (not changed).
        hessian: `[in, in]` `X^T X` of the layer's calibration inputs (`input_hessians`).
        pattern: the pattern to prune to.
        keep: the pattern's keep-count for `matrix` at the target (`pattern.keep`).
        damp: dampening, as a fraction of the Hessian's mean diagonal.
        blocksize: columns updated together; rounded to whole groups of `row_group`.
        name: the layer, for error messages.

    Returns:
        `(pruned, mask)`: the updated `[out, in]` matrix (float32, exact zeros where pruned)
        and the bool mask (True = kept).

    Raises:
        ValueError: when the Hessian cannot be inverted.
    """
    rows, cols = matrix.shape
    weight = matrix.detach().float().clone()
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
    if rows == 0 or cols == 0:
        return weight, mask
    factor = _inverse_factor(hessian.to(weight.device), damp, name)
    group = pattern.row_group
    if group is not None:
        blocksize = group * max(1, blocksize // group)
        counts = _group_counts(pattern, weight, keep, group)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()  # updated in place column by column
        inverse = factor[start:end, start:end]
        scale = torch.diagonal(inverse)
        errors = torch.zeros_like(block)
        kept = torch.zeros_like(block, dtype=torch.bool)
        if group is None:
            saliency = block.square() / scale.square()
            # the block's share of the layer's keep-count (a narrow last block may keep 0)
            share = round(keep * pattern.units(saliency) / pattern.units(weight))
            kept = pattern.mask(saliency, share)
        for j in range(end - start):
            if group is not None and (start + j) % group == 0:
                width = min(group, end - start - j)
                saliency = block[:, j : j + width].square() / scale[j : j + width].square()
                count = counts[(start + j) // group]
                kept[:, j : j + width] = topk_mask_lastdim(saliency, count)
            column = block[:, j].clone()
            error = column * ~kept[:, j] / scale[j]
            # the pruned column becomes exactly its kept entries; the rest absorb the error
            block[:, j:] -= error[:, None] * inverse[j, j:][None, :]
            block[:, j] = column * kept[:, j]
            errors[:, j] = error
        weight[:, start:end] = block
        mask[:, start:end] = kept
        weight[:, end:] -= errors @ factor[start:end, end:]
    return weight * mask, mask
