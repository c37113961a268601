"""One-shot balanced pruning of a Hugging Face model (magnitude, Wanda or SparseGPT), then
conversion to sparse modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import transformers
from torch import nn

from bs_lightning.convert import convert_to_sparse
from bs_lightning.hf.select import select_params
from bs_lightning.nn.format import infer_keep_count
from bs_lightning.sparsity import (
    BalancedPattern,
    PlannedParam,
    PrunableParam,
    SparsityPlan,
    prune_once_,
)
from bs_lightning.sparsity.calibration import run_inputs
from bs_lightning.sparsity.oneshot import check_method, prune_calibrated_
from bs_lightning.validation import check_bank_size

__all__ = ["prune_and_convert", "prune_balanced_"]


def _as_params(layers: Sequence[tuple[str, nn.Module]]) -> list[PrunableParam]:
    return [PrunableParam(f"{n}.weight" if n else "weight", n, "weight", m) for n, m in layers]


def prune_balanced_(
    layers: Sequence[tuple[str, nn.Module]], sparsity: float, bank_size: int
) -> SparsityPlan:
    """Zeroes all but the `k` largest |w| of every bank of every layer's weight, in place.

    Args:
        layers: `[(name, module)]` from `select_layers`; each module has a 2-D `weight`.
        sparsity: target sparsity in [0, 1); `k = round(bank_size * (1 - sparsity))`.
        bank_size: columns per bank, in [1, 256] and at most the layer's input features.

    Returns:
        The plan of what was pruned (`bs_lightning.sparsity.prune_once_`).

    Raises:
        ValueError: when the sparsity keeps 0 weights per bank or is outside [0, 1), or the
            bank is longer than a layer's rows (naming the layer); no weight changes then.
    """
    return prune_once_(_as_params(layers), BalancedPattern(check_bank_size(bank_size)), sparsity)


def _prune_calibrated(model, params, sparsity, bank_size, method, calibration) -> SparsityPlan:
    """`prune_calibrated_` of the selected layers, the model in eval mode meanwhile."""
    training = model.training
    model.eval()
    try:
        pattern = BalancedPattern(bank_size)
        plan, _ = prune_calibrated_(
            run_inputs(model), params, pattern, sparsity, method, calibration
        )
        return plan
    finally:
        model.train(training)


def _plan_of_pruned(model: nn.Module, params: list[PrunableParam], bank_size: int) -> SparsityPlan:
    """The plan of already pruned layers: the one recorded for them, else read from zeros."""
    recorded = SparsityPlan.recorded(model)
    pattern = BalancedPattern(bank_size)
    entries = []
    for p in params:
        if recorded is not None and p.name in recorded:
            entries.append(recorded[p.name])
            continue
        k = infer_keep_count(p.matrix().detach(), bank_size, p.module_name)
        if k < bank_size:  # never pruned: stays dense, as convert_to_sparse does
            shape = tuple(p.param.shape)
            entries.append(
                PlannedParam(p.module_name, "weight", pattern, 1 - k / bank_size, k, shape)
            )
    return SparsityPlan(entries)


def prune_and_convert(
    model: transformers.PreTrainedModel,
    sparsity: float | None,
    bank_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    method: str = "magnitude",
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> transformers.PreTrainedModel:
    """Prunes the selected layers to balanced sparsity and swaps in sparse modules, in place.

    Layers: see `bs_lightning.hf.select` (by default every `nn.Linear` / GPT-2 `Conv1D`
    inside the numbered transformer blocks; embeddings, norms, pooler and heads stay dense).
    The plan of what was pruned is recorded for the model (`SparsityPlan.recorded(model)`),
    and `save_sparse` writes it into the saved folder.

    Args:
        model: a `transformers.PreTrainedModel` (any head).
        sparsity: target sparsity in [0, 1) for one-shot magnitude pruning; None converts
            layers that are already balanced (e.g. pruned by `BalancedPruningCallback`),
            using the plan recorded for the model or, without one, `bank_size` and `k`
            read from the zeros; selected layers that are not pruned at all stay dense.
        bank_size: columns per bank `B` in [1, 256]; `k = round(B * (1 - sparsity))`.
        include: glob(s) on module names selecting the layers instead of the default rule.
        exclude: glob(s) on module names to leave dense.
        method: one of `METHODS`: `"magnitude"` (keep the largest |w| of every bank),
            `"wanda"` (keep the largest `|w| * ||x_c||`, the input column's norm over
            `calibration`) or `"sparsegpt"` (layer after layer, masks by OBS saliency and the
            remaining weights updated); see `bs_lightning.sparsity.oneshot.prune_calibrated_`.
        calibration: for `"wanda"` and `"sparsegpt"`, an iterable of model-input batches
            (dicts as a tokenizer returns them), run in eval mode without gradients.

    Returns:
        `model`, whose selected layers are now `BalancedSparseLinear` (for `nn.Linear`) or
        `BalancedSparseConv1D` (for GPT-2 `Conv1D`).

    Raises:
        TypeError: when `model` is not a `PreTrainedModel`, or an include glob names a layer
            that cannot be converted.
        ValueError: when `sparsity` or `bank_size` are invalid (also for a layer, naming
            it), a glob matches nothing, with `sparsity=None` a layer is not balanced or
            no selected layer is pruned, `method` is unknown, or its calibration is missing,
            empty or cannot be run by the model. The model is unchanged after any error.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    check_bank_size(bank_size)
    check_method(method, calibration is not None)
    if method != "magnitude" and sparsity is None:
        raise ValueError(f"method {method!r} prunes: pass a sparsity, not None")
    params = select_params(model, include, exclude)
    if sparsity is not None:
        plan = _prune_calibrated(model, params, sparsity, bank_size, method, calibration)
    else:
        plan = _plan_of_pruned(model, params, bank_size)
    if not any(e.compact_layout[1] < e.compact_layout[0] for e in plan if e.compact_layout):
        raise ValueError(
            f"none of the {len(params)} selected layers of {type(model).__name__} is pruned "
            f"(every bank of {bank_size} columns is full); pass a sparsity to prune them"
        )
    # convert_to_sparse builds every replacement before it swaps any: an error leaves the
    # model as it was
    return convert_to_sparse(model, plan=plan)
