"""`bs-bench finetune`: step time and memory of fine-tuning a converted model against the dense one.

    bs-bench finetune all-MiniLM-L6-v2 --sparsity 0.9 --batch 8 --seq-len 128 --steps 20

A Hugging Face model (local folder, the bundled `all-MiniLM-L6-v2` or a hub id) is loaded
dense and, for the sparse side, pruned one-shot and converted (`hf.prune_and_convert`,
balanced, `--bank-size`). Both get the same trainable classification head on the mean of
the main output and train with AdamW on the same random token ids and labels: one step is
forward, backward and `optimizer.step()`.

- Step time: both models in one process, steps timed in turns (dense, sparse, dense, ...,
  `bench.timing.interleaved_medians`), median milliseconds.
- Memory: each side runs `--memory-steps` steps again in a fresh child process, which
  reports its resident set once the model is built, the peak resident set while it trains
  (Linux `VmHWM`, reset after the build through `/proc/self/clear_refs`, so loading and
  converting do not count; glibc's mmap threshold is fixed so that freed tensors leave the
  resident set) and the bytes of its training state (parameters, buffers,
  gradients and AdamW's two moments), counted from the tensors.

Writes `finetune.json` and `finetune.md` to `--out-dir` (default outside the repository,
`~/bs-lightning-results/finetune-<name>-<date>`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from bs_lightning.bench.results import cpu_record, write_result
from bs_lightning.bench.timing import interleaved_medians
from bs_lightning.hf.loading import main_output

CLASSES = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bs-bench finetune", description=__doc__.splitlines()[0])
    p.add_argument("source", help="HF model folder / name / hub id")
    p.add_argument("--sparsity", type=float, default=0.9, help="one-shot balanced target")
    p.add_argument("--bank-size", type=int, default=32, help="bank size of one-shot pruning")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--memory-steps", type=int, default=5, help="steps of each memory child")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--model-class", default=None, help="transformers class of the model")
    p.add_argument("--out-dir", type=Path, default=None, help="where the results go")
    p.add_argument("--child", choices=["dense", "sparse"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


class _Classifier(nn.Module):
    """`model` -> mean over tokens of its main output -> linear head `[batch, CLASSES]`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.config.hidden_size, CLASSES)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(main_output(self.model(input_ids=input_ids)).mean(1))


def _build(args, side: str) -> nn.Module:
    """The dense or the converted classifier, in train mode."""
    from bs_lightning.hf import prune_and_convert
    from bs_lightning.hf.loading import load_pretrained

    try:
        model, _ = load_pretrained(args.source, args.model_class)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SystemExit(
            f"bs-bench finetune: cannot load {args.source} as a model: {first}"
        ) from err
    if side == "sparse":
        model = prune_and_convert(model, args.sparsity, args.bank_size)
    torch.manual_seed(0)
    return _Classifier(model).train()


def _stepper(model: nn.Module, args):
    """A zero-argument training step of `model` on fixed random data, and its optimizer."""
    g = torch.Generator().manual_seed(0)
    vocab = model.model.config.vocab_size
    x = torch.randint(vocab, (args.batch, args.seq_len), generator=g)
    y = torch.randint(CLASSES, (args.batch,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step, opt


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters, buffers, gradients and optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _status_mib(field: str) -> float:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"bs-bench finetune: no {field} in /proc/self/status (Linux only)")


def _child(args) -> int:
    """Memory child: `--memory-steps` steps of one side; prints a JSON line."""
    model = _build(args, args.child)
    gc.collect()
    step, opt = _stepper(model, args)
    built = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak resident set := current
    losses = [step() for _ in range(args.memory_steps)]
    print(
        json.dumps(
            {
                "built_rss_mib": built,
                "peak_rss_mib": _status_mib("VmHWM"),
                "state_mib": _state_bytes(model, opt) / 2**20,
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
        )
    )
    return 0


def _memory(args, side: str) -> dict:
    argv = [sys.executable, "-m", "bs_lightning.bench", "finetune", args.source, "--child", side]
    for flag in ("sparsity", "bank_size", "batch", "seq_len", "memory_steps", "threads"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    if args.model_class:
        argv += ["--model-class", args.model_class]
    # a fixed mmap threshold turns off glibc's dynamic one, so freed tensors (the dense
    # weights a conversion replaced) leave the resident set instead of staying in the heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"bs-bench finetune: the {side} memory run failed: {' '.join(tail)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _markdown(r: dict) -> str:
    d, s = r["dense"], r["sparse"]
    lines = [
        f"# bs-bench finetune: {Path(r['source']).name} ({r['date']})",
        "",
        f"{r['machine']}, torch {r['torch']}, {r['threads']} threads, load average at start "
        f"{r['load_average']}. Balanced {r['sparsity']:.0%}, bank {r['bank_size']}, batch "
        f"{r['batch']} x {r['seq_len']} tokens, AdamW; step = forward + backward + step, "
        f"median of {r['steps']} steps timed in turns in one process; memory from one child "
        f"process per side ({r['memory_steps']} steps).",
        "",
        "| model | step ms | RSS built MiB | peak RSS training MiB | training state MiB "
        "| trainable parameters |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in (("dense", d), ("converted", s)):
        lines.append(
            f"| {name} | {m['step_ms']:.1f} | {m['built_rss_mib']:.0f} | "
            f"{m['peak_rss_mib']:.0f} | {m['state_mib']:.1f} | {m['trainable_params']:,} |"
        )
    lines += [
        "",
        f"Converted vs dense: step time {d['step_ms'] / s['step_ms']:.2f}x faster, peak RSS "
        f"{s['peak_rss_mib'] / d['peak_rss_mib']:.2f}x, training state "
        f"{s['state_mib'] / d['state_mib']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the benchmark (see the module docstring); returns the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)
    name = Path(args.source).name or str(args.source)
    record = cpu_record("bs-bench finetune", str(args.source))
    out = args.out_dir or Path.home() / "bs-lightning-results" / f"finetune-{name}-{record['date']}"
    fields = ("sparsity", "bank_size", "batch", "seq_len", "steps", "memory_steps")
    record.update({k: getattr(args, k) for k in fields})
    models = {side: _build(args, side) for side in ("dense", "sparse")}
    steps = {side: _stepper(model, args)[0] for side, model in models.items()}
    print(f"timing {args.steps} steps of each model in turns", flush=True)
    seconds = interleaved_medians(
        steps, reps=args.steps, warmup=args.warmup, budget_s=float("inf"), rotate=False
    )
    del models, steps
    gc.collect()
    for side in ("dense", "sparse"):
        print(f"memory run: {side}", flush=True)
        record[side] = {"step_ms": seconds[side] * 1e3, **_memory(args, side)}
    json_path, _ = write_result(out / "finetune", record, _markdown(record))
    print(_markdown(record))
    print(f"results in {json_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
