"""`convert_to_sparse`: swap a pruned model's balanced layers for sparse inference modules.

Converted: `nn.Linear`, `nn.Conv2d`, `nn.LSTM` (exact types: a subclass may compute
something else in its forward) and Hugging Face GPT-2 `Conv1D`. Everything else stays
dense, in particular `nn.MultiheadAttention` (its forward reads `in_proj_weight` and
`out_proj.weight` directly in `F.multi_head_attention_forward`, so it would need a
re-implemented attention; its `out_proj` is left alone too) and everything inside an
`nn.TransformerEncoderLayer` (its eval-mode fast path, and `nn.TransformerEncoder`'s, pass
`linear1.weight`/`linear2.weight` to a fused kernel). Planned layers left dense this way are
listed in one warning.

Which layers, with which bank size and keep-count, in order of preference:
1. the `plan=` argument (a `SparsityPlan`: from `BalancedPruningCallback.plan`,
   `SparsityPlan.from_checkpoint`, one-shot pruning or a saved Hugging Face folder): exactly
   the planned parameters whose pattern converts (balanced, N:M), with the planned bank size
   and keep-count; a layer whose shape or zeros do not fit its plan raises, naming the layer
   and what differs. Unplanned layers stay as they are;
2. else the plan recorded for this model in this process (`SparsityPlan.recorded`: the
   callback records one for the model it trains), used the same way;
3. else, without any plan, every convertible layer is read from its zeros: with
   `bank_size=` only `k` is inferred (`infer_keep_count`); without it both are
   (`infer_bank_layout`: the smallest bank size 2..256 at which the matrix is balanced and
   sparse wins, so a bank-16, k=2 mask reads as bank 16, never as bank 32, k=4; a bank
   counts as balanced when more than half of the banks hold the largest count and none holds
   more, so kept weights that are zero by chance do not break it).
A layer whose matrices are all dense (`k == bank_size`) stays dense.
"""

from __future__ import annotations

import warnings

from torch import nn

from bs_lightning.nn import (
    BalancedSparseConv1D,
    BalancedSparseConv2d,
    BalancedSparseLinear,
    BalancedSparseLSTM,
)
from bs_lightning.nn.format import infer_bank_layout, infer_keep_count
from bs_lightning.nn.lstm import lstm_weight_names
from bs_lightning.nn.swap import replace_submodule
from bs_lightning.sparsity.params import is_transposed, matrix_view
from bs_lightning.sparsity.plan import PlannedParam, SparsityPlan

__all__ = ["convert_to_sparse"]

# Kept dense with all their children: attention reads its weights directly, and
# TransformerEncoderLayer/TransformerEncoder's fused inference fast path reads
# `linear1.weight`/`linear2.weight` directly.
_KEEP_DENSE = (nn.MultiheadAttention, nn.TransformerEncoderLayer)

_EXACT_TYPES = {
    nn.Linear: BalancedSparseLinear,
    nn.Conv2d: BalancedSparseConv2d,
    nn.LSTM: BalancedSparseLSTM,
}


def _sparse_type(module: nn.Module):
    """The sparse module class for `module`, or None when it is not converted."""
    if is_transposed(module):
        return BalancedSparseConv1D
    return _EXACT_TYPES.get(type(module))


def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.LSTM):
        return lstm_weight_names(module.num_layers, module.bidirectional)
    return ["weight"]


def _inferred_layout(module: nn.Module, param_name: str, bank_size: int | None, name: str):
    """`(bank_size, k)` of one weight matrix read from its zeros (rule 3 of the docstring)."""
    where = name if param_name == "weight" else f"{name}.{param_name}"
    matrix = matrix_view(module, param_name).detach()  # [out, in]
    if matrix.shape[1] < 2:
        return 1, 1  # one column: nothing to prune, dense
    if bank_size is not None:
        return bank_size, infer_keep_count(matrix, bank_size, where)
    return infer_bank_layout(matrix, where)


def _build(module: nn.Module, layouts: dict[str, tuple[int, int]], name: str):
    """The sparse replacement of `module` for `{weight name: (bank, k)}`, or None if dense."""
    if all(k == bank for bank, k in layouts.values()):
        return None
    sparse_type = _sparse_type(module)
    if sparse_type is BalancedSparseLSTM:
        banks = {w: bank for w, (bank, _) in layouts.items()}
        keeps = {w: k for w, (_, k) in layouts.items()}
        return sparse_type.from_dense(module, banks, k=keeps, name=name)
    bank, k = layouts["weight"]
    return sparse_type.from_dense(module, bank, k=k, name=name)


def _check_planned(module: nn.Module, entry: PlannedParam, label: str) -> None:
    param = module._parameters.get(entry.param)
    if param is None:
        raise ValueError(
            f"layer {label!r} ({type(module).__name__}) has no parameter {entry.param!r}, "
            f"which the sparsity plan prunes"
        )
    if tuple(param.shape) != entry.shape:
        raise ValueError(
            f"layer {label!r}: the sparsity plan prunes {entry.param} of shape "
            f"{entry.shape}, the model's has shape {tuple(param.shape)}"
        )


def _planned_layouts(module: nn.Module, planned: dict[str, PlannedParam], label: str):
    """`{weight name: (bank, k)}` from the plan; matrices the plan leaves out stay dense."""
    layouts = {p: e.compact_layout for p, e in planned.items() if p in _weight_names(module)}
    bank = next(iter(layouts.values()))[0]
    for w in _weight_names(module):
        if w not in layouts:
            # an unplanned LSTM matrix beside planned ones: stored whole (k = bank)
            layouts[w] = (bank, bank)
    return layouts


def _from_plan(model: nn.Module, plan: SparsityPlan, strict: bool):
    """Replacements for the planned layers, the labels of planned layers left dense for want
    of a sparse module, and those whose pattern has no sparse format."""
    modules = dict(model.named_modules())
    planned_modules = plan.modules()
    missing = [m for m in planned_modules if m not in modules]
    if missing:
        raise ValueError(
            f"the sparsity plan prunes modules {missing} that {type(model).__name__} does not "
            f"have; was the plan made for another model?"
        )
    keep_dense = [n + "." for n, m in modules.items() if isinstance(m, _KEEP_DENSE)]
    replacements: dict[str, nn.Module] = {}
    dense: list[str] = []
    no_format: list[str] = []
    for name, module in modules.items():
        planned = planned_modules.get(name)
        if not planned:
            continue
        label = name or type(module).__name__
        for entry in planned.values():
            _check_planned(module, entry, label)
        converting = {p: e for p, e in planned.items() if e.pattern.converts}
        inside_dense = isinstance(module, _KEEP_DENSE) or any(
            name.startswith(p) for p in keep_dense
        )
        if not converting:
            # the pattern has no sparse format (unstructured, block, vector)
            no_format.append(label)
            continue
        if inside_dense or _sparse_type(module) is None:
            dense.append(label)
            continue
        try:
            sparse = _build(module, _planned_layouts(module, converting, label), label)
        except ValueError as err:
            described = ", ".join(
                f"{e.param}: {e.pattern.describe()} keeping {e.keep}" for e in converting.values()
            )
            if strict:
                raise ValueError(
                    f"layer {label!r} ({type(module).__name__}) does not match its sparsity "
                    f"plan ({described}): {err}"
                ) from err
            dense.append(label)
            continue
        if sparse is not None:
            replacements[name] = sparse
    return replacements, dense, no_format


def _inferred(model: nn.Module, strict: bool, bank_size: int | None):
    """Replacements for every convertible layer, layouts read from the zeros."""
    skip: list[str] = []  # prefixes of modules whose children stay as they are
    replacements: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _KEEP_DENSE):
            skip.append(name + ".")
        if any(name.startswith(p) for p in skip) or isinstance(module, _KEEP_DENSE):
            continue
        if _sparse_type(module) is None:
            continue
        label = name or type(module).__name__
        try:
            layouts = {
                w: _inferred_layout(module, w, bank_size, label) for w in _weight_names(module)
            }
            sparse = _build(module, layouts, label)
        except ValueError as err:
            if strict:
                raise ValueError(
                    f"layer {label!r} ({type(module).__name__}) cannot be converted: {err}. "
                    "Pass strict=False to leave it dense, or bank_size= to set its bank size."
                ) from err
            continue
        if sparse is not None:
            replacements[name] = sparse
    return replacements


def convert_to_sparse(
    model: nn.Module,
    plan: SparsityPlan | None = None,
    strict: bool = True,
    bank_size: int | None = None,
) -> nn.Module:
    """Replaces the balanced-sparse layers of `model` with sparse inference modules.

    `nn.Linear` -> `BalancedSparseLinear`, `nn.Conv2d` -> `BalancedSparseConv2d`,
    `nn.LSTM` -> `BalancedSparseLSTM`, GPT-2 `Conv1D` -> `BalancedSparseConv1D`, in place,
    keeping each layer's device, dtype and train/eval mode. See the module docstring for
    which layers convert and how bank size and keep-count are found. The plan used is
    recorded for the converted model (`SparsityPlan.recorded`), so `save_sparse` finds it.

    Args:
        model: any module, typically pruned by `BalancedPruningCallback`.
        plan: what was pruned how; None uses the plan recorded for `model` in this process,
            and without one reads every layer from its zeros.
        strict: True raises for a layer that does not fit its plan or, without a plan, is
            not balanced; False leaves it dense.
        bank_size: without a plan, the bank size of every layer (`k` is read from the
            zeros); None infers it. Ignored when a plan is used.

    Returns:
        `model` (when `model` itself is a convertible layer: its sparse replacement).

    Raises:
        ValueError: with `strict=True`, when a layer does not match its plan (shape, bank
            size, keep-count) or is not balanced, naming the layer; when the plan names a
            module the model does not have (always).
    """
    if plan is None:
        plan = SparsityPlan.recorded(model)
    if plan is not None:
        replacements, dense, no_format = _from_plan(model, plan, strict)
        if dense:
            warnings.warn(
                f"convert_to_sparse: pruned layers without a sparse module stay dense: {dense}",
                stacklevel=2,
            )
        if no_format:
            patterns = sorted({e.pattern.describe() for e in plan if not e.pattern.converts})
            warnings.warn(
                f"convert_to_sparse: layers pruned to {patterns} stay dense (only balanced and "
                f"N:M patterns have a sparse format): {no_format}",
                stacklevel=2,
            )
    else:
        replacements = _inferred(model, strict, bank_size)
    root = model
    for name, sparse in replacements.items():
        root = replace_submodule(root, name, sparse)
    if plan is not None:
        plan.record(root)
    return root
