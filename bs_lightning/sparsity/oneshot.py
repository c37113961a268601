"""One-shot pruning: the single place where a weight is pruned outside the callback.

By magnitude, or by given scores (`wanda_scores` of `bs_lightning.sparsity.calibration`).

Used by the inference modules' `from_dense(sparsity=...)`, by
`bs_lightning.hf.prune_and_convert` and by the benchmarks. Every layer is validated before
any weight changes, and the result is a `SparsityPlan` describing what was done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from bs_lightning.sparsity.params import PrunableParam, matrix_to_param
from bs_lightning.sparsity.patterns import Pattern
from bs_lightning.sparsity.plan import PlannedParam, SparsityPlan

__all__ = ["prune_matrix", "prune_once_"]


def prune_matrix(
    matrix: torch.Tensor, pattern: Pattern, sparsity: float, name: str | None = None
) -> tuple[torch.Tensor, int]:
    """A pruned copy of a `[out, in]` matrix view and its keep-count.

    Args:
        matrix: `[out, in]` matrix view of a weight (not changed).
        pattern: the pattern to prune to.
        sparsity: target sparsity in [0, 1).
        name: layer name used in error messages.

    Returns:
        `(pruned [out, in], keep)`, `pruned` with exact zeros at the pruned entries.

    Raises:
        ValueError: when the sparsity is invalid for the layer (see `Pattern.keep`).
    """
    keep = pattern.keep(matrix, sparsity, name)
    return matrix.masked_fill(~pattern.mask(matrix, keep), 0), keep


def _label(p: PrunableParam) -> str:
    # a layer's one weight is named by its module, as conversion and `bs_lightning.hf` do
    return p.module_name if p.param_name == "weight" and p.module_name else p.name


@torch.no_grad()
def prune_once_(
    params: Sequence[PrunableParam],
    pattern: Pattern,
    sparsity: float,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> SparsityPlan:
    """Prunes every parameter in place to `sparsity`, all checked before any changes.

    Args:
        params: the parameters to prune, e.g. from `find_prunable`.
        pattern: the pattern to prune to.
        sparsity: target sparsity in [0, 1).
        scores: optional importance per parameter name, `[out, in]` like its matrix view
            and >= 0 (e.g. `wanda_scores`); the pattern keeps the highest scores instead of
            the largest magnitudes.

    Returns:
        The plan of what was pruned (names relative to the model `params` came from).

    Raises:
        ValueError: when the sparsity is invalid for a layer, naming it, or a score is
            missing or has another shape; no weight changed.
    """
    sparsity = pattern.check_target(sparsity)  # layer-independent errors once, unnamed
    keeps = [pattern.keep(p.matrix(), sparsity, _label(p)) for p in params]
    ranked = [p.matrix() for p in params]
    if scores is not None:
        for i, p in enumerate(params):
            score = scores.get(p.name)
            if score is None or score.shape != ranked[i].shape:
                found = None if score is None else tuple(score.shape)
                raise ValueError(
                    f"scores for {p.name!r} must have the matrix shape "
                    f"{tuple(ranked[i].shape)}, got {found}"
                )
            ranked[i] = score
    for p, keep, matrix in zip(params, keeps, ranked, strict=True):
        mask = matrix_to_param(p.module, p.param_name, pattern.mask(matrix, keep))
        p.param.mul_(mask.to(p.param.dtype))
    return SparsityPlan(
        PlannedParam(p.module_name, p.param_name, pattern, sparsity, keep, tuple(p.param.shape))
        for p, keep in zip(params, keeps, strict=True)
    )
