"""bs-lightning: balanced sparsity for PyTorch Lightning.

Public entry points are imported lazily so that `import bs_lightning` stays cheap and the
sparsity math works without Lightning or the compiled kernels.
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "BalancedPruningCallback": "bs_lightning.callbacks",
    "SparsityPlan": "bs_lightning.sparsity.plan",
    "convert_to_sparse": "bs_lightning.convert",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bs_lightning' has no attribute {name!r}")
