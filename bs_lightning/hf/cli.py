"""`bs-convert-hf`: prune a Hugging Face model to balanced sparsity, convert, save, compare.

    bs-convert-hf --model PATH --sparsity 0.9 --bank-size 32 --out DIR \\
        [--include GLOB ...] [--exclude GLOB ...] \\
        [--method sparsegpt --calibration FILE [--calibration-samples 128]]

Loads the model from a local folder (or `all-MiniLM-L6-v2`, or a hub id when online), prunes
the selected layers one-shot (`bs_lightning.hf.prune_and_convert`: by magnitude, or by Wanda
or SparseGPT calibrated on the first samples of a text file, one per line, tokenised with the
model's tokenizer), saves the compact model
(`save_sparse`) and prints per-layer sparsity, the size of the weights before and after, the
largest output difference to the pruned dense model and the latency of one forward pass of
dense vs sparse on the local device (median, timed in turns).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bs_lightning.bench.timing import measure_latency
from bs_lightning.convert import densify
from bs_lightning.hf.io import MARKER_FILE, dedupe_state, save_sparse, sparse_layers
from bs_lightning.hf.loading import load_pretrained, main_output
from bs_lightning.hf.prune import prune_and_convert
from bs_lightning.sparsity.oneshot import METHODS

DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bs-convert-hf",
        description="Prune a Hugging Face model to balanced sparsity, convert it to sparse "
        "modules, save it compactly and compare size, outputs and latency with dense.",
    )
    p.add_argument("--model", required=True, help="model folder, all-MiniLM-L6-v2, or a hub id")
    p.add_argument("--sparsity", type=float, required=True, help="target sparsity in [0, 1)")
    p.add_argument("--bank-size", type=int, default=32, help="columns per bank (1..256)")
    p.add_argument("--out", required=True, help="output folder for the compact model")
    p.add_argument("--include", nargs="+", default=None, help="module-name globs to convert")
    p.add_argument("--exclude", nargs="+", default=None, help="module-name globs to keep dense")
    p.add_argument(
        "--method", choices=METHODS, default="magnitude", help="one-shot pruning criterion"
    )
    p.add_argument(
        "--calibration",
        default=None,
        help="text file, one calibration sample per line (needed by wanda and sparsegpt)",
    )
    p.add_argument(
        "--calibration-samples", type=int, default=128, help="first N lines of --calibration"
    )
    p.add_argument(
        "--calibration-batch-size", type=int, default=16, help="samples per calibration batch"
    )
    p.add_argument(
        "--model-class",
        default=None,
        help="transformers class to load (default: the config's architectures[0], else AutoModel)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype")
    p.add_argument("--device", default=None, help="latency device (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=1, help="rows of the latency input")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row of the latency input")
    p.add_argument("--warmup", type=int, default=5, help="untimed forward passes per model")
    p.add_argument("--repeats", type=int, default=30, help="timed forward passes per model")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    return p


def _bytes(model: nn.Module) -> int:
    state, _ = dedupe_state(model.state_dict())
    return sum(t.numel() * t.element_size() for t in state.values())


def _layer_rows(model: nn.Module) -> list[dict]:
    rows = []
    for name, m in sparse_layers(model).items():
        dense_bytes = m.in_features * m.out_features * m.values.element_size()
        compact = m.values.numel() * m.values.element_size() + m.indices.numel()
        rows.append(
            {
                "layer": name,
                "type": type(m).__name__,
                "shape": [m.out_features, m.in_features],
                "bank_size": m.bank_size,
                "k": m.k,
                "sparsity": 1.0 - int((m.values != 0).sum()) / (m.in_features * m.out_features),
                "dense_bytes": dense_bytes,
                "compact_bytes": compact,
            }
        )
    return rows


def _samples(calibration: list[dict]) -> int:
    return sum(len(batch["input_ids"]) for batch in calibration)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _check_paths(args: argparse.Namespace) -> None:
    """One-line errors for paths that cannot work, before anything is loaded."""
    model = Path(args.model)
    if (model / MARKER_FILE).is_file():
        raise SystemExit(
            f"bs-convert-hf: --model {args.model} is already a sparse folder (written by "
            f"save_sparse); load it with bs_lightning.hf.load_sparse"
        )
    looks_local = args.model.startswith((".", "/", "~")) or model.exists()
    if looks_local and not model.is_dir():
        raise SystemExit(f"bs-convert-hf: --model {args.model} is not a model folder")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"bs-convert-hf: --out {args.out} is an existing file, not a folder")
    if args.method != "magnitude" and args.calibration is None:
        raise SystemExit(
            f"bs-convert-hf: --method {args.method} needs --calibration FILE (one sample per line)"
        )
    if args.calibration is not None and not Path(args.calibration).is_file():
        raise SystemExit(f"bs-convert-hf: --calibration {args.calibration} is not a file")
    for flag in ("calibration_samples", "calibration_batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(
                f"bs-convert-hf: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}"
            )


def _calibration(args: argparse.Namespace, path: str) -> list[dict] | None:
    """The first `--calibration-samples` non-empty lines of `--calibration`, tokenised with
    the model's tokenizer in batches; None for magnitude pruning."""
    if args.method == "magnitude":
        return None
    lines = Path(args.calibration).read_text(encoding="utf-8").splitlines()
    samples = [line.strip() for line in lines if line.strip()][: args.calibration_samples]
    if not samples:
        raise SystemExit(f"bs-convert-hf: --calibration {args.calibration} has no text lines")
    import transformers  # the model's own tokenizer, from its folder

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"bs-convert-hf: --method {args.method} tokenises --calibration with the model's "
            f"tokenizer, and {path} has none that loads: {str(err).splitlines()[0]}"
        ) from err
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers: pad with end-of-text
        tokenizer.pad_token = tokenizer.eos_token
    size = args.calibration_batch_size
    return [
        dict(tokenizer(samples[i : i + size], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(samples), size)
    ]


def convert_cli(argv: Sequence[str] | None = None) -> dict:
    """Runs `bs-convert-hf` with `argv` (default `sys.argv[1:]`).

    Returns:
        The printed summary as a dict (also written to `--json` when given).

    Raises:
        SystemExit: for bad arguments or a model that cannot be pruned and converted.
    """
    args = _parser().parse_args(argv)
    _check_paths(args)
    try:
        model, path = load_pretrained(args.model, args.model_class, DTYPES[args.dtype])
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(f"bs-convert-hf: cannot load --model {args.model}: {first}") from err
    config = model.config
    before = _bytes(model)
    calibration = _calibration(args, path)
    try:
        prune_and_convert(
            model,
            args.sparsity,
            args.bank_size,
            args.include,
            args.exclude,
            method=args.method,
            calibration=calibration,
        )
    except (TypeError, ValueError) as err:
        raise SystemExit(f"bs-convert-hf: {err}") from err
    after = _bytes(model)
    out = save_sparse(model, args.out)
    folder = sum(f.stat().st_size for f in out.iterdir() if f.is_file())

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dense = densify(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (args.batch_size, args.seq_len), generator=gen)
    with torch.inference_mode():
        sparse_y = main_output(model.to(device)(x.to(device)))
        dense_y = main_output(dense.to(device)(x.to(device)))
        diff = (sparse_y.float() - dense_y.float()).abs().max().item()
    ms = measure_latency({"dense": dense, "sparse": model}, x, device, args.warmup, args.repeats)

    rows = _layer_rows(model)
    how = args.method if calibration is None else f"{args.method}, {_samples(calibration)} samples"
    print(f"{type(model).__name__} from {path}: {len(rows)} layers converted (pruned by {how})")
    print(f"{'layer':<52} {'type':<22} {'out x in':>12} {'B':>4} {'k':>4} {'sparsity':>9}")
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        print(
            f"{r['layer']:<52} {r['type']:<22} {shape:>12} {r['bank_size']:>4} {r['k']:>4} "
            f"{r['sparsity']:>9.4f}"
        )
    layer_dense = sum(r["dense_bytes"] for r in rows)
    layer_compact = sum(r["compact_bytes"] for r in rows)
    print(f"converted layers: {_mb(layer_dense)} dense -> {_mb(layer_compact)} compact")
    print(f"whole model weights: {_mb(before)} dense -> {_mb(after)} ({after / before:.3f}x)")
    print(f"saved folder {out}: {_mb(folder)}")
    print(f"max |sparse - pruned dense| output difference: {diff:.3g}")
    print(
        f"latency on {device} (input {args.batch_size}x{args.seq_len} tokens, median of "
        f"{args.repeats}): dense {ms['dense']:.3f} ms, sparse {ms['sparse']:.3f} ms, "
        f"speedup {ms['dense'] / ms['sparse']:.2f}x"
    )
    summary = {
        "model": str(args.model),
        "model_class": type(model).__name__,
        "sparsity": args.sparsity,
        "bank_size": args.bank_size,
        "method": args.method,
        "calibration_samples": 0 if calibration is None else _samples(calibration),
        "layers": rows,
        "weights_bytes_dense": before,
        "weights_bytes_sparse": after,
        "saved_folder_bytes": folder,
        "max_abs_output_diff": diff,
        "latency": {
            "device": str(device),
            "input_shape": list(x.shape),
            "dense_ms": ms["dense"],
            "sparse_ms": ms["sparse"],
            "speedup": ms["dense"] / ms["sparse"],
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of `bs-convert-hf`."""
    convert_cli(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
