"""One-shot pruning: the single place where a weight is pruned outside the callback.

By magnitude, by given scores (`prune_once_`), or by a calibrated method (`prune_calibrated_`):
Wanda's scores or SparseGPT's masks and weight updates, from calibration batches run through
the model (`bs_lightning.sparsity.calibration`, `bs_lightning.sparsity.sparsegpt`).

Used by the inference modules' `from_dense(sparsity=...)`, by
`bs_lightning.hf.prune_and_convert` and by the benchmarks. Every layer is validated before
any weight changes, and the result is a `SparsityPlan` describing what was done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from bs_lightning.sparsity.calibration import (
    check_calibratable,
    input_hessians,
    input_norms,
    run_batches,
    stages,
    wanda_scores,
)
from bs_lightning.sparsity.params import PrunableParam, matrix_to_param
from bs_lightning.sparsity.patterns import Pattern
from bs_lightning.sparsity.plan import PlannedParam, SparsityPlan
from bs_lightning.sparsity.sparsegpt import sparsegpt_prune

__all__ = ["METHODS", "check_method", "prune_calibrated_", "prune_matrix", "prune_once_"]

# one-shot pruning criteria: magnitude needs nothing, the others calibration batches
METHODS = ("magnitude", "wanda", "sparsegpt")


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
    _mask_(params, pattern, keeps, ranked)
    return _plan(params, pattern, [sparsity] * len(params), keeps)


def _mask_(params, pattern, keeps, ranked) -> dict[str, torch.Tensor]:
    """Keeps each parameter's `keep` highest-ranked units; the masks in parameter shape."""
    masks = {}
    for p, keep, matrix in zip(params, keeps, ranked, strict=True):
        mask = matrix_to_param(p.module, p.param_name, pattern.mask(matrix, keep))
        p.param.mul_(mask.to(p.param.dtype))
        masks[p.name] = mask
    return masks


def check_method(method: str, has_calibration: bool = True) -> None:
    """Validates a one-shot method name (and that a calibrated one has calibration).

    Raises:
        ValueError: for an unknown method, or `"wanda"`/`"sparsegpt"` without calibration.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method != "magnitude" and not has_calibration:
        raise ValueError(
            f"method {method!r} needs calibration batches (an iterable of model inputs, e.g. "
            f"tokenizer outputs); method='magnitude' needs none"
        )


def _targets(params: Sequence[PrunableParam], sparsity: float | Sequence[float]) -> list[float]:
    if isinstance(sparsity, (int, float)):
        return [float(sparsity)] * len(params)
    targets = [float(s) for s in sparsity]
    if len(targets) != len(params):
        raise ValueError(f"sparsity has {len(targets)} targets for {len(params)} parameters")
    return targets


def _check_blocks(pattern: Pattern, blocksize: int) -> None:
    side = getattr(pattern, "side", None)  # tile patterns choose masks per whole tile
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be an integer >= 1, got {blocksize!r}")
    if side is not None and blocksize % side[1]:
        raise ValueError(
            f"SparseGPT with {pattern.describe()} needs blocksize a multiple of the tile "
            f"width {side[1]}, got {blocksize}"
        )


@torch.no_grad()
def prune_calibrated_(
    run: Callable[[object], object],
    params: Sequence[PrunableParam],
    pattern: Pattern,
    sparsity: float | Sequence[float],
    method: str,
    calibration: Iterable | None,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
) -> tuple[SparsityPlan, dict[str, torch.Tensor]]:
    """Prunes every parameter in place by `method`, all checked before any changes.

    - `"magnitude"`: the largest |w| (as `prune_once_`); `calibration` is not used.
    - `"wanda"`: the largest `|w| * ||x_c||` (`wanda_scores`), one pass over the
      calibration on the unpruned model.
    - `"sparsegpt"`: layer after layer in the order the model calls them, each layer's
      Hessian captured from inputs through the already pruned layers before it, its mask
      chosen by OBS saliency and its remaining weights updated (`sparsegpt_prune`). Layers
      fed the same input (query, key, value) are measured in one pass; each pass stops at
      the layers being measured. One layer's Hessian (`[in, in]` float32) at a time.

    The model is run in whatever mode it is in (callers put it in eval mode).

    Args:
        run: runs the model on one calibration batch (`calibration.run_inputs(model)`).
        params: the parameters to prune (`find_prunable`), layers `check_calibratable`
            accepts for the calibrated methods.
        pattern: the pattern to prune to.
        sparsity: target in [0, 1), or one target per parameter.
        method: one of `METHODS`.
        calibration: the calibration batches (iterated more than once by SparseGPT, so they
            are kept in a list).
        damp: SparseGPT's dampening (fraction of the mean Hessian diagonal), > 0.
        blocksize: SparseGPT's columns per lazy update block.

    Returns:
        `(plan, masks)`: the plan of what was pruned and, per parameter name, its bool mask
        in the parameter's shape (True = kept).

    Raises:
        ValueError: for an unknown method, missing or empty calibration, a batch the model
            cannot run (naming its index), an invalid sparsity for a layer (naming it), a bad
            `damp`/`blocksize`; TypeError for a layer whose inputs cannot calibrate. No weight
            changes after any of these.
    """
    check_method(method, calibration is not None)
    targets = _targets(params, sparsity)
    checked = {s: pattern.check_target(s) for s in dict.fromkeys(targets)}  # once per value
    targets = [checked[s] for s in targets]
    keeps = [pattern.keep(p.matrix(), s, _label(p)) for p, s in zip(params, targets, strict=True)]
    ranked = [p.matrix() for p in params]
    if method != "magnitude":
        check_calibratable(params, method)
        batches = list(calibration)
        if method == "sparsegpt":
            _check_blocks(pattern, blocksize)
            if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
                raise ValueError(f"damp must be a number > 0, got {damp!r}")
            return _sparsegpt_(run, params, pattern, targets, keeps, batches, damp, blocksize)
        scores = wanda_scores(params, input_norms(run, params, batches))
        ranked = [scores[p.name] for p in params]
    masks = _mask_(params, pattern, keeps, ranked)
    return _plan(params, pattern, targets, keeps), masks


def _sparsegpt_(run, params, pattern, targets, keeps, batches, damp, blocksize):
    """SparseGPT stage by stage, after one full pass over every batch (a batch the model
    cannot run fails there, before any weight changes)."""
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of model inputs")
    ordered, once = stages(run, params, batches[0])
    if len(batches) > 1:
        run_batches(run, batches[1:], first=1)
    by_name = {p.name: keep for p, keep in zip(params, keeps, strict=True)}
    masks = {}
    for stage in ordered:
        hessians = input_hessians(run, stage, batches, stop_early=once)
        for p in stage:
            keep = by_name[p.name]
            pruned, mask = sparsegpt_prune(
                p.matrix().detach(),
                hessians.pop(p.name),
                pattern,
                keep,
                damp=damp,
                blocksize=blocksize,
                name=_label(p),
            )
            p.param.copy_(matrix_to_param(p.module, p.param_name, pruned).to(p.param.dtype))
            masks[p.name] = matrix_to_param(p.module, p.param_name, mask)
    return _plan(params, pattern, targets, keeps), masks


def _plan(params, pattern, targets, keeps) -> SparsityPlan:
    return SparsityPlan(
        PlannedParam(p.module_name, p.param_name, pattern, s, keep, tuple(p.param.shape))
        for p, s, keep in zip(params, targets, keeps, strict=True)
    )
