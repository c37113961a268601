"""Which parameters are prunable, and their matrix view (rows = outputs, columns = inputs).

Prunable out of the box:
- `nn.Linear.weight` (also `nn.MultiheadAttention.out_proj`, an `NonDynamicallyQuantizableLinear`),
- `nn.Conv1d/2d/3d.weight`: one row per output channel, `in_channels/groups * prod(kernel)`
  columns (each channel's own kernel, so groups are respected),
- `nn.LSTM/GRU/RNN` `weight_ih_l*` and `weight_hh_l*`, every layer and direction (gates
  stacked as rows),
- `nn.MultiheadAttention.in_proj_weight` `[3 * embed, embed]` (as is),
- Hugging Face `transformers.pytorch_utils.Conv1D.weight`, stored `[in, out]`: its matrix view
  is `weight.t()`, so banks run along the input dimension.

Biases, norms and embeddings are never prunable here.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bs_lightning.validation import glob_list

__all__ = [
    "PrunableParam",
    "default_prunable_names",
    "find_prunable",
    "is_transposed",
    "matrix_to_param",
    "matrix_view",
]

_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")


def _hf_conv1d_type():
    # transformers is heavy: only look at it when the user has already imported it (any
    # model holding a GPT-2 Conv1D has).
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def is_transposed(module: nn.Module) -> bool:
    """True when `module` stores its weight as `[in, out]` (Hugging Face GPT-2 `Conv1D`)."""
    conv1d = _hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def matrix_view(
    module: nn.Module, param_name: str, tensor: torch.Tensor | None = None
) -> torch.Tensor:
    """The 2-D matrix view `[out, in]` of a module's parameter (or of a same-shaped tensor).

    The result is a view when the parameter is contiguous, so in-place writes to it change
    the parameter. For GPT-2 `Conv1D` it is `weight.t()`; for every other module
    `weight.reshape(weight.shape[0], -1)`.

    Args:
        module: the module owning the parameter.
        param_name: the parameter's name inside `module` (e.g. `"weight"`, `"weight_hh_l0"`).
        tensor: optional tensor of the parameter's shape (a gradient, a mask) to view the
            same way; defaults to the parameter itself.

    Returns:
        `[out, in]` tensor sharing storage with the input when possible.

    Raises:
        ValueError: when `module` has no parameter `param_name`, or `tensor` has another
            shape, or the parameter has fewer than 2 dimensions.
    """
    param = module._parameters.get(param_name)
    if param is None:
        valid = sorted(n for n, p in module._parameters.items() if p is not None)
        raise ValueError(
            f"{type(module).__name__} has no parameter {param_name!r}; valid names: {valid}"
        )
    t = param if tensor is None else tensor
    if t.shape != param.shape:
        raise ValueError(
            f"tensor for {type(module).__name__}.{param_name} has shape {tuple(t.shape)}, "
            f"expected the parameter's shape {tuple(param.shape)}"
        )
    if param.dim() < 2:
        raise ValueError(
            f"{type(module).__name__}.{param_name} has shape {tuple(param.shape)}; only "
            f"parameters with >= 2 dimensions have a matrix view"
        )
    return as_matrix(module, t)


def as_matrix(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """`matrix_view`'s transform without its checks, for any tensor laid out like one of
    `module`'s weights (e.g. the rows of it one rank holds under sharded training)."""
    if is_transposed(module):
        return t.t()
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # not -1: a 0-row weight has no -1


def matrix_to_param(
    module: nn.Module, param_name: str, matrix: torch.Tensor, shape: torch.Size | None = None
) -> torch.Tensor:
    """Inverse of `matrix_view`: turns an `[out, in]` tensor back into the parameter's shape.

    Args:
        module: the module owning the parameter.
        param_name: the parameter's name inside `module`.
        matrix: `[out, in]` tensor (e.g. a mask computed on the matrix view).
        shape: the shape to restore instead of the parameter's (a local part of it).

    Returns:
        Tensor of the parameter's shape (or `shape`).
    """
    shape = module._parameters[param_name].shape if shape is None else shape
    if is_transposed(module):
        return matrix.t().reshape(shape)
    return matrix.reshape(shape)


def default_prunable_names(module: nn.Module) -> list[str]:
    """Names of `module`'s own parameters that are prunable out of the box (see module doc)."""
    own = [n for n, p in module._parameters.items() if p is not None]
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_transposed(module):
        names = ["weight"]
    elif isinstance(module, nn.RNNBase):
        names = [n for n in own if _RNN_WEIGHT.fullmatch(n)]
    elif isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
    else:
        return []
    # lazy (uninitialized) parameters have no shape yet, empty ones nothing to prune
    return [
        n
        for n in names
        if n in own
        and not isinstance(module._parameters[n], nn.parameter.UninitializedParameter)
        and module._parameters[n].numel()
    ]


@dataclass(frozen=True)
class PrunableParam:
    """One parameter selected for pruning.

    Attributes:
        name: full name as in `model.named_parameters()`, e.g. `"lstm.weight_hh_l0"`.
        module_name: name of the owning module, e.g. `"lstm"` (`""` for the root).
        param_name: the parameter's name inside its module, e.g. `"weight_hh_l0"`.
        module: the owning module.
    """

    name: str
    module_name: str
    param_name: str
    module: nn.Module = field(compare=False, repr=False)

    @property
    def param(self) -> nn.Parameter:
        """The parameter itself."""
        return self.module._parameters[self.param_name]

    def matrix(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """`matrix_view` of the parameter (or of a same-shaped tensor), `[out, in]`."""
        return matrix_view(self.module, self.param_name, tensor)

    def matches(self, glob: str) -> bool:
        """The one glob rule: `glob` matches the module name or the full parameter name."""
        return fnmatch.fnmatchcase(self.module_name, glob) or fnmatch.fnmatchcase(self.name, glob)


def _names_hint(entries: list[PrunableParam], limit: int = 12) -> str:
    names = [e.name for e in entries]
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def find_prunable(
    model: nn.Module,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    default: Callable[[str, nn.Module, str], bool] | None = None,
) -> list[PrunableParam]:
    """The one parameter selector (the callback, one-shot pruning and `bs_lightning.hf`).

    Rules, in `model.named_modules()` order:
    - Globs are `fnmatch` patterns (`*` also crosses dots) matched against the module name
      (`"encoder.layers.0.linear1"`) or the full parameter name (`"lstm.weight_hh_l0"`).
    - Prunable by type: the parameters `default_prunable_names` lists (see module doc).
    - Without `include`: the prunable-by-type parameters that `default` accepts (all of
      them when `default` is None; `bs_lightning.hf` passes "Linear-like inside the
      numbered blocks").
    - With `include`: the prunable-by-type parameters an include glob matches, plus any other
      parameter with >= 2 dimensions (an embedding) whose full name an include glob matches
      and ends with its parameter name (`"embed.weight"`, `"*.weight"`).
    - `exclude` globs remove parameters from the selection.
    - Parameters with no elements (`nn.Linear(16, 0)`) are never selected: nothing to prune.
    - Shared (tied) parameters count once, as their first name; one that any owner does not
      prune by type (a head tied to the token embedding) is pruned only when asked.
    - Every glob must select (include) or remove (exclude) something, and the selection must
      not be empty.

    Args:
        model: the model to search.
        include: glob or list of globs selecting parameters; None = the default rule.
        exclude: glob or list of globs removing parameters from the selection.
        default: `(module_name, module, param_name) -> bool`, the default rule; None = every
            prunable-by-type parameter.

    Returns:
        The selected parameters.

    Raises:
        ValueError: when a glob argument is malformed, an include or exclude glob selects
            nothing (the message lists valid names), or the selection is empty.
    """
    include = glob_list(include, "include")
    exclude = glob_list(exclude, "exclude")
    by_type: list[PrunableParam] = []
    other: list[PrunableParam] = []
    seen: set[int] = set()
    order: dict[str, int] = {}  # full name -> position in named_modules order
    # a weight tied to a module that does not prune it by type (a Linear head sharing an
    # Embedding's weight) is pruned only when asked, whichever owner comes first
    tied_other = {
        id(p)
        for m in model.modules()
        for n, p in m._parameters.items()
        if p is not None and n not in default_prunable_names(m)
    }
    for module_name, module in model.named_modules():
        prunable = set(default_prunable_names(module))
        for param_name, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            entry = PrunableParam(
                f"{module_name}.{param_name}" if module_name else param_name,
                module_name,
                param_name,
                module,
            )
            order[entry.name] = len(order)
            if param_name in prunable and id(param) not in tied_other:
                by_type.append(entry)
            elif (
                param.dim() >= 2
                and not isinstance(param, nn.parameter.UninitializedParameter)
                and param.numel()
            ):
                other.append(entry)
    if not by_type and not other:
        raise ValueError(f"{type(model).__name__} has no parameter with >= 2 dimensions to prune")

    if include is None:
        selected = [
            e for e in by_type if default is None or default(e.module_name, e.module, e.param_name)
        ]
    else:
        selected = []
        for glob in include:
            hits = [e for e in by_type if e.matches(glob)]
            hits += [
                e
                for e in other
                if fnmatch.fnmatchcase(e.name, glob) and glob.rsplit(".", 1)[-1] == e.param_name
            ]
            if not hits:
                raise ValueError(
                    f"include glob {glob!r} matches no module or parameter of "
                    f"{type(model).__name__} that can be pruned; prunable parameters: "
                    f"{_names_hint(by_type)}"
                )
            selected += [e for e in hits if e not in selected]
        selected.sort(key=lambda e: order[e.name])
    for glob in exclude or []:
        if not any(e.matches(glob) for e in selected):
            raise ValueError(
                f"exclude glob {glob!r} matches no module or selected parameter; selected "
                f"parameters: {_names_hint(selected)}"
            )
        selected = [e for e in selected if not e.matches(glob)]
    if not selected:
        raise ValueError(
            f"no layer of {type(model).__name__} selected: include={include!r} and "
            f"exclude={exclude!r} leave no parameter to prune; prunable parameters: "
            f"{_names_hint(by_type)}"
        )
    return selected
