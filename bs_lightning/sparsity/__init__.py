"""Sparsity math: masks for every pattern, schedules, prunable parameters. No Lightning here."""

from bs_lightning.sparsity.masks import (
    balanced_mask,
    balanced_mask_k,
    bank_layout,
    check_sparsity,
    keep_count,
    topk_mask_lastdim,
)
from bs_lightning.sparsity.params import (
    PrunableParam,
    default_prunable_names,
    find_prunable,
    is_transposed,
    matrix_to_param,
    matrix_view,
)
from bs_lightning.sparsity.patterns import (
    PATTERNS,
    PatternSpec,
    block_mask,
    nm_mask,
    tile_mask,
    unstructured_mask,
    vector_mask,
)
from bs_lightning.sparsity.schedules import (
    SCHEDULES,
    check_schedule,
    is_pruning_step,
    sparsity_at,
)

__all__ = [
    "PATTERNS",
    "SCHEDULES",
    "PatternSpec",
    "PrunableParam",
    "balanced_mask",
    "balanced_mask_k",
    "bank_layout",
    "block_mask",
    "check_schedule",
    "check_sparsity",
    "default_prunable_names",
    "find_prunable",
    "is_pruning_step",
    "is_transposed",
    "keep_count",
    "matrix_to_param",
    "matrix_view",
    "nm_mask",
    "sparsity_at",
    "tile_mask",
    "topk_mask_lastdim",
    "unstructured_mask",
    "vector_mask",
]
