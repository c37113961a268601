"""Per-step overhead of BalancedPruningCallback under FSDP2 and FSDP1 against DDP (2 CPU
processes, gloo).

The same MLP (`--layers` x Linear(`--width`), batch `--batch` per rank, AdamW) trains with
`ModelParallelStrategy` + `fully_shard` (FSDP2), with `FSDPStrategy` (FSDP1, one unit per
Linear, `use_orig_params=True`) and with DDP, each with and without the
callback (balanced 90%, bank 32, cubic, a mask update every `--frequency` steps). Each
strategy runs in its own pair of processes (`--worker`): arms alternate in blocks (A B B A),
each block a fresh `Trainer` and model; rank 0 times every step (`StepTimer` of
`callback_overhead.py`) and the timed window drops each block's first step. The overhead of
a strategy is its mean step time with the callback over the mean without, minus 1.

Writes `benchmarks/results/callback_overhead_sharded-cpu-<date>.{json,md}`.

Usage: python benchmarks/callback_overhead_sharded.py [--width 1024] [--layers 4] [--steps 61]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from callback_overhead import StepTimer
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, TensorDataset

from bs_lightning import BalancedPruningCallback
from bs_lightning.bench.device import machine_description
from bs_lightning.bench.results import write_result

STRATEGIES = ("ddp", "fsdp2", "fsdp1")


class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` on the CPU, wrapped as on a GPU (the root and one unit per Linear):
    Lightning refuses the exact class without a GPU and passes FSDP1 no device on the CPU."""

    def _setup_model(self, model):
        model = FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
            use_orig_params=True,
        )
        return super()._setup_model(model)


class MLP(LightningModule):
    def __init__(self, width: int, layers: int, shard: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.shard = shard

    def configure_model(self):
        if self.shard:
            mesh = self.device_mesh["data_parallel"]
            for block in self.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = x
        for block in self.blocks:
            h = torch.relu(block(h))
        return h.square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def run_block(args, strategy: str, with_callback: bool) -> list[float]:
    torch.manual_seed(0)
    model = MLP(args.width, args.layers, shard=strategy == "fsdp2")
    data = TensorDataset(torch.randn(args.steps * args.batch * 2, args.width))
    timer = StepTimer()
    callbacks = [timer]
    if with_callback:
        callbacks.append(
            BalancedPruningCallback(
                sparsity=0.9,
                bank_size=32,
                frequency=args.frequency,
                end_step=args.steps - 1,
                verbose=False,
            )
        )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy={
            "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            "fsdp1": CPUFSDPStrategy,
            "ddp": lambda: "ddp",
        }[strategy](),
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=args.batch))
    return timer.times[1:]


def worker(args) -> None:
    """One strategy: blocks A B B A ...; rank 0 writes the step times to `--out`."""
    times = {"with": [], "without": []}
    for block in range(2 * args.rounds):
        order = ("without", "with") if block % 2 == 0 else ("with", "without")
        for arm in order:
            times[arm] += run_block(args, args.worker, arm == "with")
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32, help="rows per rank and step")
    p.add_argument("--steps", type=int, default=61, help="optimizer steps per block")
    p.add_argument("--frequency", type=int, default=10, help="steps between mask updates")
    p.add_argument("--rounds", type=int, default=1, help="A B B A rounds per strategy")
    p.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    date = dt.date.today().isoformat()
    record = {
        "benchmark": "callback overhead, FSDP2 and FSDP1 vs DDP",
        "date": date,
        "machine": machine_description("cpu"),
        "torch": torch.__version__,
        "processes": 2,
        **{k: getattr(args, k) for k in ("width", "layers", "batch", "steps", "frequency")},
        "rows": [],
    }
    stem = Path(__file__).parent / "results" / f"callback_overhead_sharded-cpu-{date}"
    for strategy in STRATEGIES:
        out = stem.with_name(f"{stem.name}-{strategy}-times.tmp.json")
        flags = [f"--{k}={getattr(args, k)}" for k in ("width", "layers", "batch", "steps")]
        flags += [f"--frequency={args.frequency}", f"--rounds={args.rounds}"]
        command = [sys.executable, __file__, *flags, f"--worker={strategy}", f"--out={out}"]
        subprocess.run(command, check=True, capture_output=True, text=True)
        times = json.loads(out.read_text())
        out.unlink()
        with_ms = statistics.mean(times["with"]) * 1e3
        without_ms = statistics.mean(times["without"]) * 1e3
        record["rows"].append(
            {
                "strategy": strategy,
                "steps_timed": len(times["with"]),
                "with_ms": with_ms,
                "without_ms": without_ms,
                "overhead": with_ms / without_ms - 1,
            }
        )
        print(f"{strategy}: {without_ms:.2f} -> {with_ms:.2f} ms per step", flush=True)
    lines = [
        f"# Callback overhead per step, FSDP2 and FSDP1 vs DDP ({date})",
        "",
        f"{record['machine']}, torch {record['torch']}, 2 CPU processes (gloo). MLP "
        f"{args.layers} x Linear({args.width}), batch {args.batch} per rank, AdamW; balanced "
        f"90%, bank 32, a mask update every {args.frequency} steps; mean of the timed steps "
        f"(blocks A B B A, first step of each block dropped).",
        "",
        "| strategy | steps timed | without callback ms | with callback ms | overhead |",
        "|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| {row['strategy']} | {row['steps_timed']} | {row['without_ms']:.2f} | "
            f"{row['with_ms']:.2f} | {row['overhead']:+.1%} |"
        )
    json_path, md_path = write_result(stem, record, "\n".join(lines) + "\n")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
