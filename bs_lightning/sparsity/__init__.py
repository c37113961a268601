"""Sparsity math: masks for every pattern, schedules, prunable parameters. No Lightning here."""

from bs_lightning.sparsity.masks import (
    balanced_mask,
    balanced_mask_k,
    bank_layout,
    check_sparsity,
    keep_count,
    topk_mask_lastdim,
)
from bs_lightning.sparsity.params import is_transposed, matrix_to_param, matrix_view

__all__ = [
    "balanced_mask",
    "balanced_mask_k",
    "bank_layout",
    "check_sparsity",
    "is_transposed",
    "keep_count",
    "matrix_to_param",
    "matrix_view",
    "topk_mask_lastdim",
]
