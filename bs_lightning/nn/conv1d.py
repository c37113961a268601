"""`BalancedSparseConv1D`: Hugging Face GPT-2 `Conv1D` with a balanced-sparse weight.

`transformers.pytorch_utils.Conv1D(nf, nx)` stores its weight as `[nx, nf]` = `[in, out]`
and computes `x @ weight + bias`: its matrix view is `weight.t()`, so banks run along the
input dimension. The sparse module is a `BalancedSparseLinear` on that matrix view; only
the conversion from and to the dense `Conv1D` differs.
"""

from __future__ import annotations

import torch
from torch import nn

from bs_lightning.nn.linear import BalancedSparseLinear
from bs_lightning.sparsity.params import is_transposed

__all__ = ["BalancedSparseConv1D"]


class BalancedSparseConv1D(BalancedSparseLinear):
    """GPT-2 `Conv1D` inference module; same buffers and arguments as `BalancedSparseLinear`.

    `in_features` is the `Conv1D`'s `nx` (weight rows), `out_features` its `nf`. A `Conv1D`
    always has a bias, so `bias` defaults to True.
    """

    @staticmethod
    def _dense_weight_matrix(module: nn.Module) -> torch.Tensor:
        if not is_transposed(module):
            raise TypeError(
                "BalancedSparseConv1D.from_dense expects a transformers.pytorch_utils.Conv1D, "
                f"got {type(module).__name__}"
            )
        return module.weight.detach().t()

    def to_dense(self) -> nn.Module:
        """The equivalent `transformers.pytorch_utils.Conv1D` (weight `[in, out]`)."""
        # transformers is heavy: imported only here, where it is needed
        from transformers.pytorch_utils import Conv1D

        weight = self._dense_matrix("")  # [out, in]
        dense = Conv1D(self.out_features, self.in_features).to(weight.device, weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight.t())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()
        return dense.train(self.training)
