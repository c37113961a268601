"""Which layers of a Hugging Face model are pruned and converted.

The selection is `bs_lightning.sparsity.find_prunable`, the selector the pruning callback
uses, with the same include/exclude glob rules (globs on module or full parameter names);
only the default differs:

Default rule: every Linear-like layer (`nn.Linear`, GPT-2 `transformers.pytorch_utils.Conv1D`)
that lives inside the stack of transformer blocks, i.e. whose qualified name has a numeric
component (`bert.encoder.layer.3.attention.self.query`, `transformer.h.0.mlp.c_fc`,
`model.layers.1.self_attn.q_proj`). Embeddings, norms, the pooler and task heads
(`classifier`, `lm_head`, `score`) sit outside the numbered blocks and are left dense.

With `include`, the layers are the ones an include glob selects instead of the default rule;
a module matched by name that holds a weight matrix it cannot convert (an embedding, a conv)
is an error naming the layer, so a glob never silently skips a layer it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn
from transformers.pytorch_utils import Conv1D

from bs_lightning.sparsity import PrunableParam, find_prunable
from bs_lightning.validation import glob_list

__all__ = ["LINEAR_LIKE", "select_layers", "select_params"]

# layer types that become sparse inference modules (BalancedSparseLinear / ...Conv1D)
LINEAR_LIKE: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def _in_block_linear(module_name: str, module: nn.Module, param_name: str) -> bool:
    # a numbered path component means the module sits in an nn.ModuleList of blocks
    in_block = any(part.isdigit() for part in module_name.split("."))
    return in_block and isinstance(module, LINEAR_LIKE) and param_name == "weight"


def _holds_matrix(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() >= 2


def _unconvertible_error(name: str, module: nn.Module) -> TypeError:
    return TypeError(
        f"cannot convert layer {name!r} of type {type(module).__name__}: convertible types "
        f"are {[t.__name__ for t in LINEAR_LIKE]}; narrow include or add an exclude glob"
    )


def select_params(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[PrunableParam]:
    """The weights to prune and convert, in module order (see the module docstring).

    Args:
        model: any `nn.Module`, typically a `transformers.PreTrainedModel`.
        include: glob(s) on module or parameter names; None = Linear-like layers in the blocks.
        exclude: glob(s) removing layers from the selection.

    Returns:
        One `PrunableParam` (`"weight"`) per selected layer, every module Linear-like.

    Raises:
        TypeError: when an include glob matches a module holding a weight matrix that is
            not Linear-like (e.g. an `nn.Embedding`), naming the layer.
        ValueError: as `find_prunable`: a malformed glob argument, a glob selecting
            nothing, or an empty selection.
    """
    for glob in glob_list(include, "include") or []:
        for name, module in model.named_modules():
            if (
                fnmatchcase(name, glob)
                and _holds_matrix(module)
                and not isinstance(module, LINEAR_LIKE)
            ):
                raise _unconvertible_error(name, module)
    params = find_prunable(model, include, exclude, default=_in_block_linear)
    for p in params:
        if not isinstance(p.module, LINEAR_LIKE) or p.param_name != "weight":
            raise _unconvertible_error(p.module_name, p.module)
    return params


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """`[(qualified_name, module), ...]` of `select_params` (same arguments and errors)."""
    return [(p.module_name, p.module) for p in select_params(model, include, exclude)]
