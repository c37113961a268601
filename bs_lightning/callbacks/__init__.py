"""Lightning callbacks of bs_lightning."""

from bs_lightning.callbacks.balanced_pruning import BalancedPruningCallback

__all__ = ["BalancedPruningCallback"]
