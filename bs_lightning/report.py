"""Reports: one run's `report.md`/`metrics.json`/`accuracy_vs_speedup.png`, and `bs-report DIR`,
which aggregates every run under DIR (e.g. a Hydra multirun over patterns x sparsities) into one
paper-style table (metric per pattern per sparsity, measured speedup) and one plot.

Figures are drawn on `matplotlib.figure.Figure` objects and saved straight to files: no
pyplot, no global backend (importing or using this module leaves `matplotlib.get_backend()`
and any open pyplot figures alone).
"""

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from bs_lightning.sparsity.patterns import Pattern, make_pattern, pattern_from_dict
from bs_lightning.validation import is_dense_target

METRICS_FILE = "metrics.json"
# keys of a run's metrics.json the aggregation reads
_RUN_KEYS = ("pattern", "sparsity", "metric_name", "pruned", "latency")
PLOT_FILE = "accuracy_vs_speedup.png"


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pattern(run: dict) -> Pattern:
    """The run's pattern object (`pattern_options` in newer metrics, else name and sizes)."""
    if run.get("pattern_options"):
        return pattern_from_dict(run["pattern_options"])
    sizes = {k: run[k] for k in ("bank_size", "block_size") if run.get(k) is not None}
    return make_pattern(run["pattern"], **sizes)


def write_run_report(run_dir: str | Path, metrics: dict) -> None:
    """Write `metrics.json`, `report.md` and `accuracy_vs_speedup.png` of one run.

    Args:
        run_dir: the run's folder (created if missing).
        metrics: what `bs_lightning.train.train` collected: the keys of
            `bs_lightning.evaluate.evaluate_run` plus `run_name`, `model`, `data`, `pattern`,
            `sparsity`, `bank_size`, `block_size`, `fit_time_s`, `wall_time_s`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    name, lat = metrics["metric_name"], metrics["latency"]
    lines = [
        f"# {metrics['run_name']}: {metrics['model']} on {metrics['data']}",
        "",
        f"Pattern {_pattern(metrics).describe()}, target sparsity {metrics['sparsity']}"
        + f", effective sparsity of the pruned weights {metrics['effective_sparsity']:.4f}.",
        "",
        f"| model | {name} | latency (ms) | speedup |",
        "|---|---|---|---|",
        f"| dense baseline | {_fmt(metrics['dense'], 4)} | | |",
        f"| {'trained' if _is_dense(metrics) else 'pruned'}, dense kernels | "
        f"{_fmt(metrics['pruned'], 4)} | {_fmt(lat['dense_ms'], 3)} | 1.00 |",
        f"| converted, sparse kernels | {_fmt(metrics['converted'], 4)} | "
        f"{_fmt(lat['converted_ms'], 3)} | {_fmt(lat['speedup'])} |",
        "",
        f"Latency: median forward pass on {lat['device']}, input shape {lat['input_shape']}, "
        "dense and converted timed in turns in one process.",
        f"Conversion: {metrics['conversion']}.",
        f"Wall time: {metrics['wall_time_s']:.1f} s (fit {metrics['fit_time_s']:.1f} s).",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines))

    fig = Figure(figsize=(5, 4))  # not pyplot's: savefig picks the PNG canvas itself
    ax = fig.subplots()
    if metrics["dense"] is not None:
        ax.axhline(metrics["dense"], color="grey", linestyle="--", label="dense baseline")
    ax.scatter([1.0], [metrics["pruned"]], label="pruned, dense kernels")
    if metrics["converted"] is not None:
        ax.scatter([lat["speedup"]], [metrics["converted"]], marker="*", s=150, label="converted")
    ax.set_xlabel(f"speedup over dense ({lat['device']})")
    ax.set_ylabel(name)
    ax.set_title(f"{metrics['run_name']}: {_pattern(metrics).label} {metrics['sparsity']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / PLOT_FILE, dpi=120)


def load_runs(root: str | Path) -> list[dict]:
    """Every run's `metrics.json` under `root` (recursively), each with `dir` (relative path).

    Raises:
        FileNotFoundError: if `root` is not a folder or holds no metrics.json.
        ValueError: naming the file, when a metrics.json is not valid JSON or misses keys.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"bs-report: {root} is not a folder")
    runs = []
    for path in sorted(root.rglob(METRICS_FILE)):
        try:
            run = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"bs-report: {path} is not valid JSON: {err}") from err
        missing = [k for k in _RUN_KEYS if not isinstance(run, dict) or k not in run]
        if missing:
            raise ValueError(f"bs-report: {path} misses {missing}; is it a bs-train metrics.json?")
        run["dir"] = str(path.parent.relative_to(root))
        runs.append(run)
    if not runs:
        raise FileNotFoundError(
            f"bs-report: no {METRICS_FILE} under {root}; point it at a folder of bs-train runs "
            "(e.g. multirun/NAME/DATE)"
        )
    return runs


def _is_dense(run: dict) -> bool:
    """Whether a run trained dense (`bs_lightning.validation.is_dense_target` of its sparsity)."""
    return is_dense_target(run["sparsity"])


def _natural(label: str) -> list:
    """Sort key that orders numbers inside labels by value ("banks of 25" before "of 100")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]


def _column_labels(patterns: list[Pattern]) -> list[str]:
    """Each pattern's table column: its short `label`, or its `describe()` text where runs
    of one label differ in shape (balanced banks of 25 and of 100 are two columns, not one
    averaged cell)."""
    shapes = defaultdict(set)
    for p in patterns:
        shapes[p.label].add(p)
    return [p.describe() if len(shapes[p.label]) > 1 else p.label for p in patterns]


def summarize(runs: list[dict]) -> dict:
    """Aggregate runs into a table: metric per pattern per sparsity, and the speedups of the patterns that convert.

    The dense row comes from dense runs (sparsity 0), else from the pruned runs' dense
    baselines. Several runs of one pattern shape and sparsity (seeds) are averaged (their
    count is kept); runs of one pattern in different shapes get one column per shape.

    Raises:
        ValueError: if the runs report different metrics.
    """
    names = {r["metric_name"] for r in runs}
    if len(names) != 1:
        raise ValueError(f"bs-report: the runs report different metrics {sorted(names)}")
    cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
    converting: set[str] = set()  # labels of patterns that convert to sparse modules
    pruned = [r for r in runs if not isinstance(r["sparsity"], dict) and not _is_dense(r)]
    # per-layer targets have no place in a one-number-per-row table
    patterns = [_pattern(r) for r in pruned]
    for run, pattern, label in zip(pruned, patterns, _column_labels(patterns), strict=True):
        cells[(label, float(run["sparsity"]))].append(run)
        if pattern.converts:
            converting.add(label)
    dense_runs = [r for r in runs if _is_dense(r)]
    dense_values = [r["pruned"] for r in dense_runs] or [
        r["dense"] for r in runs if r["dense"] is not None
    ]
    # the patterns that convert first (their speedup is measured), then the others
    patterns = sorted({p for p, _ in cells}, key=lambda p: (p not in converting, _natural(p)))
    sparsities = sorted({s for _, s in cells})
    table = {}
    for (pattern, s), group in cells.items():
        speedups = [r["latency"]["speedup"] for r in group if r["latency"]["speedup"] is not None]
        table[f"{pattern}@{s}"] = {
            "pattern": pattern,
            "sparsity": s,
            "metric": statistics.mean(r["pruned"] for r in group),
            "converted": statistics.mean(r["converted"] for r in group)
            if all(r["converted"] is not None for r in group)
            else None,
            "speedup": statistics.mean(speedups) if speedups else None,
            "effective_sparsity": statistics.mean(r["effective_sparsity"] for r in group),
            "runs": len(group),
        }
    return {
        "metric_name": names.pop(),
        "higher_is_better": runs[0]["higher_is_better"],
        "dense": statistics.mean(dense_values) if dense_values else None,
        "patterns": patterns,
        "converting": [p for p in patterns if p in converting],
        "sparsities": sparsities,
        "cells": table,
        "runs": [
            {
                k: r.get(k)
                for k in (
                    "dir",
                    "pattern",
                    "sparsity",
                    "effective_sparsity",
                    "dense",
                    "pruned",
                    "converted",
                    "latency",
                    "wall_time_s",
                )
            }
            for r in runs
        ],
    }


def render_markdown(summary: dict, title: str) -> str:
    """The summary as Markdown: the paper-style table, then one line per run."""
    name, patterns = summary["metric_name"], summary["patterns"]
    better = "higher" if summary["higher_is_better"] else "lower"
    lines = [
        f"# {title}",
        "",
        f"Test {name} ({better} is better) per pattern and sparsity; "
        "speedup = measured latency of the dense model / the converted sparse model.",
        "",
    ]
    converting = summary.get("converting", [])
    header = ["sparsity", "dense"] + patterns + [f"{p} speedup" for p in converting]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense_row = " | ".join([_fmt(summary["dense"])] + [""] * len(patterns))
    lines.append("| 0 | " + dense_row + " |" + " |" * len(converting))
    for s in summary["sparsities"]:
        row = [f"{s:g}", ""]
        for p in patterns:
            cell = summary["cells"].get(f"{p}@{s}")
            row.append(_fmt(cell["metric"]) if cell else "")
        for p in converting:
            cell = summary["cells"].get(f"{p}@{s}")
            row.append(f"{cell['speedup']:.2f}x" if cell and cell["speedup"] else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Only the balanced and N:M patterns convert to sparse modules; the other patterns "
        "keep dense kernels (speedup 1).",
        "",
        "## Runs",
        "",
        f"| run | pattern | sparsity | effective | {name} | converted | dense ms | "
        "converted ms | speedup | wall time (s) |",
        "|" + "---|" * 10,
    ]
    for r in summary["runs"]:
        lat = r["latency"]
        lines.append(
            f"| {r['dir']} | {'dense' if _is_dense(r) else r['pattern']} | {r['sparsity']} | {_fmt(r['effective_sparsity'], 3)} "
            f"| {_fmt(r['pruned'])} | {_fmt(r['converted'])} | {_fmt(lat['dense_ms'], 3)} | "
            f"{_fmt(lat['converted_ms'], 3)} | {_fmt(lat['speedup'])} | {_fmt(r['wall_time_s'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: str | Path, title: str) -> None:
    """Two panels: metric vs sparsity per pattern; metric vs measured speedup (patterns that convert)."""
    name = summary["metric_name"]
    fig = Figure(figsize=(10, 4))  # not pyplot's: savefig picks the PNG canvas itself
    left, right = fig.subplots(1, 2)
    for pattern in summary["patterns"]:
        cells = sorted(
            (c for c in summary["cells"].values() if c["pattern"] == pattern),
            key=lambda c: c["sparsity"],
        )
        left.plot([c["sparsity"] for c in cells], [c["metric"] for c in cells], "o-", label=pattern)
        fast = [c for c in cells if c["speedup"]]
        if fast:
            right.plot(
                [c["speedup"] for c in fast],
                [c["converted"] or c["metric"] for c in fast],
                "o-",
                label=pattern,
            )
            for c in fast:
                right.annotate(f"{c['sparsity']:g}", (c["speedup"], c["converted"] or c["metric"]))
    for ax in (left, right):
        if summary["dense"] is not None:
            ax.axhline(summary["dense"], color="grey", linestyle="--", label="dense")
        ax.set_ylabel(name)
        ax.legend()
    right.axvline(1.0, color="grey", linewidth=0.5)
    left.set_xlabel("sparsity")
    right.set_xlabel("measured speedup over dense (labels: sparsity)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_summary(
    root: str | Path, out: str | Path | None = None, title: str | None = None
) -> dict:
    """Aggregate the runs under `root` into `report.md`, `report.json` and
    `accuracy_vs_speedup.png` in `out` (default `root`).

    Returns:
        The summary (see `summarize`).
    """
    root = Path(root)
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(load_runs(root))
    title = title or root.resolve().name
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(summary, title))
    plot_summary(summary, out / PLOT_FILE, title)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`bs-report DIR [--out OUT] [--title TITLE]`."""
    parser = argparse.ArgumentParser(
        prog="bs-report", description="Aggregate bs-train runs into one table and one plot."
    )
    parser.add_argument(
        "dir", help="folder holding the runs (searched recursively for metrics.json)"
    )
    parser.add_argument("--out", help="where to write report.md/.json and the plot (default: DIR)")
    parser.add_argument("--title", help="title of the table and plot (default: DIR's name)")
    args = parser.parse_args(argv)
    try:
        summary = write_summary(args.dir, args.out, args.title)
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    print(render_markdown(summary, args.title or Path(args.dir).resolve().name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
