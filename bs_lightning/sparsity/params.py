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
import re
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

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
    if is_transposed(module):
        return t.t()
    return t.reshape(t.shape[0], -1)


def matrix_to_param(module: nn.Module, param_name: str, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of `matrix_view`: turns an `[out, in]` tensor back into the parameter's shape.

    Args:
        module: the module owning the parameter.
        param_name: the parameter's name inside `module`.
        matrix: `[out, in]` tensor (e.g. a mask computed on the matrix view).

    Returns:
        Tensor of the parameter's shape.
    """
    param = module._parameters[param_name]
    if is_transposed(module):
        return matrix.t().reshape(param.shape)
    return matrix.reshape(param.shape)


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
    # lazy (uninitialized) parameters have no shape yet and cannot be pruned
    return [
        n
        for n in names
        if n in own and not isinstance(module._parameters[n], nn.parameter.UninitializedParameter)
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


def _matches(pattern: str, entry: PrunableParam) -> bool:
    return fnmatch.fnmatchcase(entry.module_name, pattern) or fnmatch.fnmatchcase(
        entry.name, pattern
    )


def _names_hint(entries: list[PrunableParam], limit: int = 12) -> str:
    names = [e.name for e in entries]
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def find_prunable(
    model: nn.Module,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
) -> list[PrunableParam]:
    """Selects the parameters to prune, in `model.named_modules()` order.

    Patterns are `fnmatch` globs (`*` also crosses dots) matched against the module name
    (`"encoder.layers.0.linear1"`) or the full parameter name (`"lstm.weight_hh_l0"`).
    Without `include`, every out-of-the-box prunable parameter is selected. A parameter of
    another kind (an embedding, any >= 2-D weight) is selected only when asked: an include
    pattern matches its full name and ends with its parameter name (e.g. `"embed.weight"`,
    `"*.weight"`). Shared (tied) parameters count once, as their first name (a GPT-2 head tied
    to the token embedding is an embedding: not pruned unless asked).

    Args:
        model: the model to search.
        include: glob or list of globs selecting parameters; None = all prunable ones.
        exclude: glob or list of globs removing parameters from the selection.

    Returns:
        The selected parameters.

    Raises:
        ValueError: when an include or exclude pattern matches no parameter (the message
            lists valid names), or the selection is empty.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    default: list[PrunableParam] = []
    other: list[PrunableParam] = []
    seen: set[int] = set()
    order: dict[str, int] = {}  # full name -> position in named_modules order
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
            if param_name in prunable:
                default.append(entry)
            elif param.dim() >= 2 and not isinstance(param, nn.parameter.UninitializedParameter):
                other.append(entry)
    if not default and not other:
        raise ValueError(f"{type(model).__name__} has no parameter with >= 2 dimensions to prune")

    selected = default
    if include is not None:
        selected = []
        for pattern in include:
            hits = [e for e in default if _matches(pattern, e)]
            hits += [
                e
                for e in other
                if fnmatch.fnmatchcase(e.name, pattern)
                and pattern.rsplit(".", 1)[-1] == e.param_name
            ]
            if not hits:
                raise ValueError(
                    f"include pattern {pattern!r} matches no parameter of "
                    f"{type(model).__name__}; prunable parameters: {_names_hint(default)}"
                )
            selected += [e for e in hits if e not in selected]
        selected.sort(key=lambda e: order[e.name])
    for pattern in exclude or []:
        if not any(_matches(pattern, e) for e in selected):
            raise ValueError(
                f"exclude pattern {pattern!r} matches no selected parameter; selected "
                f"parameters: {_names_hint(selected)}"
            )
        selected = [e for e in selected if not _matches(pattern, e)]
    if not selected:
        raise ValueError(
            f"include={include!r} and exclude={exclude!r} leave no parameter of "
            f"{type(model).__name__} to prune; prunable parameters: {_names_hint(default)}"
        )
    return selected
