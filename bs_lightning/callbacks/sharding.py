"""Parameters sharded by FSDP2 (`fully_shard`, or tensor parallelism): each rank prunes the
part of every matrix it holds, with no communication but one all-reduce of counts to log.

A sharded parameter is a `DTensor`; its local part (`to_local()`) is the storage the rank
owns, so masks multiplied into it (and into its gradient and optimizer state, DTensors of
the same layout) change the parameter. FSDP2 shards dim 0: the rows of the matrix view
(`nn.Linear`, convolutions, LSTM, attention) or, for GPT-2 `Conv1D` (`weight [in, out]`),
its columns. Patterns whose masks are decided per group of columns of a row
(`Pattern.row_group`: balanced banks, N:M groups) prune such pieces exactly as the whole
matrix would be pruned, as long as every shard boundary between columns is a group boundary;
patterns that rank a whole matrix (unstructured, block, vector) are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bs_lightning.sparsity import PrunableParam
from bs_lightning.sparsity.params import as_matrix, is_transposed
from bs_lightning.sparsity.patterns import Pattern

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without distributed tensors: nothing is ever sharded
    DTensor = Shard = None

__all__ = [
    "check_shardable",
    "global_counts",
    "is_sharded",
    "local",
    "matrix_shape",
]


def is_sharded(t: Tensor | None) -> bool:
    """True for a `DTensor` (a parameter, gradient or optimizer state of a sharded model)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of `t` this rank holds (`t` itself when not sharded)."""
    return t.to_local() if is_sharded(t) else t


def check_shardable(entry: PrunableParam, pattern: Pattern, strategy: str) -> None:
    """Raises when the sharded parameter `entry` cannot be pruned shard by shard.

    Raises:
        ValueError: for a pattern that ranks a whole matrix, or a shard boundary that
            splits one of the pattern's column groups (a bank), naming the parameter.
    """
    param = entry.param
    if not is_sharded(param):
        return
    group = pattern.row_group
    if group is None:
        raise ValueError(
            f"BalancedPruningCallback: pattern {pattern.name!r} ranks weights across a whole "
            f"matrix ({entry.name!r}), which {strategy} shards; use pattern 'balanced' or "
            f"'nm' (masks per bank, computed on each rank's rows), or a strategy that does "
            f"not shard parameters ('ddp')"
        )
    column_dims = {0} if is_transposed(entry.module) else set(range(1, param.dim()))
    for mesh_dim, placement in enumerate(param.placements):
        if not isinstance(placement, Shard) or placement.dim not in column_dims:
            continue
        size, parts = param.shape[placement.dim], param.device_mesh.size(mesh_dim)
        if parts == 1:
            continue
        # torch.chunk's split: boundaries at multiples of ceil(size / parts)
        if param.dim() > 2 or -(-size // parts) % group:
            raise ValueError(
                f"BalancedPruningCallback: {strategy} splits the columns of {entry.name!r} "
                f"({size} along dim {placement.dim} in {parts} shards) across banks of "
                f"{group}; shard it by rows, or make each shard a whole number of banks"
            )


def global_counts(counts: Tensor) -> Tensor:
    """Sum of `counts` (any int64 tensor) over the ranks; `counts` itself without a group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        counts = counts.clone()
        dist.all_reduce(counts)
    return counts


def matrix_shape(entry: PrunableParam) -> Tensor:
    """A meta tensor of the whole matrix view's shape (global for a sharded parameter), for
    the shape-only keep-count rules."""
    return as_matrix(entry.module, torch.empty(entry.param.shape, device="meta"))
