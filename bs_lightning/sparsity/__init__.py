"""Sparsity math: patterns, masks, schedules, prunable parameters, the sparsity plan and
one-shot pruning. Pure functions and plain objects: no Lightning here."""

from bs_lightning.sparsity.masks import (
    balanced_mask,
    balanced_mask_k,
    bank_layout,
    check_sparsity,
    keep_count,
    topk_mask_lastdim,
)
from bs_lightning.sparsity.oneshot import prune_matrix, prune_once_
from bs_lightning.sparsity.params import (
    PrunableParam,
    default_prunable_names,
    find_prunable,
    is_transposed,
    matrix_to_param,
    matrix_view,
)
from bs_lightning.sparsity.pattern_masks import (
    block_mask,
    nm_mask,
    tile_mask,
    unstructured_mask,
    vector_mask,
)
from bs_lightning.sparsity.patterns import (
    PATTERNS,
    BalancedPattern,
    BlockPattern,
    NMPattern,
    Pattern,
    RowPattern,
    UnstructuredPattern,
    VectorPattern,
    make_pattern,
    pattern_from_dict,
)
from bs_lightning.sparsity.plan import PlannedParam, SparsityPlan
from bs_lightning.sparsity.schedules import (
    SCHEDULES,
    check_schedule,
    is_pruning_step,
    sparsity_at,
)
from bs_lightning.validation import is_dense_target

__all__ = [
    "PATTERNS",
    "SCHEDULES",
    "BalancedPattern",
    "BlockPattern",
    "NMPattern",
    "Pattern",
    "PlannedParam",
    "PrunableParam",
    "RowPattern",
    "SparsityPlan",
    "UnstructuredPattern",
    "VectorPattern",
    "balanced_mask",
    "balanced_mask_k",
    "bank_layout",
    "block_mask",
    "check_schedule",
    "check_sparsity",
    "default_prunable_names",
    "find_prunable",
    "is_dense_target",
    "is_pruning_step",
    "is_transposed",
    "keep_count",
    "make_pattern",
    "matrix_to_param",
    "matrix_view",
    "nm_mask",
    "pattern_from_dict",
    "prune_matrix",
    "prune_once_",
    "sparsity_at",
    "tile_mask",
    "topk_mask_lastdim",
    "unstructured_mask",
    "vector_mask",
]
