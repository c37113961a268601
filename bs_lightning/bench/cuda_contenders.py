"""CUDA contenders of the kernel benchmark (`bs_lightning.bench.kernels`).

Two corrections to timing one layer repeatedly from a CUDA graph:

- L2 residency. An H200 has 60 MB of L2; a 4096x4096 balanced weight at 90% is 4.7 MB, so
  twenty calls on the same weight read it from L2 after the first, not from HBM, and the
  sparse side would look faster than it is inside a real model (where the next layer's
  weights evicted it). Each contender therefore cycles through enough identical copies of
  its weights that one pass over them moves more than twice the L2 size.
- Both sides of the CUDA op's batch crossover. `balanced_gather` and `balanced_unpack` force
  the gather kernel and the unpack + cuBLAS path (through the op's override variable, read
  when the call is captured), so every row shows where the crossover really is.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bs_lightning import ops

__all__ = ["DENSE_MIN_BATCH_ENV", "cuda_contenders", "forced_path", "l2_copies", "rotate"]

# Read by csrc/cuda/balanced_linear_cuda.cu on every call: smallest batch for the dense path.
DENSE_MIN_BATCH_ENV = "BS_LIGHTNING_CUDA_DENSE_MIN_BATCH"
GATHER_ALWAYS = str(2**31 - 1)


def l2_copies(device: torch.device, nbytes: int, max_copies: int) -> int:
    """Copies of `nbytes` of weights so that one cycle through them exceeds twice the L2."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(max_copies, math.ceil(2 * l2 / max(nbytes, 1))))


def rotate(calls: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next of `calls` each time (cycling)."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def forced_path(fn: Callable[[], object], min_batch: str) -> Callable[[], object]:
    """`fn` run with the op's crossover override set to `min_batch` (restored afterwards)."""

    def call():
        old = os.environ.get(DENSE_MIN_BATCH_ENV)
        os.environ[DENSE_MIN_BATCH_ENV] = min_batch
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[DENSE_MIN_BATCH_ENV]
            else:
                os.environ[DENSE_MIN_BATCH_ENV] = old

    return call


def cuda_contenders(
    x: torch.Tensor,
    w: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bank_size: int,
    csr: torch.Tensor | None,
    max_copies: int,
) -> dict[str, Callable[[], object]]:
    """`dense`, `balanced`, `csr` (when given) on rotated weight copies, plus the balanced op
    forced to its gather kernel (`balanced_gather`) and to unpack + cuBLAS
    (`balanced_unpack`).

    Args:
        x: `[batch, in]` input on the GPU.
        w: `[out, in]` masked dense weight; `values`/`indices` its compact form.
        bank_size: the compact format's bank size.
        csr: `w` as a CSR tensor, or None when CSR is not available.
        max_copies: most copies per contender (the calls captured per graph: more would
            never be reached).
    """
    inn = w.shape[1]
    n_dense = l2_copies(w.device, w.numel() * w.element_size(), max_copies)
    dense_ws = [w] + [w.clone() for _ in range(n_dense - 1)]
    n_bal = l2_copies(w.device, values.numel() * (values.element_size() + 1), max_copies)
    compact = [(values, indices)] + [(values.clone(), indices.clone()) for _ in range(n_bal - 1)]

    def balanced(v, i):
        return lambda: ops.balanced_linear(x, v, i, bank_size, inn)

    fns = {
        "dense": rotate([lambda w_=w_: F.linear(x, w_) for w_ in dense_ws]),
        "balanced": rotate([balanced(v, i) for v, i in compact]),
    }
    fns["balanced_gather"] = forced_path(fns["balanced"], GATHER_ALWAYS)
    fns["balanced_unpack"] = forced_path(fns["balanced"], "1")
    if csr is not None:
        csr_bytes = csr.values().numel() * (csr.values().element_size() + 8)
        n_csr = l2_copies(w.device, csr_bytes, max_copies)
        mats = [csr] + [dense_ws[i % n_dense].to_sparse_csr() for i in range(1, n_csr)]
        fns["csr"] = rotate([lambda m=m: (m @ x.t()).t() for m in mats])
    return fns
