"""Hugging Face transformers: balanced pruning, conversion to sparse modules, save and load.

    from bs_lightning.hf import load_sparse, prune_and_convert, save_sparse

    model = AutoModelForSequenceClassification.from_pretrained(path)
    prune_and_convert(model, sparsity=0.9, bank_size=32)  # in place
    save_sparse(model, "out/")  # config.json + model.safetensors + bs_lightning_sparse.json
    model = load_sparse("out/")  # no dense weights for the sparse layers

The names are imported lazily, so `bs_lightning.hf.paths` (used by the SST-2 data module)
does not pull in the sparse modules.
"""

from importlib import import_module

# name -> module that defines it
_LAZY = {
    "load_sparse": "bs_lightning.hf.io",
    "prune_and_convert": "bs_lightning.hf.prune",
    "save_sparse": "bs_lightning.hf.io",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bs_lightning.hf' has no attribute {name!r}")
