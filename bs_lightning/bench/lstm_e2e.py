"""LSTM end-to-end latency: dense `nn.LSTM` (cuDNN) vs `BalancedSparseLSTM`, batch 1.

PTB-large shapes by default (Zaremba "large": 2 layers, 1500 units, 35 steps), 90%
sparsity, bank sizes 50 (1500 = 30 banks) and 32. Every variant runs the whole sequence;
each is timed with CUDA events around one call (median of `--reps` after `--warmup`):

- `dense_eager`: `nn.LSTM` as users run it (cuDNN, kernels launched from Python).
- `dense_graph`: the same call captured in a CUDA graph.
- `sparse_eager`: `BalancedSparseLSTM` launched from Python (on CUDA each time step is one
  fused `balanced_lstm_cell` kernel: recurrent product, gates and state update).
- `sparse_graph`: `BalancedSparseLSTM` captured by `CudaGraphRunner` (the step loop becomes
  one graph launch).
- `sparse_compiled_graph` (with `--compile`, first bank size only): `torch.compile` of the
  sparse module (fuses the gate arithmetic of each step), then captured.

A variant that cannot run (e.g. capture refused) is recorded with its error instead of a time.
Writes `<out-dir>/<device>-<date>-lstm.json` and `.md`.

`--dry-run` runs every eager variant once on a tiny model on the CPU (no timing, no files
unless `--out-dir` is given): a check that the entry point and the modules work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bs_lightning.bench.device import device_label, device_slug
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import cuda_event_us
from bs_lightning.nn.cuda_graph import CudaGraphRunner
from bs_lightning.nn.lstm import BalancedSparseLSTM, lstm_weight_names

__all__ = ["main", "run"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TARGET_SPEEDUP = 2.5  # issue 4: sparse (graph) vs nn.LSTM (cuDNN, eager) at 90%


def build_models(args, bank_size: int, device: torch.device, dtype: torch.dtype):
    """Dense LSTM with PyTorch's init, its one-shot balanced prune, and the pruned dense twin.

    Returns:
        `(dense, sparse, pruned_dense)`, all in eval mode on `device` in `dtype`.
    """
    torch.manual_seed(0)
    dense = nn.LSTM(args.hidden, args.hidden, num_layers=args.layers).to(device).eval()
    sparse = BalancedSparseLSTM.from_dense(dense, bank_size, sparsity=args.sparsity).eval()
    pruned = sparse.to_dense().eval()
    return dense.to(dtype), sparse.to(dtype), pruned.to(dtype)


def layout(sparse: BalancedSparseLSTM, weight: str) -> list[int]:
    """`[out_features, in_features, bank_size, k]` of one matrix (its layout buffer)."""
    return getattr(sparse, weight + "_layout").tolist()


def measured_sparsity(sparse: BalancedSparseLSTM) -> float:
    """Fraction of zeros of the dense matrices the sparse module stands for (all layers)."""
    total = kept = 0
    for w in lstm_weight_names(sparse.num_layers, sparse.bidirectional):
        out_f, in_f, _, _ = layout(sparse, w)
        total += out_f * in_f
        kept += int((getattr(sparse, w + "_values") != 0).sum())
    return 1.0 - kept / total


def variants(dense, sparse, x, compile_sparse: bool) -> dict[str, Callable[[], object] | Exception]:
    """Name -> zero-argument callable running the whole sequence, or the exception that
    prevented building it (e.g. a capture refused)."""
    out: dict[str, Callable[[], object] | Exception] = {
        "dense_eager": lambda: dense(x),
        "sparse_eager": lambda: sparse(x),
    }
    if x.device.type != "cuda":
        return out
    for name, fn in (("dense_graph", dense), ("sparse_graph", sparse)):
        try:
            out[name] = CudaGraphRunner(fn, [x]).replay
        except Exception as exc:  # recorded in the results, e.g. a capture cuDNN refuses
            out[name] = exc
    if compile_sparse:
        try:
            compiled = torch.compile(sparse, dynamic=False)
            out["sparse_compiled_graph"] = CudaGraphRunner(compiled, [x]).replay
        except Exception as exc:
            out["sparse_compiled_graph"] = exc
    return out


def run(args) -> dict:
    """Builds the models for every bank size, checks outputs, times every variant."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    results = {
        "benchmark": "lstm_e2e",
        "device": device_label(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "hidden": args.hidden,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "sparsity_target": args.sparsity,
        "reps": args.reps,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "banks": [],
    }
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.seq, args.batch, args.hidden, generator=g).to(device, dtype)
    for bank_size in args.bank_sizes:
        dense, sparse, pruned = build_models(args, bank_size, device, dtype)
        with torch.no_grad():
            out_sparse = sparse(x)[0].float()
            out_pruned = pruned(x)[0].float()
        entry = {
            "bank_size": bank_size,
            "k": layout(sparse, "weight_hh_l0")[3],
            "sparsity": round(measured_sparsity(sparse), 4),
            "max_abs_diff_vs_pruned_dense": float((out_sparse - out_pruned).abs().max()),
            "times_us": {},
            "errors": {},
        }
        with torch.no_grad():
            # torch.compile takes tens of seconds per model: first bank size only.
            compile_here = args.compile and bank_size == args.bank_sizes[0]
            for name, fn in variants(dense, sparse, x, compile_here).items():
                if isinstance(fn, Exception):
                    entry["errors"][name] = f"{type(fn).__name__}: {fn}"[:300]
                elif device.type == "cuda":
                    try:
                        us = cuda_event_us(fn, args.reps, args.warmup)
                        entry["times_us"][name] = round(us, 2)
                    except Exception as exc:  # recorded, the other variants still run
                        entry["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
                else:
                    fn()  # dry run: exercise the path once
        t = entry["times_us"]
        if "dense_eager" in t and "sparse_graph" in t:
            entry["speedup_vs_dense_eager"] = round(t["dense_eager"] / t["sparse_graph"], 3)
        if "dense_graph" in t and "sparse_graph" in t:
            entry["speedup_vs_dense_graph"] = round(t["dense_graph"] / t["sparse_graph"], 3)
        sparse_times = {
            n: v for n, v in t.items() if n.startswith("sparse_") and n != "sparse_eager"
        }
        if "dense_eager" in t and sparse_times:
            best = min(sparse_times, key=sparse_times.get)
            entry["best_sparse"] = best
            entry["best_speedup_vs_dense_eager"] = round(t["dense_eager"] / t[best], 3)
            entry["meets_target"] = entry["best_speedup_vs_dense_eager"] >= TARGET_SPEEDUP
        results["banks"].append(entry)
    return results


def to_markdown(results: dict) -> str:
    names = [
        "dense_eager",
        "dense_graph",
        "sparse_eager",
        "sparse_graph",
        "sparse_compiled_graph",
    ]
    lines = [
        f"# LSTM end-to-end latency, {results['device']}",
        "",
        f"{results['layers']} layers x {results['hidden']} units, sequence {results['seq']}, "
        f"batch {results['batch']}, {results['dtype']}, target sparsity "
        f"{results['sparsity_target']}; torch {results['torch']}; median of "
        f"{results['reps']} calls (CUDA events), microseconds per sequence.",
        "",
        "| bank | k | sparsity | "
        + " | ".join(names)
        + " | sparse_graph vs cuDNN eager | vs cuDNN graph | best sparse vs cuDNN eager |",
        "|---" * (len(names) + 6) + "|",
    ]
    for b in results["banks"]:
        cells = [str(b["times_us"].get(n, "n/a")) for n in names]
        lines.append(
            f"| {b['bank_size']} | {b['k']} | {b['sparsity']} | " + " | ".join(cells) + " | "
            f"{b.get('speedup_vs_dense_eager', 'n/a')} | {b.get('speedup_vs_dense_graph', 'n/a')} | "
            f"{b.get('best_speedup_vs_dense_eager', 'n/a')} ({b.get('best_sparse', '-')}) |"
        )
    for b in results["banks"]:
        for name, err in b["errors"].items():
            lines.append(f"\n- bank {b['bank_size']}, {name} failed: `{err}`")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bs_lightning.bench.lstm_e2e", description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (timed) or cpu (with --dry-run)")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--hidden", type=int, default=1500, help="input and hidden units")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=35, help="time steps per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--bank-sizes", type=int, nargs="+", default=[50, 32])
    p.add_argument("--reps", type=int, default=100, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--out-dir", type=Path, default=None, help="write JSON and Markdown here")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny model on the CPU, each variant run once, no timing",
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.hidden, args.seq, args.dtype = "cpu", 64, 5, "float32"
        args.bank_sizes = [16]
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU (use --dry-run on a machine without one)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    md = to_markdown(results)
    print(md)
    if args.out_dir is not None:
        stem = f"{device_slug(torch.device(args.device))}-{dt.date.today().isoformat()}-lstm"
        write_result(args.out_dir / stem, results, md)
        print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
