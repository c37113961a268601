"""One-shot balanced magnitude pruning of a Hugging Face model, then conversion to sparse modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from torch import nn

from bs_lightning.hf.select import select_layers
from bs_lightning.nn import BalancedSparseConv1D, BalancedSparseLinear
from bs_lightning.nn.format import MAX_BANK_SIZE, infer_keep_count
from bs_lightning.sparsity import (
    balanced_mask_k,
    bank_layout,
    keep_count,
    matrix_to_param,
    matrix_view,
)

__all__ = ["prune_and_convert", "prune_balanced_"]


def _check_bank_size(bank_size: int) -> int:
    if isinstance(bank_size, bool) or not isinstance(bank_size, int):
        raise ValueError(f"bank_size must be an integer in [1, {MAX_BANK_SIZE}], got {bank_size!r}")
    if not 1 <= bank_size <= MAX_BANK_SIZE:
        raise ValueError(
            f"bank_size must be in [1, {MAX_BANK_SIZE}] (in-bank indices are uint8), "
            f"got {bank_size}"
        )
    return bank_size


@torch.no_grad()
def prune_balanced_(
    layers: Sequence[tuple[str, nn.Module]], sparsity: float, bank_size: int
) -> None:
    """Zeroes all but the `k` largest |w| of every bank of every layer's weight, in place.

    Records `module._bs_lightning_banks["weight"] = (bank_size, k)` as the pruning callback
    does (docs/ARCHITECTURE.md section 5), so conversion needs no inference.

    Args:
        layers: `[(name, module)]` from `select_layers`; each module has a 2-D `weight`.
        sparsity: target sparsity in [0, 1); `k = round(bank_size * (1 - sparsity))`.
        bank_size: columns per bank, in [1, 256] and at most the layer's input features.

    Raises:
        ValueError: when the sparsity keeps 0 weights per bank or is outside [0, 1), or the
            bank is longer than a layer's rows (naming the layer).
    """
    # check every layer before changing any
    k = keep_count(bank_size, sparsity)
    for name, module in layers:
        bank_layout(matrix_view(module, "weight").shape[1], bank_size, k, name)
    for name, module in layers:
        matrix = matrix_view(module, "weight")  # [out, in]
        mask = balanced_mask_k(matrix, bank_size, k, name)
        module.weight.mul_(matrix_to_param(module, "weight", mask))
        module.__dict__.setdefault("_bs_lightning_banks", {})["weight"] = (bank_size, k)


def _sparse_type(module: nn.Module) -> type[nn.Module]:
    return BalancedSparseLinear if isinstance(module, nn.Linear) else BalancedSparseConv1D


def prune_and_convert(
    model: transformers.PreTrainedModel,
    sparsity: float | None,
    bank_size: int = 32,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> transformers.PreTrainedModel:
    """Prunes the selected layers to balanced sparsity and swaps in sparse modules, in place.

    Layers: see `bs_lightning.hf.select` (by default every `nn.Linear` / GPT-2 `Conv1D`
    inside the numbered transformer blocks; embeddings, norms, pooler and heads stay dense).

    Args:
        model: a `transformers.PreTrainedModel` (any head).
        sparsity: target sparsity in [0, 1) for one-shot magnitude pruning; None converts
            layers that are already balanced (e.g. pruned by `BalancedPruningCallback`),
            using their recorded `(bank_size, k)` or, without a record, `bank_size` and `k`
            read from the zeros; selected layers that are not pruned at all stay dense.
        bank_size: columns per bank `B` in [1, 256]; `k = round(B * (1 - sparsity))`.
        include: glob(s) on module names selecting the layers instead of the default rule.
        exclude: glob(s) on module names to leave dense.

    Returns:
        `model`, whose selected layers are now `BalancedSparseLinear` (for `nn.Linear`) or
        `BalancedSparseConv1D` (for GPT-2 `Conv1D`).

    Raises:
        TypeError: when `model` is not a `PreTrainedModel`, or an include glob names a layer
            that cannot be converted.
        ValueError: when `sparsity` or `bank_size` are invalid (also for a layer, naming
            it), a glob matches nothing, or with `sparsity=None` a layer is not balanced or
            no selected layer is pruned. The model is unchanged after any error.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    _check_bank_size(bank_size)
    layers = select_layers(model, include, exclude)
    if sparsity is not None:
        prune_balanced_(layers, sparsity, bank_size)
    replacements = {}
    for name, module in layers:
        # (bank_size, k) recorded by prune_balanced_ or the pruning callback; without one,
        # k is read from the zeros (raising, naming the layer, when they are not balanced)
        bank, k = getattr(module, "_bs_lightning_banks", {}).get("weight", (bank_size, None))
        if k is None:
            k = infer_keep_count(matrix_view(module, "weight").detach(), bank, name)
            if k == bank:
                continue  # never pruned: stays dense, as convert_to_sparse does
        replacements[name] = _sparse_type(module).from_dense(module, bank, k=k, name=name)
    if not replacements:
        raise ValueError(
            f"none of the {len(layers)} selected layers of {type(model).__name__} is pruned "
            f"(every bank of {bank_size} columns is full); pass a sparsity to prune them"
        )
    # swap only once every layer converted: an error leaves the model as it was
    for name, sparse in replacements.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, sparse)
    return model
