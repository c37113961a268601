"""`bs-bench model`: a whole model, dense vs converted, end to end, over batch x sequence length.

    bs-bench model all-MiniLM-L6-v2 --sparsities 0.5 0.9 --seq-lens 128 --repeats 10
    bs-bench model MODEL_DIR [--sparsities 0.5 0.75 0.9] [--bank-size 32] [--compile]
    bs-bench model RUN_DIR | RUN_DIR/checkpoints/last.ckpt

Sources:
- a Hugging Face model (local folder, the bundled `all-MiniLM-L6-v2`, or a hub id when online):
  for each `--sparsity`, a copy is pruned one-shot and converted (`hf.prune_and_convert`,
  balanced, `--bank-size`); the dense baseline is the pruned model on dense kernels
  (`convert.densify`: the same outputs, the dense model's speed). A folder written by
  `hf.save_sparse` is loaded compact (`hf.load_sparse`), its sparsity read from its plan, and
  its dense baseline is `convert.densify` of it.
- a `bs-train` run folder (or a checkpoint inside one): the model class from the run's
  `.hydra/config.yaml`, the weights and the sparsity plan from `checkpoints/last.ckpt`
  (`SparsityPlan.from_checkpoint`), converted with that plan; the dense baseline is the
  pruned model on dense kernels. Language models take random token ids of `vocab_size`;
  classifiers (a `input_shape` hparam: the CNN, the MLP) random `[batch, *input_shape]`
  inputs, one row per batch (`--seq-lens` does not apply: `seq` is `-`).

For each case (sparsity x batch x sequence length, eager and with `--compile` also
`torch.compile`d), dense and converted run on the same random token ids and are timed in
turns (`bench.timing.measure_latency`, median ms). `--cache warm` (default) runs one untimed
pass of the same model before each timed one: the steady state of a model serving requests
back to back, where a converted model small enough for the last-level cache keeps its
weights there; `--cache cold` times each pass right after the other model's, which has
evicted them. Each row is written to `results.json` and
`results.md` in `--out-dir` as soon as it is measured, with a progress line and an ETA;
`speedup_vs_sparsity.png` is drawn at the end. The default `--out-dir` lies outside the
repository (`~/bs-lightning-results/model-<name>-<date>`).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from bs_lightning.bench.results import cpu_record, write_result
from bs_lightning.bench.timing import CACHE_STATES, measure_latency
from bs_lightning.convert import conversion_report, convert_to_sparse, densify
from bs_lightning.hf.loading import main_output
from bs_lightning.sparsity import SparsityPlan

PLOT_FILE = "speedup_vs_sparsity.png"
DEFAULT_SPARSITIES = (0.5, 0.75, 0.9)
_CACHE_TEXT = {
    "warm": "an untimed pass of the same model before each timed one",
    "cold": "each timed pass right after the other model's",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bs-bench model", description=__doc__.splitlines()[0])
    p.add_argument("source", help="HF model folder / name / hub id, bs-train run folder or .ckpt")
    p.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=None,
        help="one-shot targets for a dense HF model (default 0.5 0.75 0.9); ignored for "
        "sources that carry their own sparsity",
    )
    p.add_argument("--bank-size", type=int, default=32, help="bank size of one-shot pruning")
    p.add_argument("--batches", type=int, nargs="+", default=[1], help="rows per input")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16, 128], help="tokens per row")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=5, help="untimed passes per model and case")
    p.add_argument("--repeats", type=int, default=30, help="timed passes per model and case")
    p.add_argument(
        "--cache",
        choices=CACHE_STATES,
        default="warm",
        help="warm: an untimed pass of the same model before each timed one; cold: each timed "
        "pass right after the other model's",
    )
    p.add_argument("--model-class", default=None, help="transformers class of an HF model")
    p.add_argument("--out-dir", type=Path, default=None, help="where the results go")
    return p.parse_args(argv)


def _hf_pairs(args) -> Iterator[tuple[float, nn.Module, nn.Module, SparsityPlan | None]]:
    """`(sparsity, dense, converted, plan)` for an HF source, one per sparsity."""
    from bs_lightning.hf import load_sparse, prune_and_convert
    from bs_lightning.hf.io import MARKER_FILE
    from bs_lightning.hf.loading import load_pretrained

    folder = Path(args.source)
    if (folder / MARKER_FILE).is_file():
        converted = load_sparse(folder)
        plan = SparsityPlan.recorded(converted)
        sparsity = max(e.sparsity for e in plan)
        yield sparsity, densify(converted).eval(), converted, plan
        return
    try:
        dense, _ = load_pretrained(args.source, args.model_class)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SystemExit(f"bs-bench model: cannot load {args.source} as a model: {first}") from err
    for sparsity in args.sparsities or DEFAULT_SPARSITIES:
        converted = prune_and_convert(copy.deepcopy(dense), sparsity, args.bank_size).eval()
        # the baseline holds the same (pruned) weights on dense kernels: equal outputs
        yield sparsity, densify(converted).eval(), converted, SparsityPlan.recorded(converted)


def _checkpoint_of(source: Path) -> Path | None:
    if source.is_file() and source.suffix == ".ckpt":
        return source
    candidate = source / "checkpoints" / "last.ckpt"
    return candidate if candidate.is_file() else None


def _run_pairs(ckpt: Path) -> Iterator[tuple[float, nn.Module, nn.Module, SparsityPlan]]:
    """`(sparsity, dense, converted, plan)` for a bs-train checkpoint."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    run = ckpt.parent.parent
    config = run / ".hydra" / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"bs-bench model: {config} not found: {ckpt} is not in a bs-train run")
    cls = get_class(OmegaConf.load(config).model._target_)
    dense = cls.load_from_checkpoint(ckpt, map_location="cpu").eval()
    if "vocab_size" not in dense.hparams and "input_shape" not in dense.hparams:
        raise SystemExit(
            f"bs-bench model: {cls.__name__} has neither a vocab_size nor an input_shape "
            "hparam: no input to benchmark it on"
        )
    plan = SparsityPlan.from_checkpoint(ckpt)
    converted = convert_to_sparse(densify(dense), plan=plan).eval()
    yield max(e.sparsity for e in plan), dense, converted, plan


def _pairs(args) -> tuple[int, Iterator]:
    """How many `(sparsity, dense, converted, plan)` the source gives, and an iterator of them.

    Raises:
        SystemExit: with one line, when the source is no model.
    """
    from bs_lightning.hf.io import MARKER_FILE

    source = Path(args.source)
    ckpt = _checkpoint_of(source)
    if ckpt is not None:
        return 1, _run_pairs(ckpt)
    if source.exists() and not (source / "config.json").is_file():
        raise SystemExit(
            f"bs-bench model: {args.source} is not a Hugging Face model folder, a bs-train run "
            "folder or a checkpoint"
        )
    own_sparsity = (source / MARKER_FILE).is_file()
    return (1 if own_sparsity else len(args.sparsities or DEFAULT_SPARSITIES)), _hf_pairs(args)


def _inputs(model: nn.Module, batch: int, seq: int | None) -> torch.Tensor:
    """Random input of one case: token ids `[batch, seq]` of a language model (HF config or
    `vocab_size` hparam), else `[batch, *input_shape]` values of a classifier."""
    generator = torch.Generator().manual_seed(0)
    if seq is None:
        return torch.randn(batch, *model.hparams.input_shape, generator=generator)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        vocab = config.vocab_size
    else:
        vocab = model.hparams.vocab_size
    return torch.randint(vocab, (batch, seq), generator=generator)


def _seq_lens(model: nn.Module, args) -> list[int | None]:
    """The sequence lengths to run: `--seq-lens`, or `[None]` for a classifier's images."""
    hparams = getattr(model, "hparams", {})
    if getattr(model, "config", None) is None and "input_shape" in hparams:
        return [None]
    return list(args.seq_lens)


def _markdown(record: dict) -> str:
    lines = [
        f"# bs-bench model: {record['source']} ({record['date']})",
        "",
        f"{record['machine']}, torch {record['torch']}, {record['threads']} threads, load "
        f"average at start {record['load_average']}; median of {record['repeats']} forward "
        f"passes, dense and converted timed in turns in one process, caches {record['cache']} "
        f"({_CACHE_TEXT[record['cache']]}).",
        "",
        "| mode | sparsity | batch | seq | layers converted | dense ms | converted ms | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        seq = "-" if r["seq_len"] is None else r["seq_len"]
        if "error" in r:
            lines.append(
                f"| {r['mode']} | {r['sparsity']:.2f} | {r['batch']} | {seq} | "
                f"{r['layers_converted']} | failed: {r['error']} | | |"
            )
            continue
        lines.append(
            f"| {r['mode']} | {r['sparsity']:.2f} | {r['batch']} | {seq} | "
            f"{r['layers_converted']} | {r['dense_ms']:.3f} | {r['converted_ms']:.3f} | "
            f"{r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _plot(record: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    series: dict[tuple, list[tuple[float, float]]] = {}
    for r in record["rows"]:
        if "speedup" in r:
            series.setdefault((r["mode"], r["batch"], r["seq_len"]), []).append(
                (r["sparsity"], r["speedup"])
            )
    for (mode, batch, seq), points in sorted(series.items(), key=lambda kv: str(kv[0])):
        points.sort()
        style = "o-" if mode == "eager" else "s--"
        label = f"{mode}, batch {batch}" + ("" if seq is None else f" x seq {seq}")
        ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speedup over dense (measured)")
    ax.set_title(record["source"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _measure(dense, converted, x, args) -> dict:
    ms = measure_latency(
        {"dense": dense, "converted": converted},
        x,
        torch.device("cpu"),
        args.warmup,
        args.repeats,
        cache=args.cache,
    )
    return {
        "dense_ms": ms["dense"],
        "converted_ms": ms["converted"],
        "speedup": ms["dense"] / ms["converted"],
    }


def main(argv=None) -> int:
    """Runs the benchmark (see the module docstring); returns the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = Path(args.source).name or str(args.source)
    record = cpu_record("bs-bench model", str(args.source))
    out = args.out_dir or Path.home() / "bs-lightning-results" / f"model-{name}-{record['date']}"
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    record |= {
        "repeats": args.repeats,
        "cache": args.cache,
        "bank_size": args.bank_size,
        "rows": [],
    }
    n_pairs, pairs = _pairs(args)
    started, done, total = time.perf_counter(), 0, None
    for sparsity, dense, converted, plan in pairs:
        done_layers, left = conversion_report(converted, plan) if plan else ([], [])
        layers = f"{len(done_layers)} of {len(done_layers) + len(left)}"
        seq_lens = _seq_lens(dense, args)
        if total is None:  # every pair of one source takes the same inputs
            total = n_pairs * len(modes) * len(args.batches) * len(seq_lens)
        for mode in modes:
            models = (dense, converted)
            if mode == "compiled":
                models = tuple(torch.compile(m) for m in models)
            for batch in args.batches:
                for seq in seq_lens:
                    x = _inputs(dense, batch, seq)
                    row = {
                        "mode": mode,
                        "sparsity": sparsity,
                        "batch": batch,
                        "seq_len": seq,
                        "layers_converted": layers,
                    }
                    try:
                        with torch.inference_mode():
                            diff = (
                                main_output(models[1](x)).float()
                                - main_output(models[0](x)).float()
                            )
                        row["max_abs_diff"] = diff.abs().max().item()
                        row.update(_measure(*models, x, args))
                    except Exception as exc:  # a failed compile is a result, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    record["rows"].append(row)
                    write_result(out / "results", record, _markdown(record))
                    done += 1
                    eta = (time.perf_counter() - started) / done * max(0, total - done)
                    result = (
                        f"{row['speedup']:.2f}x ({row['dense_ms']:.2f} -> "
                        f"{row['converted_ms']:.2f} ms)"
                        if "speedup" in row
                        else row["error"]
                    )
                    shape = f"batch {batch}" + ("" if seq is None else f" seq {seq}")
                    print(
                        f"[{done}/{total}] {mode} sparsity {sparsity:.2f} {shape}:"
                        f" {result}; ETA {eta:.0f} s",
                        flush=True,
                    )
    _plot(record, out / PLOT_FILE)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
