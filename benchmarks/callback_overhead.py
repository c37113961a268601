"""Overhead of BalancedPruningCallback per training step on a 2-layer LSTM language model (CPU).

The real code path: `Trainer.fit` of a word-level LSTM LM (PTB "medium" shape: vocabulary
10000, embedding and hidden 650, 35 steps of backprop through time, batch 20) on random
tokens, once with the callback (sparsity 0.9, bank 32, cubic, `frequency=100`) and once
without. Arms alternate in blocks (A B B A ...), each block a fresh `Trainer` and a model
started from the same weights; every block runs `steps` optimizer steps and the timed
window is steps 1..steps-1 (step 0 includes warm-up), which holds one mask update per 100
steps. Two figures are reported:

- A/B: mean step time with the callback over mean step time without, minus 1.
- Direct: time spent inside the callback (batch-start pruning, gradient masking, the
  post-step re-application) per step, over the step time without the callback.

Writes `benchmarks/results/callback_overhead-cpu-<date>.{json,md}`.

Usage: python benchmarks/callback_overhead.py [--hidden 650] [--steps 201] [--rounds 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bs_lightning import BalancedPruningCallback
from bs_lightning.bench.device import device_label, machine_description
from bs_lightning.bench.results import write_result
from bs_lightning.bench.timing import CLOCKS, accumulate_time


class LSTMLM(LightningModule):
    """Embedding -> 2-layer LSTM -> Linear decoder; batches of token ids `[B, bptt + 1]`."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2)
        self.decoder = nn.Linear(hidden, vocab)

    def training_step(self, batch, batch_idx):
        tokens = batch[0].t()  # [bptt + 1, B], time-major
        h, _ = self.lstm(self.embed(tokens[:-1]))  # [bptt, B, hidden]
        logits = self.decoder(h)  # [bptt, B, vocab]
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class StepTimer(Callback):
    """Wall time of every training step, from the first batch-start hook to the batch end."""

    def __init__(self, clock=CLOCKS["wall"]):
        self.times: list[float] = []
        self._clock = clock
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self._clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(self._clock() - self._start)


def run_block(args, init_state, with_callback: bool) -> dict:
    torch.manual_seed(1)
    model = LSTMLM(args.vocab, args.hidden)
    model.load_state_dict(init_state)
    tokens = torch.randint(0, args.vocab, (args.steps * args.batch, args.bptt + 1))
    loader = DataLoader(TensorDataset(tokens), batch_size=args.batch)
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    # seconds inside the pruning callback: mask updates (batch start) and per-step passes
    prune_box, step_box = [0.0], [0.0]
    if with_callback:
        pruner = BalancedPruningCallback(
            sparsity=0.9,
            bank_size=32,
            frequency=args.frequency,
            end_step=args.steps - 1,
            verbose=False,
        )
        # instance attributes shadow the methods, so Lightning and the optimizer hook call these
        depth = [0]
        for name, box in (
            ("on_train_batch_start", prune_box),
            ("on_before_optimizer_step", step_box),
            ("_apply_masks", step_box),
        ):
            setattr(pruner, name, accumulate_time(getattr(pruner, name), box, depth))
        callbacks.append(pruner)
    trainer = Trainer(
        max_steps=args.steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    window = timer.times[1:]  # drop step 0 (warm-up)
    result = {"with_callback": with_callback, "step_s": statistics.fmean(window)}
    if with_callback:
        # the grad and post-step passes of steps 1.. plus the pruning in them; step 0's
        # share of `inside` is small (nothing changes at s=0) and is counted, conservatively
        result["inside_per_step_s"] = (prune_box[0] + step_box[0]) / len(window)
        result["mask_updates_per_step_s"] = prune_box[0] / len(window)
        result["masking_passes_per_step_s"] = step_box[0] / len(window)
        result["sparsity"] = pruner.sparsity_report()["sparsity/overall"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--hidden", type=int, default=650)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=201, help="optimizer steps per block")
    parser.add_argument("--frequency", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of A B B A blocks")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    init_state = LSTMLM(args.vocab, args.hidden).state_dict()
    load_before = os.getloadavg()
    blocks = []
    for _ in range(args.rounds):
        for with_callback in (True, False, False, True):
            blocks.append(run_block(args, init_state, with_callback))
            print(json.dumps(blocks[-1]), flush=True)
    load_after = os.getloadavg()

    with_cb = [b["step_s"] for b in blocks if b["with_callback"]]
    without = [b["step_s"] for b in blocks if not b["with_callback"]]
    inside = [b["inside_per_step_s"] for b in blocks if b["with_callback"]]
    updates = [b["mask_updates_per_step_s"] for b in blocks if b["with_callback"]]
    base = statistics.fmean(without)
    summary = {
        "ab_overhead_pct": 100 * (statistics.fmean(with_cb) / base - 1),
        "direct_overhead_pct": 100 * statistics.fmean(inside) / base,
        "step_s_without": base,
        "step_s_with": statistics.fmean(with_cb),
        "inside_callback_per_step_s": statistics.fmean(inside),
        "mask_updates_per_step_s": statistics.fmean(updates),
        "masking_passes_per_step_s": statistics.fmean(inside) - statistics.fmean(updates),
        "final_sparsity": blocks[0]["sparsity"],
        "target_pct": 3.0,
    }
    machine = {
        "description": machine_description("cpu"),
        "processor": device_label("cpu"),
        "torch": torch.__version__,
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }
    record = {"config": vars(args) | {"out": str(args.out)}, "machine": machine}
    record |= {"summary": summary, "blocks": blocks}
    stem = args.out / f"callback_overhead-cpu-{dt.date.today().isoformat()}"
    md = [
        "# BalancedPruningCallback overhead per training step",
        "",
        f"Machine: {machine['description']}, torch {machine['torch']}, "
        f"{args.threads} thread(s); load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (the machine is shared).",
        f"Model: 2-layer LSTM LM, vocab {args.vocab}, hidden {args.hidden}, bptt {args.bptt}, "
        f"batch {args.batch}, SGD. Callback: sparsity 0.9, bank 32, cubic, frequency "
        f"{args.frequency}, all default-prunable weights (LSTM + decoder).",
        f"{len(blocks)} blocks (A B B A) of {args.steps} steps; timed steps 1..{args.steps - 1}.",
        "The A/B figure compares whole blocks and moves with the load of the shared machine;",
        "the direct figure times the callback's own work inside the same steps.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| step time without callback | {base * 1e3:.1f} ms |",
        f"| step time with callback | {summary['step_s_with'] * 1e3:.1f} ms |",
        f"| time inside the callback per step | {summary['inside_callback_per_step_s'] * 1e3:.2f} ms |",
        f"| of which mask updates (every {args.frequency} steps, amortised) | "
        f"{summary['mask_updates_per_step_s'] * 1e3:.2f} ms |",
        f"| of which gradient + post-step masking passes | "
        f"{summary['masking_passes_per_step_s'] * 1e3:.2f} ms |",
        f"| overhead, A/B | {summary['ab_overhead_pct']:.2f} % |",
        f"| overhead, direct | {summary['direct_overhead_pct']:.2f} % |",
        f"| target | <= {summary['target_pct']:.0f} % |",
    ]
    write_result(stem, record, "\n".join(md) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
