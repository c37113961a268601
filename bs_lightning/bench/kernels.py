"""Kernel benchmark: dense `F.linear` vs the balanced op vs torch CSR (vs 2:4 on CUDA).

`python -m bs_lightning.bench kernels` (or `bs-bench kernels`) times, side by side in one
run, for each weight shape, sparsity and batch:

- `dense`: `F.linear(x, W)` with the masked dense weight;
- `balanced`: a `BalancedSparseLinear` holding the compact weight (bank 32 by default), so
  the row times what a converted model runs: on an AVX-512 or AVX2 CPU the tile kernel
  (`balanced_linear_tiled`), from the measured batch crossover on (low sparsity) its cached
  dense copy, on CUDA (or without either) `balanced_linear`; the `path` column says which;
- `csr`: `(W.to_sparse_csr() @ x.T).T`, torch's CSR product;
- `semi_2to4` (CUDA, 50%, fp16/bf16 only, where torch supports it): `F.linear(x, W_2:4)` with
  `torch.sparse.to_sparse_semi_structured` of a 2:4-pruned weight of the same shape.

CPU: the contenders run interleaved, round after round, and medians are reported (a shared
machine slows them alike). Each contender cycles through copies of its weight that together
exceed the last-level cache (`--rotate-mb`, default 1.25 times its size), one call per copy per
round, as the layers of a model larger than the cache: one weight reused call after call
would time the cache, which favours the largest format most. CUDA: each contender is replayed from a CUDA graph of N calls and
timed with CUDA events. Every row also gives the speedup over dense and the fraction of the
bytes floor: achieved bytes/s (weights + x + y) over a copy bandwidth measured in the same run.
Writes `<out-dir>/<device>-<date>.json` and `.md` (device e.g. `cpu-2core`, `nvidia-h200`).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bs_lightning import ops
from bs_lightning.bench.cuda_contenders import cuda_contenders
from bs_lightning.bench.device import device_label, device_slug, load_average
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import (
    CLOCKS,
    copy_bandwidth,
    cuda_graph_us,
    interleaved_medians,
    llc_bytes,
)
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.nn.format import pack_balanced
from bs_lightning.sparsity import BalancedPattern, NMPattern, keep_count, prune_matrix

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "6000x3000", "4096x25088"]
SPARSITIES = [0.5, 0.75, 0.875, 0.9, 0.95]
BATCHES = [1, 8, 64, 256]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Issue 3 targets: (shape, batch) -> minimum balanced-over-dense speedup at 90%, bank 32,
# fp32 on the 2-core CPU.
CPU_TARGETS = {
    ("4096x4096", 1): 6.0,
    ("11008x4096", 1): 8.0,
    ("4096x4096", 8): 6.0,
    ("11008x4096", 8): 6.0,
}
CONTENDERS = ["dense", "balanced", "csr", "semi_2to4"]
MAX_COPIES = 256  # weight copies per contender on the CPU


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out, inn = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be OUTxIN like 4096x4096, got {text!r}"
        ) from None
    return out, inn


def semi_structured(weight: torch.Tensor):
    """2:4 weight for torch's semi-structured kernels, or the reason it is unavailable."""
    try:
        from torch.sparse import to_sparse_semi_structured

        pruned, _ = prune_matrix(weight, NMPattern(2, 4), 0.5)
        return to_sparse_semi_structured(pruned)
    except Exception as exc:  # unsupported GPU, dtype or build: reported, not fatal
        return exc


def bytes_moved(name: str, out: int, inn: int, batch: int, es: int, extra: dict) -> int:
    """Bytes a contender must read/write at least: its weight format plus x and y."""
    io = batch * (inn + out) * es
    if name == "dense":
        return out * inn * es + io
    if name.startswith("balanced"):  # also the forced CUDA paths
        return extra["nnz_slots"] * (es + 1) + io  # values + uint8 indices
    if name == "csr":
        return extra["nnz"] * (es + extra["csr_index_bytes"]) + (out + 1) * 8 + io
    return out * inn * es // 2 + out * inn // 16 + io  # 2:4: half the values + 2-bit metadata


def time_contenders(fns: dict, device: torch.device, args) -> tuple[dict, dict]:
    """Seconds per call of each callable (CPU interleaved medians, CUDA graph replays).

    Returns `(seconds, errors)`: on CUDA a contender whose graph capture fails (e.g. a
    library call that cannot be captured) lands in `errors` instead of stopping the sweep.
    """
    if device.type == "cpu":
        clock = CLOCKS[args.clock]
        calls = {name: getattr(fn, "copies", 1) for name, fn in fns.items()}
        # one warm-up round: it already calls every copy once (builds the tile caches)
        seconds = interleaved_medians(
            fns, reps=args.reps, warmup=1, budget_s=args.budget, clock=clock, calls=calls
        )
        return seconds, {}
    seconds, errors = {}, {}
    for name, fn in fns.items():
        try:
            seconds[name] = cuda_graph_us(fn, args.graph_calls, reps=args.reps) * 1e-6
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return seconds, errors


def balanced_path(device: torch.device, k: int, bank: int, batch: int) -> str:
    """Which kernel `BalancedSparseLinear` runs for this layer and batch (see nn/base.py)."""
    if device.type != "cpu":
        return f"{device.type} op"
    if not ops.cpu_tiles_supported(bank):
        return "row-major op"
    return "dense copy" if batch >= ops.dense_crossover(k, bank) else "tiles"


class Rotation:
    """Calls `fn(obj)` for the next of `objs` on each call; `copies` = len(objs)."""

    def __init__(self, fn, objs: list) -> None:
        self.fn, self.objs, self.copies, self._next = fn, objs, len(objs), 0

    def __call__(self):
        obj = self.objs[self._next]
        self._next = (self._next + 1) % self.copies
        return self.fn(obj)


def copies_of(obj, nbytes: int, args, device: torch.device) -> list:
    """`obj` and clones of it, enough to make `args.rotate_mb` MiB (CPU; CUDA rotates in
    cuda_contenders)."""
    if device.type != "cpu" or nbytes <= 0:
        return [obj]
    count = max(1, min(MAX_COPIES, math.ceil(args.rotate_mb * 2**20 / nbytes)))
    clone = copy.deepcopy if isinstance(obj, torch.nn.Module) else torch.Tensor.clone
    return [obj] + [clone(obj) for _ in range(count - 1)]


def bench_layer(out, inn, sparsity, weight, device, dtype, args, copy_bw) -> list[dict]:
    """All batches of one (shape, sparsity): returns one row per batch."""
    bank = args.bank_size
    masked, k = prune_matrix(weight, BalancedPattern(bank), sparsity)
    values, indices, _ = pack_balanced(masked, bank, k)
    w = masked.to(device=device, dtype=dtype)
    values, indices = values.to(device=device, dtype=dtype), indices.to(device)
    layer = BalancedSparseLinear(inn, out, bank, k, bias=False, device=device, dtype=dtype)
    layer._fill_compact("", values, indices)
    extra = {"nnz_slots": values.numel(), "nnz": int((masked != 0).sum())}
    csr = None
    try:
        csr = w.to_sparse_csr()
        extra["csr_index_bytes"] = csr.col_indices().element_size()
    except Exception as exc:  # e.g. a dtype without CSR support
        csr = exc
    semi = semi_structured(w) if device.type == "cuda" and sparsity == 0.5 else None
    es = torch.empty((), dtype=dtype).element_size()
    dense_ws = copies_of(w, w.numel() * es, args, device)
    layers = copies_of(layer, values.numel() * (es + 1), args, device)
    csrs = None
    if not isinstance(csr, Exception):
        csrs = copies_of(csr, extra["nnz"] * (es + extra["csr_index_bytes"]), args, device)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, inn, device=device, dtype=dtype)
        fns = {
            "dense": Rotation(lambda w, x=x: F.linear(x, w), dense_ws),
            "balanced": Rotation(lambda layer, x=x: layer(x), layers),
        }
        errors = {}
        if isinstance(csr, Exception):
            errors["csr"] = f"{type(csr).__name__}: {csr}"
        else:
            fns["csr"] = Rotation(lambda c, x=x: (c @ x.t()).t(), csrs)
        if isinstance(semi, Exception):
            errors["semi_2to4"] = f"{type(semi).__name__}: {semi}"
        elif semi is not None:
            fns["semi_2to4"] = lambda x=x: F.linear(x, semi)
        if device.type == "cuda":
            # weights rotated past the L2 cache, and the op forced to each side of its batch
            # crossover (see cuda_contenders.py)
            plain_csr = None if isinstance(csr, Exception) else csr
            fns.update(cuda_contenders(x, w, values, indices, bank, plain_csr, args.graph_calls))
        for name in list(fns):  # a contender that fails its first call is reported, not timed
            try:
                fns[name]()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                del fns[name]
        # the benchmark runs the real code path: check it computes the same product
        y_dense = fns["dense"]().float()
        rel_err = ((fns["balanced"]().float() - y_dense).abs().max() / y_dense.abs().max()).item()
        seconds, timing_errors = time_contenders(fns, device, args)
        errors.update(timing_errors)
        if "dense" not in seconds:
            raise RuntimeError(f"dense F.linear could not be timed: {errors['dense']}")
        row = {
            "shape": f"{out}x{inn}",
            "out": out,
            "in": inn,
            "bank_size": bank,
            "k": k,
            "sparsity_target": sparsity,
            "sparsity": 1 - k / bank,
            "batch": batch,
            "balanced_path": balanced_path(device, k, bank, batch),
            "weight_copies": {n: getattr(f, "copies", 1) for n, f in fns.items()},
            "balanced_rel_err": rel_err,
            "time_us": {n: s * 1e6 for n, s in seconds.items()},
            "speedup_vs_dense": {n: seconds["dense"] / s for n, s in seconds.items()},
            "bytes_floor_fraction": {
                n: bytes_moved(n, out, inn, batch, es, extra) / s / copy_bw
                for n, s in seconds.items()
            },
            "errors": errors,
        }
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    t, sp, fr = row["time_us"], row["speedup_vs_dense"], row["bytes_floor_fraction"]
    cells = [
        f"{row['shape']:>11}",
        f"{row['sparsity'] * 100:5.1f}%",
        f"b{row['batch']:<4}",
    ]
    for name in CONTENDERS:
        if name in t:
            cells.append(
                f"{name} {t[name]:10.1f}us x{sp[name]:5.2f} ({fr[name] * 100:4.1f}% floor)"
            )
    return " | ".join(cells)


def check_targets(rows: list[dict], device: torch.device, dtype: torch.dtype, bank: int):
    """Issue targets met or missed, for the rows of this run they apply to."""
    if device.type != "cpu" or dtype != torch.float32 or bank != 32:
        return []
    found = []
    for row in rows:
        key = (row["shape"], row["batch"])
        if row["sparsity_target"] == 0.9 and key in CPU_TARGETS:
            speedup = row["speedup_vs_dense"]["balanced"]
            found.append(
                {
                    "shape": row["shape"],
                    "batch": row["batch"],
                    "target": CPU_TARGETS[key],
                    "speedup": speedup,
                    "met": speedup >= CPU_TARGETS[key],
                }
            )
    return found


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# Kernel benchmark: {meta['device_slug']} ({meta['date']})",
        "",
        f"- machine: {meta['machine']}, {meta['threads']} intra-op threads"
        + (f", CPU kernels built for {meta['cpu_isa']}" if meta.get("cpu_isa") else ""),
        f"- torch {meta['torch']}, dtype {meta['dtype']}, bank {meta['bank_size']}, "
        f"balanced backend `{meta['backend']}`",
        f"- timing: {meta['timing']}",
        f"- machine load (1-min load average, start/end): {meta['load_average']}",
        f"- copy bandwidth (same run): {meta['copy_bandwidth_gbs']:.1f} GB/s; "
        "'floor' = achieved bytes/s over it",
        "",
        "| W (out x in) | sparsity | batch | path | dense us | balanced us | CSR us | 2:4 us "
        "| balanced vs dense | CSR vs dense | floor dense | floor balanced |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, name, key, fmt):
        value = row[key].get(name)
        return "-" if value is None else fmt.format(value)

    for row in result["rows"]:
        lines.append(
            f"| {row['shape']} | {row['sparsity'] * 100:.1f}% | {row['batch']} "
            f"| {row.get('balanced_path', '-')} "
            f"| {cell(row, 'dense', 'time_us', '{:.1f}')} "
            f"| {cell(row, 'balanced', 'time_us', '{:.1f}')} "
            f"| {cell(row, 'csr', 'time_us', '{:.1f}')} "
            f"| {cell(row, 'semi_2to4', 'time_us', '{:.1f}')} "
            f"| {cell(row, 'balanced', 'speedup_vs_dense', '{:.2f}x')} "
            f"| {cell(row, 'csr', 'speedup_vs_dense', '{:.2f}x')} "
            f"| {cell(row, 'dense', 'bytes_floor_fraction', '{:.0%}')} "
            f"| {cell(row, 'balanced', 'bytes_floor_fraction', '{:.0%}')} |"
        )
    if result["targets"]:
        lines += ["", "Targets (90% requested = 90.6% with bank 32, fp32):", ""]
        for t in result["targets"]:
            verdict = "met" if t["met"] else "MISSED"
            lines.append(
                f"- {t['shape']} batch {t['batch']}: {t['speedup']:.2f}x "
                f"(target {t['target']:.0f}x) {verdict}"
            )
    errors = {(r["shape"], r["sparsity"], r["batch"]): r["errors"] for r in result["rows"]}
    reasons = sorted({f"{n}: {e}" for errs in errors.values() for n, e in errs.items()})
    if reasons:
        lines += ["", "Contenders that could not run:", ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bs_lightning.bench kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=[parse_shape(s) for s in SHAPES],
        help="OUTxIN weight shapes (default: %(default)s)",
    )
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--bank-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument(
        "--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="CPU timer; thread-cpu needs --threads 1 (for loaded shared machines)",
    )
    p.add_argument("--reps", type=int, default=15, help="timed rounds (CPU) or replays (CUDA)")
    p.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help="CPU: seconds of rounds per row after which no more are added (>= 3)",
    )
    p.add_argument(
        "--rotate-mb",
        type=float,
        default=1.25 * llc_bytes() / 2**20,
        help="CPU: MiB of weight copies each contender cycles through (0: one copy, the "
        "cache-hot figure; default: 1.25 x the last-level cache, %(default).0f)",
    )
    p.add_argument("--graph-calls", type=int, default=20, help="CUDA: calls captured per graph")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="where <device>-<date>.json/.md go (default: %(default)s)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if not 1 <= args.bank_size <= 256:
        p.error(f"--bank-size must be in 1..256, got {args.bank_size}")
    for s in args.sparsities:
        try:
            keep_count(args.bank_size, s)
        except ValueError as exc:
            p.error(f"--sparsities: {exc}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.clock == "thread-cpu" and args.threads != 1:
        p.error("--clock thread-cpu measures one thread: use it with --threads 1")
    return args


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ops.load()
    torch.manual_seed(args.seed)
    load_before = load_average()
    copy_bw = copy_bandwidth(device, clock=CLOCKS[args.clock])
    rows = []
    for out, inn in args.shapes:
        weight = torch.randn(out, inn, device=device)  # masks and packing run on the device
        for sparsity in args.sparsities:
            rows += bench_layer(out, inn, sparsity, weight, device, dtype, args, copy_bw)
        del weight
    timing = (
        f"CUDA events around replays of a CUDA graph of {args.graph_calls} calls, median of "
        f"{args.reps}"
        if device.type == "cuda"
        else f"interleaved rounds ({args.clock} clock), median of up to {args.reps} rounds "
        f"(at least 3; no new round after {args.budget:.0f}s per row); each contender cycles "
        f"through weight copies of {args.rotate_mb:.0f} MiB in all, one call per copy per round"
    )
    return {
        "meta": {
            "device_slug": device_slug(device),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": device_label(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "bank_size": args.bank_size,
            "backend": ops.backend(device),
            # the library is built for this CPU (or BS_LIGHTNING_MARCH): which tile kernel ran
            "cpu_isa": torch.ops.bs_lightning.cpu_isa()
            if device.type == "cpu" and ops.backend(device) != "reference"
            else None,
            "timing": timing,
            "copy_bandwidth_gbs": copy_bw / 1e9,
            # runnable processes on the machine (1-minute load average) at start and end:
            # far above the core count, wall-clock times mostly measure waiting for a core
            "load_average": [load_before, load_average()],
        },
        "rows": rows,
        "targets": check_targets(rows, device, dtype, args.bank_size),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    md = to_markdown(result)
    print(md)
    if not args.no_write:
        stem = f"{result['meta']['device_slug']}-{dt.date.today().isoformat()}"
        if args.clock != "wall":
            stem += f"-{args.clock}"
        write_result(args.out_dir / stem, result, md)
        print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
