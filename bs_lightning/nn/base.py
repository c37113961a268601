"""Shared machinery of the sparse inference modules: compact buffers and their layout checks.

A module holds one or more compact matrices (`docs/ARCHITECTURE.md` section 2). Matrix
`p` (`p` is `""` for a single-matrix module, else e.g. `"weight_ih_l0_"`) is stored as
buffers `{p}values [out, n_banks * k]`, `{p}indices [out, n_banks * k]` (uint8) and
`{p}layout` (int64 `[4]`: out_features, in_features, bank_size, k). The layout buffer makes
a checkpoint self-describing (it survives safetensors, unlike `get_extra_state`) and lets
`load_state_dict` refuse a checkpoint with other shapes or another bank size, naming the
layer, instead of copying same-shaped tensors of a different bank layout.

Products go through `_product`, which picks the kernel: on a CPU with the tile kernel
(AVX-512 or AVX2) it multiplies with a copy of the matrix in the tile layout
(`ops.pack_tiles`), and where the unpacked dense matrix is faster (low sparsity, many input
rows) with that, so a layer is never slower than its dense original: the choice is measured
on the first input of each size class of each matrix and cached (`measured_dispatch`), from
one input row on: on a CPU with slow cross-lane permutes (AVX2 on Zen 1) a small matrix with
large banks is faster dense even at batch 1. Both
copies are derived caches: built on first use, rebuilt when the buffers change (in-place
edits, `load_state_dict`), dropped on `.to()`, never saved.

Batch-1 inference calls a layer with its caches flushed by the previous layer's product, so
every Python object the call touches costs memory misses: on 11008x4096 the module call
took ~95 us more than the bare op (2-core Xeon, in-process A/B). A matrix that ran on the
tile kernel therefore gets a `_TilePlan`: the next call that matches it checks the buffers'
identity, in-place versions and pointers and calls the op (~15 us more than the bare op).
`BS_LIGHTNING_FORCE_REFERENCE` is read when a plan is made, not on every planned call.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bs_lightning import ops
from bs_lightning.nn.format import (
    check_bank_size,
    check_indices,
    pack_balanced,
    unpack_balanced,
)
from bs_lightning.sparsity.masks import bank_layout
from bs_lightning.sparsity.oneshot import prune_matrix
from bs_lightning.sparsity.patterns import BalancedPattern

__all__ = ["BalancedSparseModule", "prune_and_pack"]

LAYOUT_FIELDS = ("out_features", "in_features", "bank_size", "k")
MEASURE_REPEATS = 3  # timed calls of each kernel per measured dispatch decision


def _where(name: str | None) -> str:
    return f" of layer {name!r}" if name else ""


def prune_and_pack(
    matrix: torch.Tensor,
    bank_size: int,
    sparsity: float | None = None,
    k: int | None = None,
    name: str | None = None,
):
    """Packs a matrix view, pruning it one-shot first when `sparsity` is given.

    Args:
        matrix: `[out, in]` matrix view of a weight.
        bank_size: columns per bank `B`, `1 <= B <= min(in, 256)`.
        sparsity: target sparsity in [0, 1): prune one-shot first (`prune_matrix`). None: the
            matrix must already be balanced.
        k: keep-count per full bank when known (e.g. from a `SparsityPlan`); None infers
            it from the zeros. Not allowed together with `sparsity`.
        name: layer name used in error messages.

    Returns:
        `(values, indices, k)` as `pack_balanced`.

    Raises:
        ValueError: when both `sparsity` and `k` are given, or as `prune_matrix` and
            `pack_balanced` (bad bank size or sparsity, matrix not balanced).
    """
    if sparsity is not None:
        if k is not None:
            raise ValueError(
                f"give sparsity or k{_where(name)}, not both (got sparsity={sparsity}, k={k})"
            )
        # the balanced pattern accepts any bank size; the uint8 format does not
        check_bank_size(bank_size, matrix.shape[-1], name)
        matrix, k = prune_matrix(matrix, BalancedPattern(bank_size), sparsity, name)
    return pack_balanced(matrix, bank_size, k, name)


# buffer name suffixes of the derived copies (`_tile_buffers`, `_dense_buffer`)
_DERIVED = ("tile_values", "tile_indices", "dense_weight")


def _tiles_built(bank_size: int) -> bool:
    """True when the compiled library (built now if needed) runs the tile kernel here."""
    ops.load()
    return ops.cpu_tiles_supported(bank_size)


def _refresh_after_load(module: BalancedSparseModule, incompatible_keys) -> None:
    module.refresh_tiles()


def _stamp(*tensors: torch.Tensor) -> tuple:
    """Identity of tensors' current contents: storage, offset, dtype and in-place version."""
    # no device: moving the buffers (Module._apply) clears the caches anyway
    return tuple((t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version) for t in tensors)


def _best_times(calls: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Best time of each zero-argument call over `repeats` rounds, the calls in turns after
    one untimed warm-up round: wall clock on the CPU, CUDA events (synchronized) on a GPU."""
    best = dict.fromkeys(calls, math.inf)
    for rep in range(repeats + 1):
        for name, call in calls.items():
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                call()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) * 1e-3
            else:
                start_s = time.perf_counter()
                call()
                seconds = time.perf_counter() - start_s
            if rep:
                best[name] = min(best[name], seconds)
    return best


def _records_grad(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when a product of `x` with `values` (and `bias`) needs an autograd graph."""
    return x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)


class _TilePlan(NamedTuple):
    """What a planned call of the tile kernel needs, and what makes it stale."""

    values: torch.Tensor  # the buffers the tiles were made from (identity is checked)
    indices: torch.Tensor
    versions: tuple[int, int]  # their in-place versions ...
    pointers: tuple[int, int]  # ... and data pointers (`.data =` keeps the version)
    tile_values: torch.Tensor
    tile_indices: torch.Tensor
    dense_weight: torch.Tensor | None  # the dense copy when it runs this size class
    numel: tuple[int, int]  # [lo, hi): the size class of inputs the plan was made for
    bank_size: int
    in_features: int
    out_features: int


class BalancedSparseModule(nn.Module):
    """Base class: registers compact matrices, checks their layout on `load_state_dict` and
    runs their products (`_product`).

    Attributes:
        dense_fallback: when True (default), a product where `F.linear` on a dense copy of
            the matrix is faster than the kernel (the CPU tile kernel, the CUDA gather
            kernel) runs that (as fast as the dense layer, at the cost of its memory).
            False keeps the memory of the compact format and always runs the kernels (which
            unpack per call from their crossover on: slower than dense there).
        measured_dispatch: when True (default), which of the two is faster is measured on
            the first input of each size class (power-of-two rows) of each matrix, on that
            input, and cached (on CUDA with events, never inside a CUDA-graph capture);
            False uses the rules `ops.dense_crossover(k,
            bank_size)` and `ops.cuda_dense_crossover(k, bank_size, elem_bytes)`.
    """

    dense_fallback: bool = True
    measured_dispatch: bool = True

    def __init__(self) -> None:
        super().__init__()
        # prefix -> (out_features, in_features, bank_size, k) as Python ints: forward reads
        # these, never the layout buffers (that would be a host sync per call)
        self._layouts: dict[str, tuple[int, int, int, int]] = {}
        # (prefix, rows, kind) -> (stamp of the compact tensors, derived tensors)
        self._kernel_cache: dict[tuple, tuple] = {}
        # prefix -> the last tile-kernel call of that whole matrix (see the module docstring)
        self._tile_plans: dict[str, _TilePlan] = {}
        # prefix -> input rows from which the dense path runs (set with the tile buffers;
        # read by compiled code, which cannot call ops.dense_crossover)
        self._crossovers: dict[str, int] = {}
        # ((prefix, rows), size class of the input) -> whether the dense copy runs it
        self._dispatch: dict[tuple, bool] = {}
        # the compiled path reads the tile buffers as they are: keep them current on load
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _derived(self, key: tuple, values: torch.Tensor, indices: torch.Tensor, make):
        """`make()` cached under `key` while `values`/`indices` keep their contents."""
        stamp = _stamp(values, indices)
        hit = self._kernel_cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = (stamp, make())
            self._kernel_cache[key] = hit
        return hit[1]

    def _product(
        self,
        prefix: str,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """`F.linear(x, W, bias)` for compact matrix `prefix` (rows `rows` of it if given).

        Args:
            prefix: the matrix's buffer prefix.
            x: `[..., in_features]`.
            bias: `[rows]` or None.
            rows: a slice of the matrix's rows (grouped convolutions), or None for all.

        Returns:
            `[..., rows]` in `x.dtype`.
        """
        if torch.is_grad_enabled() and _records_grad(x, self._parameters[prefix + "values"], bias):
            return self._trainable_product(prefix, x, bias, rows)
        if torch.compiler.is_compiling():
            return self._compiled_product(prefix, x, bias, rows)
        if rows is None:
            plan = self._tile_plans.get(prefix)
            if plan is not None and self._plan_fits(plan, prefix, x):
                if plan.dense_weight is not None:
                    return F.linear(x, plan.dense_weight, bias)
                return torch.ops.bs_lightning.balanced_linear_tiled(
                    x,
                    plan.tile_values,
                    plan.tile_indices,
                    plan.bank_size,
                    plan.in_features,
                    plan.out_features,
                    bias,
                )
        _, in_features, bank_size, k = self._layouts[prefix]
        # the buffers dict directly: Module.__getattr__ costs cache misses on every call
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        if rows is not None:
            values, indices = values[rows], indices[rows]
        key = (prefix, None if rows is None else (rows.start, rows.stop))
        if not self._tiles_apply(x, values, bank_size):
            if (
                x.is_cuda
                and self.dense_fallback
                and self._cuda_dense_wins(key, x, bias, values, indices)
            ):
                return F.linear(x, self._dense_copy(key, values, indices), bias)
            return ops.balanced_linear(x, values, indices, bank_size, in_features, bias)
        tiles = self._tiles(key, values, indices)
        tile_values, tile_indices = tiles
        weight = None
        if self.dense_fallback and self._dense_wins(key, x, bias, values, indices, tiles):
            weight = self._dense_copy(key, values, indices)
        if rows is None and not (values.is_inference() or indices.is_inference()):
            bucket = x.numel().bit_length()  # the plan serves inputs of this size class
            self._tile_plans[prefix] = _TilePlan(
                values,
                indices,
                (values._version, indices._version),
                (values.data_ptr(), indices.data_ptr()),
                tile_values,
                tile_indices,
                weight,
                (1 << bucket - 1 if bucket else 0, 1 << bucket),
                bank_size,
                in_features,
                values.size(0),
            )
        if weight is not None:
            return F.linear(x, weight, bias)
        # the op itself: _tiles_apply has checked what the ops.py wrapper would
        return torch.ops.bs_lightning.balanced_linear_tiled(
            x, tile_values, tile_indices, bank_size, in_features, values.size(0), bias
        )

    def _dense_copy(self, key: tuple, values: torch.Tensor, indices: torch.Tensor):
        """The cached dense `[rows, in]` matrix of `values`/`indices` (key as `_tiles`)."""
        prefix, rows = key
        if rows is None:
            return self._dense_buffer(prefix)
        _, in_features, bank_size, _ = self._layouts[prefix]
        return self._derived(
            (*key, "dense"),
            values,
            indices,
            lambda: unpack_balanced(values, indices, bank_size, in_features),
        )

    def _dense_wins(self, key: tuple, x, bias, values, indices, tiles) -> bool:
        """Whether `F.linear` on the dense copy runs inputs like `x` faster than the tile
        kernel: measured once per matrix and size class of `x` (`measured_dispatch`), else
        the rule `ops.dense_crossover`.
        The decision is cached per `(matrix, size class)`; it depends on shapes only."""
        prefix, _ = key
        _, in_features, bank_size, k = self._layouts[prefix]
        batch = x.numel() // in_features
        choice_key = (key, batch.bit_length())
        choice = self._dispatch.get(choice_key)
        if choice is None:
            if self.measured_dispatch:
                sparse = partial(
                    torch.ops.bs_lightning.balanced_linear_tiled,
                    x,
                    *tiles,
                    bank_size,
                    in_features,
                    values.size(0),
                    bias,
                )
                choice = self._measure_dense_wins(key, x, bias, values, indices, sparse)
            else:
                choice = batch >= ops.dense_crossover(k, bank_size)
            self._dispatch[choice_key] = choice
        return choice

    def _cuda_dense_wins(self, key: tuple, x, bias, values, indices) -> bool:
        """Whether a CUDA product of `x` runs on the cached dense copy: measured once per
        matrix and size class of `x` (`measured_dispatch`, outside CUDA-graph capture,
        which cannot synchronize to time), else the rule
        `ops.cuda_dense_crossover`: the rows from which the CUDA op would unpack the matrix
        on every call. A capture without a cached choice uses the rule without caching it."""
        _, in_features, bank_size, k = self._layouts[key[0]]
        batch = x.numel() // in_features
        measured = self.measured_dispatch
        choice_key = ((*key, "cuda"), batch.bit_length() if measured else batch)
        choice = self._dispatch.get(choice_key)
        if choice is not None:
            return choice
        if x.dtype != values.dtype or not ops.load():
            choice = False  # the op raises on mixed dtypes; no library: nothing to pick
        elif measured and not torch.cuda.is_current_stream_capturing():
            sparse = partial(ops.balanced_linear, x, values, indices, bank_size, in_features, bias)
            choice = self._measure_dense_wins(key, x, bias, values, indices, sparse)
        else:
            choice = batch >= ops.cuda_dense_crossover(k, bank_size, values.element_size())
            if measured:
                return choice  # captured now; an eager call of this size class measures
        self._dispatch[choice_key] = choice
        return choice

    def _measure_dense_wins(self, key: tuple, x, bias, values, indices, sparse) -> bool:
        """Times `sparse()` (the kernel) and `F.linear` on the dense copy on `x` itself, in
        turns (best of `MEASURE_REPEATS` each, after one warm-up round; CUDA events on a GPU);
        drops the dense copy again when the kernel wins."""
        prefix, rows = key
        weight = self._dense_copy(key, values, indices)
        calls = {"sparse": sparse, "dense": lambda: F.linear(x, weight, bias)}
        best = _best_times(calls, x.device, MEASURE_REPEATS)
        dense_wins = best["dense"] < best["sparse"]
        if not dense_wins and rows is None:
            self._drop_unused_dense(prefix)
        return dense_wins

    def _drop_unused_dense(self, prefix: str) -> None:
        """Frees the dense copy of matrix `prefix` unless a cached choice runs it."""
        if not self._dispatch_uses_dense(prefix):
            self._buffers[prefix + "dense_weight"] = self._buffers[
                prefix + "dense_weight"
            ].new_empty(0)
            self._kernel_cache.pop((prefix, None, "dense"), None)

    def _dispatch_uses_dense(self, prefix: str) -> bool:
        """Whether some size class of whole-matrix inputs of `prefix` chose the dense copy
        (keys `(prefix, None, *tag)`: the CPU, CUDA (`"cuda"`) and module-level choices)."""
        return any(
            dense and key[:2] == (prefix, None) for (key, _), dense in self._dispatch.items()
        )

    def _trainable_product(
        self, prefix: str, x: torch.Tensor, bias: torch.Tensor | None, rows: slice | None
    ) -> torch.Tensor:
        """`_product` when autograd records it: the tile kernel on a tile copy packed in the
        graph (`ops.pack_tiles` is differentiable, so gradients reach `values`), else
        `ops.balanced_linear`; both ops have autograd formulas (`bs_lightning.ops_backward`).
        """
        _, in_features, bank_size, _ = self._layouts[prefix]
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        if rows is not None:
            values, indices = values[rows], indices[rows]
        tiles = self._grad_tiles(prefix, x, values, indices, whole=rows is None)
        if tiles is None:
            return ops.balanced_linear(x, values, indices, bank_size, in_features, bias)
        return torch.ops.bs_lightning.balanced_linear_tiled(
            x, *tiles, bank_size, in_features, values.size(0), bias
        )

    def _grad_tiles(self, prefix, x, values, indices, whole: bool):
        """Tiles packed from `values`/`indices` in the autograd graph when the tile kernel
        runs for inputs like `x` (as `_tiles_apply`, or the tile buffers inside compiled
        code), else None."""
        if torch.compiler.is_compiling():
            runs = whole and self._compiled_tiles(prefix, x) is not None
        else:
            runs = self._tiles_apply(x, values, self._layouts[prefix][2])
        return ops.pack_tiles(values, indices) if runs else None

    def _compiled_product(
        self, prefix: str, x: torch.Tensor, bias: torch.Tensor | None, rows: slice | None
    ) -> torch.Tensor:
        """`_product` inside `torch.compile`, choosing as the eager one does: for a whole
        matrix on a CPU with the tile kernel, `F.linear` on the dense copy where eager calls
        measured it faster for inputs of this size class (else from the crossover on; the
        cached copy, else unpacked in the graph), the tile kernel otherwise; else
        `ops.balanced_linear`.

        Compiled code cannot check the buffers' versions: it reads the copies made when the
        weights were last filled, loaded or used eagerly (`refresh_tiles`).
        """
        _, in_features, bank_size, k = self._layouts[prefix]
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        tiles = None if rows is not None else self._compiled_tiles(prefix, x)
        if tiles is not None and self.dense_fallback:
            batch = x.numel() // in_features
            measured = None
            if isinstance(batch, int):  # static shapes: the size class is known here
                measured = self._dispatch.get(((prefix, None), batch.bit_length()))
            if batch >= self._crossovers[prefix] if measured is None else measured:
                weight = self._buffers[prefix + "dense_weight"]
                if not weight.numel():  # no eager call at this size yet: unpack in the graph
                    weight = unpack_balanced(values, indices, bank_size, in_features)
                return F.linear(x, weight, bias)
        if tiles is not None:
            return torch.ops.bs_lightning.balanced_linear_tiled(
                x, *tiles, bank_size, in_features, self._layouts[prefix][0], bias
            )
        if rows is not None:
            values, indices = values[rows], indices[rows]
        return ops.balanced_linear(x, values, indices, bank_size, in_features, bias)

    def _compiled_tiles(self, prefix: str, x: torch.Tensor):
        """Inside `torch.compile`: the tile buffers of matrix `prefix` when the tile kernel
        runs for inputs like `x` (they are empty where it does not run), else None."""
        tile_values = self._buffers[prefix + "tile_values"]
        if tile_values.numel() and x.is_cpu and x.dtype == tile_values.dtype:
            return tile_values, self._buffers[prefix + "tile_indices"]
        return None

    def refresh_tiles(self) -> None:
        """Rebuilds the CPU tile copies of every compact matrix from `values`/`indices`.

        Eager calls do this by themselves when the buffers changed; call it after editing
        `values` or `indices` in place and before running a `torch.compile`d model.
        """
        for prefix in self._layouts:
            self._tile_buffers(prefix)
            if self._buffers[prefix + "dense_weight"].numel():
                self._dense_buffer(prefix)

    def _plan_fits(self, plan: _TilePlan, prefix: str, x: torch.Tensor) -> bool:
        """True when `plan` is current for matrix `prefix` and input `x`."""
        values, indices = plan.values, plan.indices
        return (
            values is self._parameters[prefix + "values"]
            and indices is self._buffers[prefix + "indices"]
            and (values._version, indices._version) == plan.versions
            and (values.data_ptr(), indices.data_ptr()) == plan.pointers
            and x.is_cpu
            and x.dtype == values.dtype
            and plan.numel[0] <= x.numel() < plan.numel[1]
        )

    @staticmethod
    def _tiles_apply(x: torch.Tensor, values: torch.Tensor, bank_size: int) -> bool:
        """True when the CPU tile kernel runs this product (eager, CPU, AVX2 or AVX-512 build,
        bank <= 64, matching dtypes); otherwise `ops.balanced_linear` runs it."""
        # cheapest checks first: at batch 1 this Python runs with caches flushed by the last
        # product, and every object it touches costs misses (x.is_cpu, not x.device)
        if not x.is_cpu or x.dtype != values.dtype or torch.compiler.is_compiling():
            return False
        ops.load()
        return ops.cpu_tiles_supported(bank_size)

    def _cpu_tiles(self, prefix: str, x: torch.Tensor):
        """`(tile_values, tile_indices)` of matrix `prefix` when the tile kernel applies to
        inputs like `x` (packed in the autograd graph when it records), else None."""
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        if torch.is_grad_enabled() and _records_grad(x, values, None):
            return self._grad_tiles(prefix, x, values, indices, whole=True)
        if torch.compiler.is_compiling():
            return self._compiled_tiles(prefix, x)
        if not self._tiles_apply(x, values, self._layouts[prefix][2]):
            return None
        return self._tiles((prefix, None), values, indices)

    def _tiles(self, key: tuple, values: torch.Tensor, indices: torch.Tensor):
        """The cached CPU tile layout (`ops.pack_tiles`) of `values`/`indices` under `key`:
        for a whole matrix the tile buffers (`_tile_buffers`), for a row slice a cache."""
        prefix, rows = key
        if rows is None:
            return self._tile_buffers(prefix)
        return self._derived(
            (*key, "tiles"), values, indices, lambda: ops.pack_tiles(values, indices)
        )

    def _tile_buffers(self, prefix: str):
        """The non-persistent buffers `{prefix}tile_values` / `{prefix}tile_indices`, rebuilt
        when `values`/`indices` changed; empty where the tile kernel does not run."""
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        _, _, bank_size, k = self._layouts[prefix]
        # the compiled path checks these two conditions through the buffers' size
        if values.is_cpu and not values.is_meta and _tiles_built(bank_size):
            tile_values, tile_indices = self._derived(
                (prefix, None, "tiles"), values, indices, lambda: ops.pack_tiles(values, indices)
            )
            self._crossovers[prefix] = ops.dense_crossover(k, bank_size)
        else:  # nothing to cache: the tile kernel does not run here
            tile_values, tile_indices = values.new_empty(0), indices.new_empty(0)
        self._buffers[prefix + "tile_values"] = tile_values
        self._buffers[prefix + "tile_indices"] = tile_indices
        return tile_values, tile_indices

    def _dense_buffer(self, prefix: str) -> torch.Tensor:
        """The non-persistent buffer `{prefix}dense_weight` `[out, in]`, unpacked on first use
        (the first product past the crossover) and rebuilt when `values`/`indices` changed."""
        values = self._parameters[prefix + "values"]
        indices = self._buffers[prefix + "indices"]
        _, in_features, bank_size, _ = self._layouts[prefix]
        weight = self._derived(
            (prefix, None, "dense"),
            values,
            indices,
            lambda: unpack_balanced(values, indices, bank_size, in_features),
        )
        self._buffers[prefix + "dense_weight"] = weight
        return weight

    def __getstate__(self) -> dict:
        # derived copies are rebuilt from values/indices on use: never pickled or deep-copied
        state = super().__getstate__().copy()
        state["_buffers"] = {
            name: t.new_empty(0) if t is not None and name.endswith(_DERIVED) else t
            for name, t in self._buffers.items()
        }
        for cache in ("_kernel_cache", "_tile_plans", "_crossovers", "_dispatch"):
            state[cache] = {}
        return state

    def _apply(self, fn, recurse=True):
        # derived copies follow the buffers' device and dtype by being rebuilt
        self._kernel_cache.clear()
        self._tile_plans.clear()
        self._dispatch.clear()  # measured on another device or dtype
        return super()._apply(fn, recurse)

    def _register_compact(
        self,
        prefix: str,
        out_features: int,
        in_features: int,
        bank_size: int,
        k: int,
        device=None,
        dtype=None,
    ) -> None:
        """Registers one zero-filled compact `[out, in]` matrix: the `values` parameter, the
        `indices` and `layout` buffers and the derived (non-persistent) copies.

        Raises:
            ValueError: when a size is not a positive int, `bank_size` is not in
                [1, min(in_features, 256)] or `k` is not in [1, bank_size].
        """
        what = f"{type(self).__name__} {prefix.rstrip('_') or 'weight'}"
        for field, value in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} of {what} must be an integer >= 1, got {value!r}")
        check_bank_size(bank_size, in_features, what)
        n_banks, _ = bank_layout(in_features, bank_size, k, what)
        # zeros are a valid packed matrix (all-zero weights), so a fresh module is usable;
        # values are trainable (ops_backward), indices and layout fix the pattern
        self.register_parameter(
            prefix + "values",
            nn.Parameter(torch.zeros(out_features, n_banks * k, device=device, dtype=dtype)),
        )
        self.register_buffer(
            prefix + "indices",
            torch.zeros(out_features, n_banks * k, device=device, dtype=torch.uint8),
        )
        layout = (out_features, in_features, bank_size, k)
        self.register_buffer(
            prefix + "layout", torch.tensor(layout, dtype=torch.int64, device=device)
        )
        # derived CPU tile copy (`_tile_buffers`): in the module so compiled code can read it,
        # never saved (the compact tensors stay the format of record)
        empty = {"device": device, "dtype": dtype}
        self.register_buffer(prefix + "tile_values", torch.empty(0, **empty), persistent=False)
        self.register_buffer(
            prefix + "tile_indices",
            torch.empty(0, device=device, dtype=torch.uint8),
            persistent=False,
        )
        # derived dense copy past the crossover (`_dense_buffer`), empty until first needed
        self.register_buffer(prefix + "dense_weight", torch.empty(0, **empty), persistent=False)
        self._layouts[prefix] = layout

    def _fill_compact(self, prefix: str, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Copies packed tensors (from `pack_balanced`) into the buffers of matrix `prefix`
        and builds its tile copy."""
        with torch.no_grad():
            getattr(self, prefix + "values").copy_(values)
            getattr(self, prefix + "indices").copy_(indices)
        self._tile_buffers(prefix)

    def _take_dense(self, module: nn.Module, values: torch.Tensor, indices: torch.Tensor):
        """Fills the single weight matrix and the bias from a dense `module`; returns self in
        `module`'s train/eval mode (the tail of every single-matrix `from_dense`)."""
        self._fill_compact("", values, indices)
        self.values.requires_grad_(module.weight.requires_grad)  # a frozen layer stays frozen
        if module.bias is not None:
            with torch.no_grad():
                self.bias.copy_(module.bias)
            self.bias.requires_grad_(module.bias.requires_grad)
        return self.train(module.training)

    def _give_dense(self, dense: nn.Module, weight: torch.Tensor) -> nn.Module:
        """Copies `weight` (already in `dense.weight`'s shape) and the bias into `dense`;
        returns it in this module's train/eval mode (the tail of every `to_dense`)."""
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.train(self.training)

    def _dense_matrix(self, prefix: str) -> torch.Tensor:
        """The `[out, in]` dense matrix of compact matrix `prefix`."""
        _, in_features, bank_size, _ = self._layouts[prefix]
        return unpack_balanced(
            getattr(self, prefix + "values"),
            getattr(self, prefix + "indices"),
            bank_size,
            in_features,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        layer = prefix[:-1] or type(self).__name__
        mismatched = False
        for mat, layout in self._layouts.items():
            key = prefix + mat + "layout"
            incoming = state_dict.get(key)
            if incoming is None:
                continue  # reported as a missing key by the default loader
            found = tuple(int(v) for v in torch.as_tensor(incoming).flatten().tolist())
            if found != layout:
                mismatched = True
                fields = ", ".join(LAYOUT_FIELDS)
                errors.append(
                    f"layer {layer!r}: {mat}layout in the state_dict is ({fields}) = {found}, "
                    f"but this {type(self).__name__} has {layout}; build the module with the "
                    f"checkpoint's shapes, bank size and k"
                )
        for mat, (_, in_features, bank_size, k) in self._layouts.items():
            incoming = state_dict.get(prefix + mat + "indices")
            if mismatched or incoming is None or incoming.is_meta:
                continue
            try:
                where = f"{layer}.{mat.rstrip('_')}" if mat else layer
                check_indices(torch.as_tensor(incoming), bank_size, in_features, k, where)
            except ValueError as err:
                mismatched = True
                errors.append(str(err))
        if mismatched:
            # copy nothing into this layer: same-shaped tensors of another bank layout, or
            # indices past their banks, would silently compute something else
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
