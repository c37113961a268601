"""`convert_to_sparse`: swap a pruned model's balanced layers for sparse inference modules.

Converted: `nn.Linear`, `nn.Conv2d`, `nn.LSTM` (exact types: a subclass may compute
something else in its forward) and Hugging Face GPT-2 `Conv1D`. Everything else stays
dense, in particular `nn.MultiheadAttention` (its forward reads `in_proj_weight` and
`out_proj.weight` directly in `F.multi_head_attention_forward`, so it would need a
re-implemented attention; its `out_proj` is left alone too) and everything inside an
`nn.TransformerEncoderLayer` (its eval-mode fast path, and `nn.TransformerEncoder`'s, pass
`linear1.weight`/`linear2.weight` to a fused kernel). Pruned layers left dense this way are
listed in one warning.

Bank size and keep-count of each weight matrix, in order of preference:
1. `module._bs_lightning_banks[param_name] = (bank_size, k)`, recorded by
   `BalancedPruningCallback` (docs/ARCHITECTURE.md section 5);
2. else the `bank_size=` argument, with `k` read from the zeros (`infer_keep_count`);
3. else both read from the zeros (`infer_bank_layout`: every bank size 2..256 is tried, the one
   packing the matrix smallest wins, ties to the smaller bank; a bank counts as balanced
   when more than half of the banks hold the largest count and none holds more, so
   kept weights that are zero by chance do not break it).
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
from bs_lightning.sparsity.params import is_transposed, matrix_view

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


def _layout(module: nn.Module, param_name: str, bank_size: int | None, name: str):
    """`(bank_size, k)` of one weight matrix (see the module docstring for the order)."""
    where = name if param_name == "weight" else f"{name}.{param_name}"
    record = getattr(module, "_bs_lightning_banks", {}).get(param_name)
    if record is not None:
        return tuple(record)
    matrix = matrix_view(module, param_name).detach()  # [out, in]
    if matrix.shape[1] < 2:
        return 1, 1  # one column: nothing to prune, dense
    if bank_size is not None:
        return bank_size, infer_keep_count(matrix, bank_size, where)
    return infer_bank_layout(matrix, where)


def _convert_one(module: nn.Module, bank_size: int | None, name: str) -> nn.Module | None:
    """The sparse replacement of `module`, or None when all its matrices are dense.

    Raises:
        ValueError: when a matrix is not balanced (or cannot be packed), naming it.
    """
    layouts = {w: _layout(module, w, bank_size, name) for w in _weight_names(module)}
    if all(k == bank for bank, k in layouts.values()):
        return None
    sparse_type = _sparse_type(module)
    if sparse_type is BalancedSparseLSTM:
        banks = {w: bank for w, (bank, _) in layouts.items()}
        keeps = {w: k for w, (_, k) in layouts.items()}
        return sparse_type.from_dense(module, banks, k=keeps, name=name)
    bank, k = layouts["weight"]
    return sparse_type.from_dense(module, bank, k=k, name=name)


def convert_to_sparse(
    model: nn.Module, strict: bool = True, bank_size: int | None = None
) -> nn.Module:
    """Replaces every balanced-sparse layer of `model` with its sparse inference module.

    `nn.Linear` -> `BalancedSparseLinear`, `nn.Conv2d` -> `BalancedSparseConv2d`,
    `nn.LSTM` -> `BalancedSparseLSTM`, GPT-2 `Conv1D` -> `BalancedSparseConv1D`, in place,
    keeping each layer's device, dtype and train/eval mode. Layers that are dense stay dense;
    see the module docstring for how bank size and keep-count are found.

    Args:
        model: any module, typically pruned by `BalancedPruningCallback`.
        strict: True raises for a layer that is not balanced; False leaves it dense.
        bank_size: bank size of every layer without a record from the callback (`k` is then
            read from the zeros); None infers it.

    Returns:
        `model` (when `model` itself is a convertible layer: its sparse replacement).

    Raises:
        ValueError: with `strict=True`, when a layer is not balanced (or has an invalid
            bank size or an LSTM projection), naming the layer.
    """
    skip: list[str] = []  # prefixes of modules whose children stay as they are
    unsupported: list[str] = []
    replacements: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        label = name or type(module).__name__
        pruned = bool(getattr(module, "_bs_lightning_banks", None))
        if any(name.startswith(p) for p in skip) or isinstance(module, _KEEP_DENSE):
            if isinstance(module, _KEEP_DENSE):
                skip.append(name + ".")
            if pruned:
                unsupported.append(label)
            continue
        if _sparse_type(module) is None:
            if pruned:
                unsupported.append(label)
            continue
        try:
            sparse = _convert_one(module, bank_size, label)
        except ValueError as err:
            if strict:
                raise ValueError(
                    f"layer {label!r} ({type(module).__name__}) cannot be converted: {err}. "
                    "Pass strict=False to leave it dense, or bank_size= to set its bank size."
                ) from err
            continue
        if sparse is not None:
            replacements[name] = sparse
    if unsupported:
        warnings.warn(
            f"convert_to_sparse: pruned layers without a sparse module stay dense: {unsupported}",
            stacklevel=2,
        )
    for name, sparse in replacements.items():
        if not name:
            return sparse
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, sparse)
    return model
