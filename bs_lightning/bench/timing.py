"""Timing helpers for benchmarks (never used by tests).

- CPU: `interleaved_medians` runs the contenders in turn, rep after rep, so that load from
  other processes on a shared machine hits all of them alike; it reports medians. A
  contender may be a block of calls over rotating weight copies (`llc_bytes`), so that its
  weights come from memory, as in a model larger than the cache, and not from the cache.
- CUDA: `cuda_graph_us` captures N calls in one CUDA graph and times replays with CUDA
  events, so launch overhead is paid once per N calls (what a served model sees).
- `copy_bandwidth`: bytes/s of a plain tensor copy on the same device in the same run, the
  ceiling a memory-bound kernel is compared against ("fraction of the bytes floor").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

COPY_BUFFER_BYTES = 256 * 2**20  # larger than the weights of most benchmarked layers


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    reps: int = 15,
    warmup: int = 2,
    budget_s: float = 20.0,
    min_reps: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    calls: dict[str, int] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (CPU).

    Args:
        fns: name -> zero-argument callable.
        reps: timed rounds at most.
        warmup: untimed rounds first.
        budget_s: stop adding rounds once the rounds so far took this long (at least
            `min_reps` rounds always run), so slow contenders (CSR at low sparsity, large
            batches) do not stall a sweep.
        min_reps: rounds that always run.
        clock: `time.perf_counter` (wall clock, default) or `time.thread_time` (CPU time of
            the calling thread: with one intra-op thread it counts only the cycles the call
            used, not the time other processes held the cores).
        calls: name -> consecutive calls timed as one sample (default 1), e.g. one call per
            rotating weight copy; the sample is divided by it.

    Returns:
        name -> median seconds.
    """
    names = list(fns)
    calls = {name: (calls or {}).get(name, 1) for name in names}
    for _ in range(warmup):
        for name in names:
            for _ in range(calls[name]):
                fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    for rep in range(reps):
        # rotate the order so no contender always runs right after the same one
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn, n = fns[name], calls[name]
            t0 = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - t0) / n)
        if rep + 1 >= min_reps and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


def cuda_graph_us(
    fn: Callable[[], object], calls_per_graph: int = 20, reps: int = 20, warmup: int = 3
) -> float:
    """Median microseconds per call of `fn` replayed from a CUDA graph of N calls.

    The graph is captured on a side stream after warm-up calls (cuBLAS/cuSPARSE workspaces
    get allocated outside the capture); each timed replay is bracketed by CUDA events.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3 / calls_per_graph


def llc_bytes(default: int = 32 * 2**20) -> int:
    """Size of the CPU's last-level cache (Linux sysfs), or `default` when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=default)


def copy_bandwidth(
    device: torch.device,
    nbytes: int = COPY_BUFFER_BYTES,
    reps: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Bytes per second of `dst.copy_(src)` (read + write counted) on `device`.

    On the CPU `clock` must be the one the contenders are timed with.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        us = cuda_graph_us(lambda: dst.copy_(src), calls_per_graph=5, reps=reps)
        seconds = us * 1e-6
    else:
        copy = {"copy": lambda: dst.copy_(src)}
        seconds = interleaved_medians(copy, reps=reps, clock=clock)["copy"]
    return 2 * src.numel() * 4 / seconds


def device_slug(device: torch.device) -> str:
    """`cpu-2core` (intra-op threads) on the CPU, `nvidia-h200` for an NVIDIA H200."""
    if device.type != "cuda":
        return f"cpu-{torch.get_num_threads()}core"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())
