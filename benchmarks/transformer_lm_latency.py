"""Latency of the `transformer_ptb` model, dense vs converted, at several sparsities.

Builds `TransformerLanguageModel` with `conf/model/transformer_lm.yaml`'s sizes (PTB's
10,000 words), prunes it one-shot (`prune_once_`, balanced, bank 32) with the recipe's
selection (`linear1`/`linear2`), with the attention projections too, or with the output head
as well (in the model with `tie_weights=False`: a head tied to the token embedding is not
converted), converts it, checks the outputs agree and times dense against converted in
turns (`measure_latency`, `--cache` as in `bs-bench model`) on one window of `--bptt`
tokens. Weights are random: latency does not depend on their values.

    python benchmarks/transformer_lm_latency.py --threads 2 --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

from bs_lightning import convert_to_sparse
from bs_lightning.bench.device import load_average, machine_description
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import CACHE_STATES, measure_latency
from bs_lightning.convert import conversion_report
from bs_lightning.evaluate import clone_model
from bs_lightning.models.transformer_lm import TransformerLanguageModel
from bs_lightning.sparsity import BalancedPattern, find_prunable, prune_once_

# what is pruned (globs, whether the head is tied to the embedding): the recipe's feed-forward
# layers, every projection of the blocks, or those and the (untied) output head
BLOCKS = ["*linear1", "*linear2", "*self_attn", "*out_proj"]
SELECTIONS = {
    "ffn": (["*linear1", "*linear2"], True),
    "ffn+attention": (BLOCKS, True),
    "ffn+attention+head (untied)": ([*BLOCKS, "decoder"], False),
}
SIZES = dict(vocab_size=10_000, d_model=256, nhead=4, num_layers=2, dim_feedforward=1024)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--bank-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bptt", type=int, default=64, help="tokens per window (the recipe's)")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--cache", choices=CACHE_STATES, default="warm", help="see bs-bench model")
    p.add_argument("--out", type=Path, default=None, help="stem of the .json/.md to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bases = {
        tie: TransformerLanguageModel(**SIZES, max_len=max(256, args.bptt), tie_weights=tie).eval()
        for tie in (True, False)
    }
    x = torch.randint(SIZES["vocab_size"], (args.batch, args.bptt))
    rows = []
    for selection, (include, tie) in SELECTIONS.items():
        for sparsity in args.sparsities:
            model = clone_model(bases[tie]).eval()
            plan = prune_once_(
                find_prunable(model, include), BalancedPattern(args.bank_size), sparsity
            )
            converted = convert_to_sparse(clone_model(model).eval(), plan=plan)
            done, left = conversion_report(converted, plan)
            with torch.inference_mode():
                diff = (converted(x)[0] - model(x)[0]).abs().max().item()
            ms = measure_latency(
                {"dense": model, "converted": converted},
                x,
                torch.device("cpu"),
                10,
                args.repeats,
                cache=args.cache,
            )
            row = {
                "selection": selection,
                "sparsity": sparsity,
                "layers_converted": f"{len(done)} of {len(done) + len(left)}",
                "max_abs_diff": diff,
                "dense_ms": ms["dense"],
                "converted_ms": ms["converted"],
                "speedup": ms["dense"] / ms["converted"],
            }
            rows.append(row)
            print(
                f"{selection:<28} {sparsity:.2f}: dense {row['dense_ms']:.3f} ms, converted "
                f"{row['converted_ms']:.3f} ms, {row['speedup']:.2f}x "
                f"({row['layers_converted']} layers, max diff {diff:.1e})",
                flush=True,
            )
    record = {
        "benchmark": "transformer_lm_latency",
        "date": dt.date.today().isoformat(),
        "machine": machine_description(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": load_average(),
        "input_shape": list(x.shape),
        "bank_size": args.bank_size,
        "cache": args.cache,
        "model": SIZES,
        "rows": rows,
    }
    lines = [
        f"# transformer_ptb model latency, dense vs converted ({record['date']})",
        "",
        f"{record['machine']}, torch {record['torch']}, {args.threads} threads, load average "
        f"{record['load_average']}; input {args.batch} x {args.bptt} tokens; balanced bank "
        f"{args.bank_size}, one-shot pruned random weights; median of {args.repeats}, timed in "
        f"turns in one process, caches {args.cache}.",
        "",
        "| pruned | sparsity | layers converted | dense ms | converted ms | speedup |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['selection']} | {r['sparsity']:.2f} | {r['layers_converted']} | "
        f"{r['dense_ms']:.3f} | {r['converted_ms']:.3f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    if args.out:
        write_result(args.out, record, "\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
