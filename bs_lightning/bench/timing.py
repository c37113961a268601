"""The timing loops of the benchmarks and of the latency figures in result files (never tests).

- CPU: `interleaved_medians` runs the contenders in turn, rep after rep, so that load from
  other processes on a shared machine hits all of them alike; it reports medians. A
  contender may be a block of calls over rotating weight copies (`llc_bytes`), so that its
  weights come from memory, as in a model larger than the cache, and not from the cache.
- Models: `measure_latency` times forward passes of several models on one input in turns
  (any device, synchronised on CUDA), in milliseconds, each pass right after the other
  model's ("cold") or after an untimed pass of its own ("warm"); `bs-train`'s evaluation,
  bs-convert-hf, `bs-bench model` and the checkpoint benchmark report it.
- CUDA: `cuda_event_us` brackets each call with CUDA events; `cuda_graph_us` captures N calls
  in one CUDA graph and times replays, so launch overhead is paid once per N calls (what a
  served model sees).
- `copy_bandwidth`: bytes/s of a plain tensor copy on the same device in the same run, the
  ceiling a memory-bound kernel is compared against ("fraction of the bytes floor").
- `CLOCKS` and `accumulate_time`: the clocks the loops read and a wrapper that adds a
  function's wall time to a total (for timing work inside a run, e.g. a callback's hooks).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

COPY_BUFFER_BYTES = 256 * 2**20  # larger than the weights of most benchmarked layers
# CPU clocks: wall time, or the calling thread's CPU time (needs one intra-op thread; immune
# to the time slices other processes take on a shared machine)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread-cpu": time.thread_time}
# what a timed forward pass of `measure_latency` follows: the other model's pass, or its own
CACHE_STATES = ("cold", "warm")


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    reps: int = 15,
    warmup: int = 2,
    budget_s: float = 20.0,
    min_reps: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    calls: dict[str, int] | None = None,
    rotate: bool = True,
    synchronize: Callable[[], None] | None = None,
    lead_in: int = 0,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds.

    Args:
        fns: name -> zero-argument callable.
        reps: timed rounds at most.
        warmup: untimed rounds first.
        budget_s: stop adding rounds once the rounds so far took this long (at least
            `min_reps` rounds always run), so slow contenders (CSR at low sparsity, large
            batches) do not stall a sweep; `math.inf` runs all `reps`.
        min_reps: rounds that always run.
        clock: `time.perf_counter` (wall clock, default) or `time.thread_time` (CPU time of
            the calling thread: with one intra-op thread it counts only the cycles the call
            used, not the time other processes held the cores).
        calls: name -> consecutive calls timed as one sample (default 1), e.g. one call per
            rotating weight copy; the sample is divided by it.
        rotate: start each round one contender later, so no contender always runs right
            after the same one; False keeps the order of `fns` in every round.
        synchronize: called before the clock is read, at both ends of each sample (e.g. a
            CUDA synchronisation, so that the sample holds the device's work).
        lead_in: untimed calls of a contender right before each of its samples, so that a
            sample finds the caches as the contender's own previous call left them (its
            steady state when run back to back) rather than as another contender left them.

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
        shift = rep % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            fn, n = fns[name], calls[name]
            for _ in range(lead_in):
                fn()
            if synchronize is not None:
                synchronize()
            t0 = clock()
            for _ in range(n):
                fn()
            if synchronize is not None:
                synchronize()
            times[name].append((clock() - t0) / n)
        if rep + 1 >= min_reps and time.perf_counter() - started > budget_s:
            break
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 30,
    cache: str = "cold",
) -> dict[str, float]:
    """Median wall time of one forward pass of each model on the same input.

    The models are timed in turns (dense, sparse, dense, ...) so that a change in the
    machine's load during the measurement hits all of them alike.

    Args:
        models: name -> model; each is moved to `device` and put in eval mode.
        x: the input batch, e.g. `[batch, t]` token ids or `[batch, c, h, w]` images.
        device: where to run.
        warmup: untimed passes per model first.
        repeats: timed passes per model.
        cache: "cold": each timed pass runs right after the other model's pass, which has
            evicted what it could of this model's weights; "warm": one untimed pass of the
            same model comes first in each turn, so the timed pass finds the caches as a
            model serving requests back to back does (a model whose weights fit in the
            last-level cache keeps them there).

    Returns:
        name -> median milliseconds per forward pass.

    Raises:
        ValueError: for a `cache` other than "cold" or "warm".
    """
    if cache not in CACHE_STATES:
        raise ValueError(f"cache must be one of {CACHE_STATES}, got {cache!r}")
    x = x.to(device)
    for model in models.values():
        model.to(device).eval()
    passes = {name: functools.partial(model, x) for name, model in models.items()}
    seconds = interleaved_medians(
        passes,
        reps=repeats,
        warmup=warmup,
        budget_s=math.inf,
        rotate=False,
        synchronize=functools.partial(sync, device),
        lead_in=int(cache == "warm"),
    )
    return {name: s * 1e3 for name, s in seconds.items()}


def cuda_event_us(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median microseconds of `fn()` measured with CUDA events (one pair per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3


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
    # one untimed replay first: it uploads the graph
    return cuda_event_us(graph.replay, reps, warmup=1) / calls_per_graph


def accumulate_time(
    fn: Callable,
    total: list[float],
    depth: list[int],
    clock: Callable[[], float] = time.perf_counter,
) -> Callable:
    """`fn`, adding its time on `clock` to `total[0]`; calls nested inside other wrapped
    calls sharing `depth` are counted once (by the outermost)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                total[0] += clock() - start

    return wrapper


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
