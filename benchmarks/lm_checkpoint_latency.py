"""Latency of pruned LSTM LM checkpoints, dense vs converted, re-measured on a quiet machine.

The `bs-train` runs measure latency at the end of each run, but a sweep runs several runs
at once on a small machine, so those figures carry the load of the others. This loads the
balanced runs' final checkpoints (`<run>/checkpoints/last.ckpt`) one after another and
times the pruned model (dense kernels) against its converted model in turns with
`bs_lightning.bench.timing.measure_latency`, on one input of `--batch` rows of `--bptt` tokens.

    python benchmarks/lm_checkpoint_latency.py RUN_DIR... --bank-size 50 [--threads 1]
        [--out benchmarks/results/NAME]   # writes NAME.json and NAME.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import torch

from bs_lightning import convert_to_sparse
from bs_lightning.bench.device import load_average, machine_description
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import measure_latency
from bs_lightning.evaluate import clone_model
from bs_lightning.models.lstm_lm import LSTMLanguageModel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="bs-train run folders (balanced runs)")
    p.add_argument("--bank-size", type=int, required=True, help="the runs' pruning.bank_size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--out", type=Path, default=None, help="stem of the .json/.md to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for run in args.runs:
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"no checkpoint at {ckpt}: pass bs-train run folders")
        meta = json.loads((run / "metrics.json").read_text())
        model = LSTMLanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
        converted = convert_to_sparse(clone_model(model), strict=True, bank_size=args.bank_size)
        x = torch.randint(model.hparams.vocab_size, (args.batch, args.bptt))
        ms = measure_latency(
            {"dense": model, "converted": converted}, x, torch.device("cpu"), 10, args.repeats
        )
        row = {
            "run": str(run),
            "pattern": meta["pattern"],
            "sparsity": meta["sparsity"],
            "test_ppl": meta["pruned"],
            "dense_ms": ms["dense"],
            "converted_ms": ms["converted"],
            "speedup": ms["dense"] / ms["converted"],
        }
        rows.append(row)
        print(
            f"{run}: dense {row['dense_ms']:.3f} ms, converted {row['converted_ms']:.3f} ms, "
            f"{row['speedup']:.2f}x",
            flush=True,
        )
    if args.out is not None:
        load = load_average()
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description("cpu"),
            "torch": torch.__version__,
            "threads": args.threads,
            "input": [args.batch, args.bptt],
            "repeats": args.repeats,
            "load_average_end": load,
            "rows": rows,
        }
        lines = [
            f"# LSTM LM latency, pruned (dense kernels) vs converted ({result['date']})",
            "",
            f"{result['machine']}, torch {torch.__version__}, {args.threads} thread(s), "
            f"input {args.batch} x {args.bptt} tokens, median of {args.repeats} passes each, "
            f"in turns; load average at the end {load:.2f}.",
            "",
            "| run | sparsity | test ppl | dense ms | converted ms | speedup |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['run']} | {r['sparsity']} | {r['test_ppl']:.2f} | {r['dense_ms']:.3f} "
                f"| {r['converted_ms']:.3f} | {r['speedup']:.2f}x |"
            )
        write_result(args.out, result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
