"""Collect the SST-2 runs of scripts/minilm_sst2.sh into docs/results/minilm_sst2.{md,json}.

    python scripts/minilm_sst2_table.py outputs/minilm_sst2_results [--machine TEXT]

Reads `<run>/metrics.json` and `<run>/.hydra/config.yaml` of every run folder and, when
given, `export.json` files of scripts/minilm_sst2_export.py (`--export FILE ...`) and
`bs-convert-hf --json` summaries (`--convert NAME=FILE ...`).
"""

import argparse
import json
import math
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _load_runs(root: Path) -> list[dict]:
    runs = []
    for metrics_file in sorted(root.glob("*/metrics.json")):
        folder = metrics_file.parent
        metrics = json.loads(metrics_file.read_text())
        config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
        runs.append({"name": folder.name, "metrics": metrics, "config": config})
    if not runs:
        raise SystemExit(f"no */metrics.json under {root}")
    return runs


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _row(run: dict) -> dict:
    m = run["metrics"]
    lat = m["latency"]
    dense_run = float(m["sparsity"]) == 0.0
    return {
        "run": run["name"],
        "pattern": "dense" if dense_run else m["pattern"],
        "target_sparsity": float(m["sparsity"]),
        "effective_sparsity": m["effective_sparsity"],
        "test_acc": m["pruned"],
        "converted_test_acc": m["converted"],
        "latency_input_shape": lat["input_shape"],
        "dense_ms": lat["dense_ms"],
        "converted_ms": lat["converted_ms"],
        "speedup": lat["speedup"],
        "fit_time_s": m["fit_time_s"],
        "wall_time_s": m["wall_time_s"],
    }


def _setup(config: dict, machine: str) -> dict:
    data, model, pruning, trainer = (config[k] for k in ("data", "model", "pruning", "trainer"))
    return {
        "machine": machine,
        "torch_threads": config.get("threads"),
        "model": model["pretrained"],
        "lr": model["lr"],
        "weight_decay": model["weight_decay"],
        "optimizer": model["optimizer"],
        "train_sentences": data["max_train_samples"],
        "val_sentences": data["max_val_samples"],
        "test_sentences": 872,
        "max_length": data["max_length"],
        "batch_size": data["batch_size"],
        "epochs": trainer["max_epochs"],
        "bank_size": pruning["bank_size"],
        "pruned_layers": pruning["include"],
        "schedule": pruning["schedule"],
        "start_step": pruning["start_step"],
        "end_step": pruning["end_step"],
        "frequency": pruning["frequency"],
        "seed": config["seed"],
    }


def _findings(rows: list[dict]) -> list[str]:
    by = {(r["pattern"], r["target_sparsity"]): r for r in rows}
    dense = by.get(("dense", 0.0))
    lines = []
    for s in sorted({r["target_sparsity"] for r in rows if r["pattern"] != "dense"}):
        b, u = by.get(("balanced", s)), by.get(("unstructured", s))
        if b and u:
            gap = 100 * (b["test_acc"] - u["test_acc"])
            parts = [
                f"At {s:.0%}: balanced {_pct(b['test_acc'])}% vs unstructured "
                f"{_pct(u['test_acc'])}% ({gap:+.2f} points)"
            ]
            if dense:
                parts.append(f"dense {_pct(dense['test_acc'])}%")
            if b["speedup"]:
                parts.append(
                    f"the converted balanced model runs {b['speedup']:.2f}x as fast as dense "
                    "(batch 1)"
                )
            lines.append("; ".join(parts) + ".")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="folder holding one subfolder per run")
    p.add_argument("--machine", default="2-core CPU shared with other jobs, no GPU")
    p.add_argument("--convert", nargs="*", default=[], help="NAME=bs-convert-hf --json file")
    p.add_argument("--export", nargs="*", default=[], help="export.json of minilm_sst2_export")
    p.add_argument("--out", type=Path, default=DOCS / "minilm_sst2")
    p.add_argument("--note", action="append", default=[], help="extra setup line (repeatable)")
    args = p.parse_args()

    runs = _load_runs(args.root)
    order = {"dense": 0, "balanced": 1, "unstructured": 2}
    rows = sorted(map(_row, runs), key=lambda r: (order.get(r["pattern"], 3), r["target_sparsity"]))
    setup = _setup(runs[0]["config"], args.machine)
    conversions = {}
    for item in args.convert:
        name, _, file = item.partition("=")
        conversions[name] = json.loads(Path(file).read_text())
    exports = [json.loads(Path(f).read_text()) for f in args.export]
    setup["notes"] = args.note
    result = {
        "setup": setup,
        "runs": rows,
        "exports": exports,
        "conversions": conversions,
        "findings": _findings(rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    md = [
        "# all-MiniLM-L6-v2 on SST-2: dense, balanced and unstructured sparsity",
        "",
        f"Machine: {setup['machine']}; torch threads: {setup['torch_threads']}.",
        "",
        "## Setup",
        "",
        f"- Model: `{setup['model']}` (BertForSequenceClassification, new head), "
        f"{setup['optimizer']} lr {setup['lr']}, weight decay {setup['weight_decay']}.",
        f"- Data: {setup['train_sentences']} random SST-2 training sentences (seed "
        f"{setup['seed']}), {setup['epochs']} epoch, batch {setup['batch_size']}, max_length "
        f"{setup['max_length']}; validation on the first {setup['val_sentences']} dev.tsv "
        f"sentences; test: all {setup['test_sentences']} sentences of test.tsv.",
        f"- Pruning: `BalancedPruningCallback` on `{setup['pruned_layers']}` (the 36 Linear "
        f"layers of the 6 encoder blocks; embeddings, pooler and head dense), "
        f"{setup['schedule']} schedule from step {setup['start_step']} to "
        f"{setup['end_step']}, masks every {setup['frequency']} steps, bank size "
        f"{setup['bank_size']} (balanced); unstructured = per-layer magnitude pruning.",
        "- Latency: `bs_lightning.evaluate` (median forward pass, batch 1, the longest "
        "test sentence, dense and converted timed in turns in one process).",
        *[f"- {note}" for note in args.note],
        "",
        "## Results",
        "",
        "| run | pattern | target | effective sparsity | test acc (%) | converted acc (%) "
        "| dense ms | converted ms | speedup | fit s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        conv = "-" if r["converted_ms"] is None else f"{r['converted_ms']:.1f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        md.append(
            f"| {r['run']} | {r['pattern']} | {r['target_sparsity']:.2f} | "
            f"{r['effective_sparsity']:.4f} | {_pct(r['test_acc'])} | "
            f"{_pct(r['converted_test_acc'])} | {r['dense_ms']:.1f} | {conv} | {speed} | "
            f"{r['fit_time_s']:.0f} | {r['wall_time_s']:.0f} |"
        )
    md += ["", "## Findings", ""] + [f"- {line}" for line in result["findings"]]
    n_test = setup["test_sentences"]
    accs = [r["test_acc"] for r in rows]
    se = [100 * math.sqrt(a * (1 - a) / n_test) for a in (min(accs), max(accs))]
    md += [
        "",
        "## Caveats",
        "",
        f"- One seed per cell. On {n_test} test sentences one sentence is "
        f"{100 / n_test:.2f} points and the binomial standard error of an accuracy is "
        f"{min(se):.1f}-{max(se):.1f} points here, so gaps of about a point are within noise.",
        f"- The budget is tiny ({setup['train_sentences']} sentences, {setup['epochs']} epoch): "
        "all accuracies sit well below what MiniLM reaches on the full SST-2; the table "
        "compares patterns at an equal, small budget.",
        "- Latencies were measured on a CPU shared with other jobs: absolute milliseconds "
        "move between runs; the ratio (dense and converted timed in turns in one process) "
        "is the meaningful number. Unstructured runs have no sparse kernel here, so only "
        "their dense latency is listed.",
    ]
    if exports:
        md += [
            "",
            "## Saved compact models (save_sparse / load_sparse)",
            "",
            "The fine-tuned classifier of a run, converted with "
            "`prune_and_convert(net, None)` (k read from the zeros), saved with `save_sparse` "
            "and reloaded with `load_sparse` (scripts/minilm_sst2_export.py):",
            "",
            "| run | sparse layers | bank | k | dense folder MB | compact folder MB | ratio "
            "| max logit diff | same predictions |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in exports:
            md.append(
                f"| {e['run']} | {e['sparse_layers']} | {e['bank_size']} | {e['k']} | "
                f"{e['dense_folder_bytes'] / 2**20:.1f} | {e['sparse_folder_bytes'] / 2**20:.1f} | "
                f"{e['sparse_folder_bytes'] / e['dense_folder_bytes']:.3f} | "
                f"{e['max_abs_logit_diff']:.2g} | {e['same_predictions']} "
                f"({e['compared_sentences']} test sentences) |"
            )
    for name, c in conversions.items():
        lat = c["latency"]
        md += [
            "",
            f"## bs-convert-hf: {name}",
            "",
            "One-shot pruning of the pretrained encoder, no fine-tuning (size and speed only): "
            f"{c['model_class']} at {c['sparsity']:.0%} (bank {c['bank_size']}): weights "
            f"{c['weights_bytes_dense'] / 2**20:.1f} MB -> {c['weights_bytes_sparse'] / 2**20:.1f} "
            f"MB, saved folder {c['saved_folder_bytes'] / 2**20:.1f} MB; max output difference "
            f"to the pruned dense model {c['max_abs_output_diff']:.2g}; latency on "
            f"{lat['device']} for input {lat['input_shape']}: dense {lat['dense_ms']:.2f} ms, "
            f"sparse {lat['sparse_ms']:.2f} ms ({lat['speedup']:.2f}x).",
        ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
