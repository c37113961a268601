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

import sys

import torch
from torch import nn

__all__ = ["is_transposed", "matrix_to_param", "matrix_view"]


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
