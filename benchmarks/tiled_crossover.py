"""Where the CPU tile kernel stops beating dense: the kernel, the op's unpack + GEMM path and
dense `F.linear`, side by side, by kept fraction and input rows.

For each keep-count `k` of 32 and each `[out, in]` shape, a balanced layer times, in
interleaved rounds (`bench.timing.interleaved_medians`, medians), at each batch of rows:
- `tiles`: `balanced_linear_tiled` with the crossover rule switched off
  (`BS_LIGHTNING_CPU_DENSE_MIN_BATCH` set past every batch), so the permute kernel runs;
- `unpack`: the same op with the variable at 1, so it unpacks and calls the GEMM;
- `dense`: `nn.Linear` with the same (pruned) weights.
The rule in `csrc/cpu/balanced_linear_tiled_cpu.cpp` (`tiled_dense_crossover`) comes from
these tables. Build the library for another ISA with `BS_LIGHTNING_MARCH` (e.g. `x86-64-v3`
for AVX2 on an AVX-512 machine); the ISA goes into the file name.

Writes `benchmarks/results/cpu-2core-<date>-tiled-crossover-<isa>.{json,md}`.

Usage: python benchmarks/tiled_crossover.py [--ks 24 20 16 12 10] [--batches 64 ... 1024]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from bs_lightning import ops
from bs_lightning.bench.results import cpu_record, write_result
from bs_lightning.bench.timing import interleaved_medians
from bs_lightning.nn import BalancedSparseLinear
from bs_lightning.ops import CPU_DENSE_MIN_BATCH_ENV

SHAPES = ((1536, 384), (384, 1536), (4096, 4096))  # [out, in]: MiniLM's FFN, a large layer
NEVER = str(1 << 40)


def measure(k: int, out: int, inn: int, batches, budget_s: float) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.Linear(inn, out).eval()
    sparse = BalancedSparseLinear.from_dense(dense, 32, 1 - k / 32).eval()
    dense = sparse.to_dense().eval()
    tile_values, tile_indices = ops.pack_tiles(sparse.values.detach(), sparse.indices)
    rows = []
    for batch in batches:
        x = torch.randn(batch, inn)

        def op(env: str, x=x):
            def call():
                os.environ[CPU_DENSE_MIN_BATCH_ENV] = env  # read by the op on every call
                return torch.ops.bs_lightning.balanced_linear_tiled(
                    x, tile_values, tile_indices, 32, inn, out, dense.bias
                )

            return call

        with torch.inference_mode():
            seconds = interleaved_medians(
                {"dense": lambda x=x: dense(x), "tiles": op(NEVER), "unpack": op("1")},
                reps=15,
                warmup=2,
                budget_s=budget_s,
            )
        os.environ.pop(CPU_DENSE_MIN_BATCH_ENV, None)
        us = {name: s * 1e6 for name, s in seconds.items()}
        rows.append(
            {
                "k": k,
                "shape": [out, inn],
                "batch": batch,
                **{f"{name}_us": v for name, v in us.items()},
                "tiles_speedup": us["dense"] / us["tiles"],
                "unpack_speedup": us["dense"] / us["unpack"],
            }
        )
        print(
            f"k={k} {out}x{inn} batch {batch}: tiles {rows[-1]['tiles_speedup']:.2f}x, "
            f"unpack {rows[-1]['unpack_speedup']:.2f}x dense ({us['dense']:.0f} us)",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[24, 20, 18, 16, 14, 12, 10])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--max-batch-large", type=int, default=256, help="batches for 4096x4096")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=6.0, help="timing budget per case")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not ops.load() or not ops.cpu_tiles_supported(32):
        raise SystemExit("tiled_crossover: needs the compiled library with the tile kernel")
    isa = torch.ops.bs_lightning.cpu_isa()
    record = cpu_record("tiled crossover", f"balanced_linear_tiled ({isa} build)")
    record["rule"] = {k: ops.dense_crossover(k, 32) for k in args.ks}
    record["rows"] = []
    for k in args.ks:
        for out, inn in SHAPES:
            batches = [b for b in args.batches if out * inn < 4e6 or b <= args.max_batch_large]
            record["rows"] += measure(k, out, inn, batches, args.budget_s)
    lines = [
        f"# Tile kernel vs unpack + GEMM vs dense, {isa} build ({record['date']})",
        "",
        f"{record['machine']}, torch {record['torch']}, {args.threads} threads, load average "
        f"at start {record['load_average']}; medians of interleaved rounds. Speedups over "
        "dense `nn.Linear` with the same weights; banks of 32.",
        "",
        "| k of 32 | out x in | batch | dense us | tiles | unpack + GEMM |",
        "|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['k']} | {r['shape'][0]}x{r['shape'][1]} | {r['batch']} | "
            f"{r['dense_us']:.0f} | {r['tiles_speedup']:.2f}x | {r['unpack_speedup']:.2f}x |"
        )
    stem = Path(__file__).parent / "results" / f"cpu-2core-{record['date']}-tiled-crossover-{isa}"
    json_path, md_path = write_result(stem, record, "\n".join(lines) + "\n")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
