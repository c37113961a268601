"""`BalancedSparseLinear`: `nn.Linear` with a balanced-sparse weight in the compact format."""

from __future__ import annotations

import torch
from torch import nn

from bs_lightning.nn.base import BalancedSparseModule, prune_and_pack

__all__ = ["BalancedSparseLinear"]


class BalancedSparseLinear(BalancedSparseModule):
    """`y = x W^T + b` with `W [out, in]` stored as values + uint8 in-bank indices.

    Parameters `values [out, n_banks * k]` and `bias [out]` (or None); buffers `indices
    [out, n_banks * k]` (uint8) and `layout` (int64 `[4]`: out_features, in_features,
    bank_size, k), which fix the pattern while the values fine-tune. The constructor takes shapes only (zero weights), so a model can be rebuilt and filled by
    `load_state_dict`; `from_dense` converts a trained layer.

    Args:
        in_features: columns of `W`.
        out_features: rows of `W`.
        bank_size: columns per bank, `1 <= bank_size <= min(in_features, 256)`.
        k: weights kept per full bank, `1 <= k <= bank_size`.
        bias: whether the layer has a bias.
        device: device of the buffers.
        dtype: floating dtype of `values` and `bias`.

    Raises:
        ValueError: when a size, `bank_size` or `k` is out of range.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bank_size: int,
        k: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._register_compact("", out_features, in_features, bank_size, k, device, dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.bank_size = bank_size
        self.k = k
        self.register_parameter(
            "bias",
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in_features]` (any leading shape, may be non-contiguous) -> `[..., out]`."""
        return self._product("", x, self.bias)

    def forward_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output features `start:stop` only: `x [..., in]` -> `[..., stop - start]` (e.g. the
        key and value parts of a packed attention input projection)."""
        bias = None if self.bias is None else self.bias[start:stop]
        return self._product("", x, bias, rows=slice(start, stop))

    @staticmethod
    def _dense_weight_matrix(module: nn.Module) -> torch.Tensor:
        """Matrix view `[out, in]` of the dense module's weight."""
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"BalancedSparseLinear.from_dense expects an nn.Linear, got {type(module).__name__}"
            )
        return module.weight.detach()

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        bank_size: int,
        sparsity: float | None = None,
        *,
        k: int | None = None,
        name: str | None = None,
    ) -> BalancedSparseLinear:
        """Converts a dense layer, pruning it one-shot first when `sparsity` is given.

        Args:
            module: the dense layer (`nn.Linear` here; GPT-2 `Conv1D` for the subclass).
            bank_size: columns per bank, `1 <= bank_size <= min(in_features, 256)`.
            sparsity: target sparsity in [0, 1) for a one-shot prune (`prune_matrix`); None
                requires a weight that is already balanced (zeros where pruned).
            k: keep-count per bank when known (e.g. from a `SparsityPlan`); None infers it
                from the zeros. Not together with `sparsity`.
            name: layer name used in error messages.

        Returns:
            The sparse module on the weight's device and dtype, in the source's train/eval
            mode.

        Raises:
            TypeError: when `module` has the wrong type.
            ValueError: bad `bank_size`/`sparsity`/`k`, or the weight is not balanced.
        """
        matrix = cls._dense_weight_matrix(module)
        values, indices, k = prune_and_pack(matrix, bank_size, sparsity, k, name)
        out_features, in_features = matrix.shape
        sparse = cls(
            in_features,
            out_features,
            bank_size,
            k,
            bias=module.bias is not None,
            device=matrix.device,
            dtype=matrix.dtype,
        )
        return sparse._take_dense(module, values, indices)

    def to_dense(self) -> nn.Linear:
        """The equivalent `nn.Linear` (pruned weights are exact zeros)."""
        weight = self._dense_matrix("")
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        return self._give_dense(dense, weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bank_size={self.bank_size}, k={self.k}, bias={self.bias is not None}"
        )
