"""LSTM inference latency on the CPU: dense `nn.LSTM` vs `BalancedSparseLSTM`, side by side.

Batch 1, a 35-step sequence, 2 layers, 90% balanced sparsity, for hidden sizes from the
`lstm_ptb_small` recipe (200) up to the paper's PTB-large model (1500). The two modules run
in turns inside one process (median of `--reps` calls each), so machine load hits both alike.

    python benchmarks/lstm_cpu_latency.py [--threads N] [--out benchmarks/results]

Writes `lstm-cpu-<date>.{json,md}`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
from pathlib import Path

import torch

from bs_lightning.bench.device import machine_description
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import interleaved_medians
from bs_lightning.nn import BalancedSparseLSTM
from bs_lightning.sparsity import BalancedPattern, find_prunable, prune_once_

# (hidden size, bank size): 200 = lstm_ptb_small, 650 = Zaremba "medium", 1500 = "large"
CASES = ((200, 25), (650, 50), (1500, 50))


def masked_lstm(hidden: int, bank: int, sparsity: float) -> torch.nn.LSTM:
    """A 2-layer `nn.LSTM` whose weight matrices are balanced-sparse (exact zeros)."""
    lstm = torch.nn.LSTM(hidden, hidden, num_layers=2).eval()
    prune_once_(find_prunable(lstm), BalancedPattern(bank), sparsity)
    return lstm


@torch.no_grad()
def time_pair(dense, sparse, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds per call of `dense(x)` and `sparse(x)`, timed in turns."""
    fns = {"dense": lambda: dense(x), "sparse": lambda: sparse(x)}
    s = interleaved_medians(fns, reps=reps, warmup=1, budget_s=math.inf, rotate=False)
    return s["dense"], s["sparse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seq", type=int, default=35, help="time steps")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for hidden, bank in CASES:
        dense = masked_lstm(hidden, bank, args.sparsity)
        sparse = BalancedSparseLSTM.from_dense(dense, bank).eval()
        x = torch.randn(args.seq, 1, hidden)  # [T, batch 1, features]
        d, s = time_pair(dense, sparse, x, args.reps)
        rows.append(
            {
                "hidden": hidden,
                "bank": bank,
                "dense_ms": d * 1e3,
                "sparse_ms": s * 1e3,
                "speedup": d / s,
            }
        )
        print(
            f"hidden {hidden} bank {bank}: dense {d * 1e3:.2f} ms, sparse {s * 1e3:.2f} ms, "
            f"{d / s:.2f}x"
        )

    date = dt.date.today().isoformat()
    meta = {
        "machine": machine_description("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "sparsity": args.sparsity,
        "seq": args.seq,
        "batch": 1,
        "layers": 2,
    }
    lines = [
        "# LSTM inference latency on the CPU: dense nn.LSTM vs BalancedSparseLSTM",
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, load average "
        f"{meta['load_average'][0]:.1f}; 2 layers, batch 1, {args.seq} steps, "
        f"{args.sparsity:.0%} balanced sparsity, median of {args.reps} calls each, in turns.",
        "",
        "| hidden | bank | dense ms | sparse ms | speedup |",
        "|---|---|---|---|---|",
        *(
            f"| {r['hidden']} | {r['bank']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | "
            f"{r['speedup']:.2f}x |"
            for r in rows
        ),
    ]
    write_result(args.out / f"lstm-cpu-{date}", {**meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
