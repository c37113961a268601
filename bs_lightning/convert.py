"""`convert_to_sparse`: swap a pruned model's balanced layers for sparse inference modules.

Converted (exact types: a subclass may compute something else in its forward):
`nn.Linear` -> `BalancedSparseLinear`, `nn.Conv2d` -> `BalancedSparseConv2d`, `nn.LSTM` ->
`BalancedSparseLSTM`, Hugging Face GPT-2 `Conv1D` -> `BalancedSparseConv1D`, and
`nn.MultiheadAttention` -> `BalancedSparseMultiheadAttention` (its packed `in_proj_weight` and
its `out_proj` together; either may stay dense). Containers follow: an
`nn.TransformerEncoderLayer` with a converted layer becomes a
`BalancedSparseTransformerEncoderLayer` (same computation without the fused fast path that
reads `linear1.weight`), an `nn.TransformerEncoder` holding one stops using nested tensors
(`use_nested_tensor = False`: that path also reads the dense weights), and an
`nn.TransformerDecoderLayer` keeps its class (its forward calls its children). Attention with
`kdim`/`vdim != embed_dim`, `add_bias_kv` or `add_zero_attn` does not convert. Planned layers
left dense are listed in one warning.

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
   more, so kept weights that are zero by chance do not break it). Attention that cannot
   convert is skipped.
A layer whose matrices are all dense (`k == bank_size`) stays dense.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from bs_lightning.nn import (
    BalancedSparseConv1D,
    BalancedSparseConv2d,
    BalancedSparseLinear,
    BalancedSparseLSTM,
    BalancedSparseMultiheadAttention,
    BalancedSparseTransformerEncoderLayer,
)
from bs_lightning.nn.attention import check_attention_converts
from bs_lightning.nn.base import BalancedSparseModule
from bs_lightning.nn.format import infer_bank_layout, infer_keep_count
from bs_lightning.nn.lstm import lstm_weight_names
from bs_lightning.nn.swap import replace_submodule
from bs_lightning.sparsity.params import is_transposed, matrix_view
from bs_lightning.sparsity.plan import PlannedParam, SparsityPlan

__all__ = ["conversion_report", "convert_to_sparse", "densify"]

_EXACT_TYPES = {
    nn.Linear: BalancedSparseLinear,
    nn.Conv2d: BalancedSparseConv2d,
    nn.LSTM: BalancedSparseLSTM,
    nn.MultiheadAttention: BalancedSparseMultiheadAttention,
}
# converted modules: torch's fused paths cannot read their (compact) weights
_SPARSE_CHILDREN = (BalancedSparseModule, BalancedSparseMultiheadAttention)


def _sparse_type(module: nn.Module):
    """The sparse module class for `module`, or None when it is not converted."""
    if is_transposed(module):
        return BalancedSparseConv1D
    return _EXACT_TYPES.get(type(module))


def _full(name: str, suffix: str) -> str:
    return f"{name}.{suffix}" if name else suffix


def _matrices(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Parameter name below `module` -> `(owner, its name there)` of every matrix the
    conversion packs (attention: its `in_proj_weight` and its child `out_proj.weight`)."""
    if type(module) is nn.MultiheadAttention:
        return {
            "in_proj_weight": (module, "in_proj_weight"),
            "out_proj.weight": (module.out_proj, "weight"),
        }
    if isinstance(module, nn.LSTM):
        return {w: (module, w) for w in lstm_weight_names(module.num_layers, module.bidirectional)}
    return {"weight": (module, "weight")}


def _inferred_layout(owner: nn.Module, param_name: str, bank_size: int | None, name: str):
    """`(bank_size, k)` of one weight matrix read from its zeros (rule 3 of the docstring)."""
    where = name if param_name == "weight" else f"{name}.{param_name}"
    matrix = matrix_view(owner, param_name).detach()  # [out, in]
    if matrix.shape[1] < 2:
        return 1, 1  # one column: nothing to prune, dense
    if bank_size is not None:
        return bank_size, infer_keep_count(matrix, bank_size, where)
    return infer_bank_layout(matrix, where)


def _build(module: nn.Module, layouts: dict[str, tuple[int, int] | None], name: str):
    """The sparse replacement of `module` for `{matrix: (bank, k) or None}`, or None if all
    its matrices are dense (`None` or `k == bank`)."""
    sparse = {m: layout for m, layout in layouts.items() if layout and layout[1] < layout[0]}
    if not sparse:
        return None
    sparse_type = _sparse_type(module)
    if sparse_type is BalancedSparseMultiheadAttention:
        return sparse_type.from_dense(
            module, sparse.get("in_proj_weight"), sparse.get("out_proj.weight"), name
        )
    if sparse_type is BalancedSparseLSTM:
        banks = {w: bank for w, (bank, _) in layouts.items()}
        keeps = {w: k for w, (_, k) in layouts.items()}
        return sparse_type.from_dense(module, banks, k=keeps, name=name)
    bank, k = layouts["weight"]
    return sparse_type.from_dense(module, bank, k=k, name=name)


def _check_planned(owner: nn.Module, entry: PlannedParam, label: str) -> None:
    param = owner._parameters.get(entry.param)
    if param is None:
        raise ValueError(
            f"layer {label!r} ({type(owner).__name__}) has no parameter {entry.param!r}, "
            f"which the sparsity plan prunes"
        )
    if tuple(param.shape) != entry.shape:
        raise ValueError(
            f"layer {label!r}: the sparsity plan prunes {entry.param} of shape "
            f"{entry.shape}, the model's has shape {tuple(param.shape)}"
        )


def _planned_layouts(module: nn.Module, planned: dict[str, PlannedParam]):
    """`{matrix: (bank, k) or None}` from the plan. An unplanned LSTM matrix beside planned
    ones is stored whole (`k = bank`); an unplanned attention projection stays dense."""
    layouts = {m: e.compact_layout for m, e in planned.items()}
    if isinstance(module, nn.LSTM):
        bank = next(iter(layouts.values()))[0]
        for w in _matrices(module):
            layouts.setdefault(w, (bank, bank))
    return layouts


def _from_plan(model: nn.Module, plan: SparsityPlan, strict: bool):
    """Replacements for the planned layers, the labels of planned layers left dense for want
    of a sparse module, and those whose pattern has no sparse format."""
    modules = dict(model.named_modules())
    missing = [m for m in plan.modules() if m not in modules]
    if missing:
        raise ValueError(
            f"the sparsity plan prunes modules {missing} that {type(model).__name__} does not "
            f"have; was the plan made for another model?"
        )
    replacements: dict[str, nn.Module] = {}
    dense: list[str] = []
    no_format: list[str] = []
    consumed: set[str] = set()  # planned parameter names a convertible layer answered for
    for name, module in modules.items():
        if _sparse_type(module) is None:
            continue
        label = name or type(module).__name__
        if type(module) is nn.MultiheadAttention:
            own = [e.name for e in plan if e.module in (name, _full(name, "out_proj"))]
            if not own:
                continue
            try:
                check_attention_converts(module, label)
            except ValueError as err:
                if strict:
                    raise ValueError(f"{err}; pass strict=False to leave it dense") from err
                consumed.update(own)
                dense.append(label)
                continue
        matrices = _matrices(module)
        planned = {m: plan[_full(name, m)] for m in matrices if _full(name, m) in plan}
        if not planned:
            continue
        consumed.update(e.name for e in planned.values())
        for m, entry in planned.items():
            _check_planned(matrices[m][0], entry, label)
        converting = {m: e for m, e in planned.items() if e.pattern.converts}
        if not converting:
            no_format.append(label)  # unstructured, block, vector: no sparse format
            continue
        try:
            sparse = _build(module, _planned_layouts(module, converting), label)
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
    for entry in plan:
        if entry.name not in consumed:
            left = dense if entry.pattern.converts else no_format
            label = entry.module or type(model).__name__
            if label not in left:
                left.append(label)
    return replacements, dense, no_format


def _inferred(model: nn.Module, strict: bool, bank_size: int | None):
    """Replacements for every convertible layer, layouts read from the zeros."""
    replacements: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if _sparse_type(module) is None:
            continue
        label = name or type(module).__name__
        if type(module) is nn.MultiheadAttention:
            try:
                check_attention_converts(module, label)
            except ValueError:
                continue  # separate q/k/v weights: nothing to read a layout from
        if any(owner._parameters[p].numel() == 0 for owner, p in _matrices(module).values()):
            continue  # a zero-size layer: nothing to convert
        try:
            layouts = {
                m: _inferred_layout(owner, p, bank_size, label)
                for m, (owner, p) in _matrices(module).items()
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


def _adapt_containers(root: nn.Module) -> nn.Module:
    """Encoder layers with converted children leave the fused path; their encoders stop
    using nested tensors (see the module docstring). Returns the (possibly new) root."""
    layers = [
        name
        for name, m in root.named_modules()
        if type(m) is nn.TransformerEncoderLayer
        and any(isinstance(c, _SPARSE_CHILDREN) for c in (m.self_attn, m.linear1, m.linear2))
    ]
    for name in layers:
        layer = BalancedSparseTransformerEncoderLayer.from_dense(root.get_submodule(name))
        root = replace_submodule(root, name, layer)
    for m in root.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(layer, BalancedSparseTransformerEncoderLayer) for layer in m.layers
        ):
            m.use_nested_tensor = False
    return root


def conversion_report(model: nn.Module, plan: SparsityPlan) -> tuple[list[str], list[str]]:
    """Which pruned layers of a converted `model` hold compact weights, and which stay dense.

    A layer is pruned when one of its planned matrices has a sparsity above 0 (and, for a
    pattern that converts, keeps fewer than a bank); it counts as converted when that matrix
    is stored compactly now (an attention layer's `in_proj_weight` in its sparse `in_proj`).

    Args:
        model: the model after `convert_to_sparse`.
        plan: the plan it was converted with.

    Returns:
        `(converted, dense)`: module names, in plan order.
    """
    converted: list[str] = []
    dense: list[str] = []
    for entry in plan:
        layout = entry.compact_layout
        if entry.sparsity == 0 or (layout is not None and layout[1] >= layout[0]):
            continue  # planned, not pruned (yet)
        try:
            module = model.get_submodule(entry.module)
        except AttributeError:
            module = None
        if isinstance(module, BalancedSparseMultiheadAttention):
            module = module.in_proj
        label = entry.module or type(model).__name__
        target = converted if isinstance(module, BalancedSparseModule) else dense
        if label not in converted + dense:
            target.append(label)
    return converted, dense


def densify(model: nn.Module) -> nn.Module:
    """A copy of `model` with every sparse module replaced by its dense equivalent.

    The inverse of `convert_to_sparse` up to module classes (an encoder layer keeps its
    `BalancedSparseTransformerEncoderLayer` class, which computes the same with dense children):
    the dense baseline of a model that exists only in compact form (e.g. `load_sparse`).
    """
    dense = copy.deepcopy(model)
    done: list[str] = []
    for name, module in list(dense.named_modules()):
        if any(name.startswith(p) for p in done):
            continue  # inside a module already replaced (an attention's projections)
        if isinstance(module, _SPARSE_CHILDREN):
            dense = replace_submodule(dense, name, module.to_dense())
            done.append(name + ".")
    return dense


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
    root = _adapt_containers(root)
    if plan is not None:
        plan.record(root)
    return root
