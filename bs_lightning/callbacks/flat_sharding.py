"""Parameters flattened and sharded by FSDP1 (`FSDPStrategy`, `FullyShardedDataParallel`
with `use_orig_params=True`): masks are computed on each unit's whole matrices, one unit at
a time, and every rank keeps the part of each mask that matches its shard.

FSDP1 concatenates the parameters of each wrapped unit into one flat parameter and gives
every rank an equal contiguous span of it. With `use_orig_params=True` the module's own
`Parameter` objects stay (the optimizer holds them) as 1-D views of the rank's span: a piece
of the row-major flattened weight that can start and end anywhere, mid-row and mid-bank, so
no pattern can be decided from it alone. At a pruning step the callback therefore gathers
one unit (`FSDP.summon_full_params(unit, recurse=False, writeback=True)`: the parameters
take their full shapes), masks its weights in place (written back to every shard), and
keeps only `full_mask.flatten()[start:stop]` for the per-step multiplies of the local
weights, gradients and optimizer state, which all have that 1-D shape (or the full one when
the unit is not sharded). Every pattern works, and memory is bounded by the largest unit.
Without `use_orig_params` the module parameters are replaced by the flat one, so nothing can
be masked per parameter: refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import Tensor, nn

try:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
except ImportError:  # torch without distributed: nothing is ever flattened
    FSDP = None

__all__ = [
    "FlatShard",
    "flat_shards",
    "full_params",
    "init_roots",
    "local_piece",
    "orig_params_error",
]


@dataclass(frozen=True)
class FlatShard:
    """Where one parameter lies in this rank's shard of an FSDP1 unit.

    Attributes:
        unit: the `FullyShardedDataParallel` module whose flat parameter holds it.
        start: first index of the flattened parameter that this rank holds.
        stop: one past the last (`start == stop`: the rank holds none of it).
        shape: the rank's parameter outside gathers: `(stop - start,)`, or the full shape
            when the unit is not sharded (`NO_SHARD`, one process).
    """

    unit: nn.Module
    start: int
    stop: int
    shape: tuple[int, ...]


def orig_params_error(strategy: str) -> RuntimeError:
    """The error for FSDP1 without `use_orig_params=True`."""
    return RuntimeError(
        f"BalancedPruningCallback does not support {strategy} with use_orig_params=False: "
        f"the module parameters are replaced by one flat parameter per wrapped unit, so "
        f"per-parameter masks cannot be applied. Pass use_orig_params=True (Lightning's "
        f"default), or shard with FSDP2: ModelParallelStrategy and fully_shard in "
        f"configure_model."
    )


def flat_shards(root: nn.Module, params: Iterable[Tensor], strategy: str) -> dict[int, FlatShard]:
    """`id(param) -> FlatShard` for each of `params` that an FSDP1 unit in `root` holds.

    Raises:
        RuntimeError: when a unit was wrapped without `use_orig_params=True`.
    """
    if FSDP is None:
        return {}
    wanted = {id(p) for p in params}
    shards = {}
    for unit in FSDP.fsdp_modules(root):
        # FSDP1 exposes where each original parameter lies in the rank's shard only through
        # its flat parameter's metadata (`_shard_param_infos`, stable since torch 2.0)
        handle = unit._handle
        if handle is None:  # a unit without parameters of its own
            continue
        if not unit._use_orig_params:
            raise orig_params_error(strategy)
        flat = handle.flat_param
        for param, info in zip(flat._params, flat._shard_param_infos, strict=True):
            if id(param) not in wanted:
                continue
            if info.in_shard:
                start, stop = info.intra_param_start_idx, info.intra_param_end_idx + 1
            else:
                start = stop = 0
            shards[id(param)] = FlatShard(unit, start, stop, tuple(param.shape))
    return shards


def init_roots(model: nn.Module) -> None:
    """Lets FSDP1 settle which units are roots before `full_params` gathers a nested one.

    FSDP1 decides that at a unit's first forward or gather: a nested unit gathered before
    its root would take itself for a root, and the first forward would then fail. Gathering
    each root's own parameters once (not its children's) settles it.
    """
    if FSDP is None:
        return
    for root in FSDP.fsdp_modules(model, root_only=True):
        with FSDP.summon_full_params(root, recurse=False, writeback=False):
            pass


def full_params(unit: nn.Module) -> AbstractContextManager:
    """Inside it, the unit's own parameters have their full shapes on every rank, and what
    is written into them goes back to each rank's shard."""
    return FSDP.summon_full_params(unit, recurse=False, writeback=True)


def local_piece(full: Tensor, shard: FlatShard) -> Tensor:
    """The part of `full` (a tensor of the parameter's full shape) this rank holds, in the
    shape of the rank's parameter."""
    return full.reshape(-1)[shard.start : shard.stop].reshape(shard.shape)
