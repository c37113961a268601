"""Export a fine-tuned, gradually pruned SST-2 run as a compact Hugging Face folder and check it.

    python scripts/minilm_sst2_export.py outputs/minilm_sst2_results/balanced_0.75 OUT_DIR

Loads the run's last checkpoint into `HFSequenceClassifier`, converts the classifier's pruned
layers with `bs_lightning.hf.prune_and_convert(net, None)` (bank layout recorded by the
callback is not in the checkpoint, so it is read from the zeros), saves it with
`save_sparse`, reloads it with `load_sparse` and compares its logits on the first test batch
with the dense pruned classifier. Prints and writes `OUT_DIR/export.json`: folder sizes
(dense `save_pretrained` vs compact) and the largest logit difference.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bs_lightning.hf import load_sparse, prune_and_convert, save_sparse
from bs_lightning.hf.io import sparse_layers
from bs_lightning.models.hf_classifier import HFSequenceClassifier


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder of scripts/minilm_sst2.sh")
    p.add_argument("out", type=Path, help="folder for the compact model")
    p.add_argument("--bank-size", type=int, default=None, help="default: the run's")
    args = p.parse_args()

    # the run's composed config; data.tokenizer interpolates model.pretrained
    config = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    ckpt = torch.load(
        args.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    model = HFSequenceClassifier(**ckpt["hyper_parameters"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    datamodule = instantiate(config.data, _convert_="all")
    datamodule.setup("test")
    x, _ = next(iter(datamodule.test_dataloader()))  # [64, t]
    with torch.inference_mode():
        want = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.net.save_pretrained(tmp)
        dense_bytes = _folder_bytes(Path(tmp))

    bank = args.bank_size or config.pruning.bank_size
    prune_and_convert(model.net, None, bank_size=bank)
    save_sparse(model.net, args.out)
    loaded = load_sparse(args.out)
    mask = (x != model.pad_token_id).long()
    with torch.inference_mode():
        got = loaded(input_ids=x, attention_mask=mask).logits
    layers = sparse_layers(loaded)
    result = {
        "run": args.run.name,
        "model_class": type(loaded).__name__,
        "sparse_layers": len(layers),
        "bank_size": bank,
        "k": sorted({m.k for m in layers.values()}),
        "dense_folder_bytes": dense_bytes,
        "sparse_folder_bytes": _folder_bytes(args.out),
        "max_abs_logit_diff": (got - want).abs().max().item(),
        "same_predictions": bool((got.argmax(-1) == want.argmax(-1)).all()),
        "compared_sentences": x.shape[0],
    }
    (args.out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
