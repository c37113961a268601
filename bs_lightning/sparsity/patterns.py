"""Pattern objects: each pattern owns its keep-count rule, its mask, how it converts and its text.

A pattern turns a target sparsity into a keep-count of its own units and a keep-count into a
mask of a `[out, in]` matrix view:

| pattern | options | unit of the keep-count | converts to the compact format |
|---|---|---|---|
| `BalancedPattern` ("balanced") | `bank_size` | weights per bank | bank `bank_size`, `k = keep` |
| `NMPattern` ("nm") | `n`, `m` | weights per group of `m` | bank `m`, `k = keep` |
| `UnstructuredPattern` ("unstructured") | | weights per layer | no |
| `RowPattern` ("row") | | weights per row (any columns) | no |
| `BlockPattern` ("block") | `block_size` | `b x b` tiles per layer | no |
| `VectorPattern` ("vector") | `vector_size` | runs of `v` columns per layer | no |

`PATTERNS` is the one registry from the strings users write (`pattern="balanced"`, Hydra's
`pruning.pattern`) to these classes; `make_pattern` builds one from the callback's options
and `pattern_from_dict` from its `to_dict()`. Nothing else in the package compares pattern
strings.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from bs_lightning.sparsity.masks import (
    balanced_mask_k,
    bank_layout,
    keep_count,
    topk_mask_lastdim,
)
from bs_lightning.sparsity.pattern_masks import (
    _prune_scores,
    tile_count,
    tile_mask,
    units_to_keep,
    unstructured_mask_k,
)
from bs_lightning.validation import MAX_BANK_SIZE, check_int, check_sparsity
from bs_lightning.validation import where as _where

__all__ = [
    "PATTERNS",
    "BalancedPattern",
    "BlockPattern",
    "NMPattern",
    "Pattern",
    "RowPattern",
    "UnstructuredPattern",
    "VectorPattern",
    "make_pattern",
    "pattern_from_dict",
]


def _check_convertible(bank: int, param: str) -> None:
    """Banks of a converting pattern are stored with uint8 in-bank indices."""
    if bank > MAX_BANK_SIZE:
        raise ValueError(
            f"{param}={bank} is more than {MAX_BANK_SIZE}: a converted layer stores in-bank "
            f"indices as uint8; use {param} <= {MAX_BANK_SIZE} (or an unstructured pattern)"
        )


def _row_length(matrix: torch.Tensor) -> int:
    return matrix[0].numel() if matrix.shape[0] else 0


class Pattern(ABC):
    """A sparsity pattern with its shape options (a frozen dataclass in every subclass).

    The keep-count counts the pattern's units (see the module table). A gradual schedule
    lowers it step by step; the callback never lets it go up.
    """

    name: ClassVar[str]

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern itself fixes (`1 - n/m` for N:M), else None."""
        return None

    @property
    def row_group(self) -> int | None:
        """Columns of a row whose mask is decided on their own (a bank, an N:M group), so a
        matrix split into whole groups can be pruned piece by piece with no communication;
        None when the mask ranks a whole matrix (unstructured, block, vector)."""
        return None

    @abstractmethod
    def units(self, matrix: torch.Tensor) -> int:
        """Keep-count with nothing pruned, for a `[out, in]` matrix view."""

    @abstractmethod
    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        """Keep-count at `sparsity` for a `[out, in]` matrix view; validates the layer.

        Raises:
            ValueError: when the sparsity keeps 0 units or the layer does not fit the
                pattern (a bank longer than a row, an N:M group not dividing a row), naming
                the layer.
        """

    @abstractmethod
    def mask(
        self, matrix: torch.Tensor, keep: int, prev_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bool mask of `matrix`'s shape `[out, in]` keeping `keep` units; True = kept.

        `prev_mask` (same shape): entries False there are never kept again.
        """

    def check_target(self, sparsity: float, name: str | None = None) -> float:
        """Validates a target sparsity before any layer is known; returns it as a float.

        Raises:
            ValueError: when it is outside [0, 1) or keeps nothing whatever the layer.
        """
        return check_sparsity(sparsity, name)

    def compact_layout(self, keep: int) -> tuple[int, int] | None:
        """`(bank_size, k)` of the compact format at keep-count `keep`, or None when the
        pattern has no sparse inference module (the layer stays dense)."""
        return None

    @property
    def converts(self) -> bool:
        """True when pruned layers convert to balanced sparse inference modules."""
        return self.compact_layout(1) is not None

    @property
    def unit_label(self) -> str:
        """Column header of the keep-count in summaries (`"k of 32"`)."""
        return "units kept"

    @property
    def label(self) -> str:
        """Short name for table columns: the name plus the shape a reader must know to tell
        two runs apart (`"block 4x4"`, `"nm 2:4"`); `"balanced"` and `"unstructured"`."""
        return self.name

    def describe(self) -> str:
        """One line for logs and reports, e.g. `"balanced (banks of 32)"`."""
        options = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name} ({options})" if options else self.name

    def options(self) -> dict[str, int]:
        """The shape options, e.g. `{"bank_size": 32}`."""
        return asdict(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: `{"pattern": name, **options}`; `pattern_from_dict` inverts it."""
        return {"pattern": self.name, **self.options()}


@dataclass(frozen=True)
class BalancedPattern(Pattern):
    """`k` of every `bank_size` consecutive columns per row (Yao et al. 2019).

    Attributes:
        bank_size: columns per bank `B >= 1` (at most 256 to convert: uint8 indices).
    """

    name: ClassVar[str] = "balanced"
    bank_size: int = 32

    def __post_init__(self):
        check_int(self.bank_size, "bank_size")
        _check_convertible(self.bank_size, "bank_size")

    @property
    def row_group(self) -> int:
        return self.bank_size

    def units(self, matrix: torch.Tensor) -> int:
        return self.bank_size

    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        k = keep_count(self.bank_size, sparsity, name)
        bank_layout(_row_length(matrix), self.bank_size, k, name)
        return k

    def mask(self, matrix, keep, prev_mask=None):
        return balanced_mask_k(matrix, self.bank_size, keep, prev_mask=prev_mask)

    def check_target(self, sparsity: float, name: str | None = None) -> float:
        s = check_sparsity(sparsity, name)
        if s > 0 and keep_count(self.bank_size, s, name) == self.bank_size:
            warnings.warn(
                f"sparsity {s}{_where(name)} at bank {self.bank_size} prunes nothing: "
                f"round({self.bank_size} * (1 - {s})) = {self.bank_size} keeps every weight",
                stacklevel=3,
            )
        return s

    def compact_layout(self, keep: int) -> tuple[int, int] | None:
        return self.bank_size, keep

    @property
    def unit_label(self) -> str:
        return f"k of {self.bank_size}"

    def describe(self) -> str:
        return f"balanced (banks of {self.bank_size})"


@dataclass(frozen=True)
class NMPattern(Pattern):
    """N:M: `n` kept in every group of `m` consecutive columns (balanced with bank `m`).

    Attributes:
        n: weights kept per group at the target, `1 <= n <= m`.
        m: group length; must divide every pruned row.
    """

    name: ClassVar[str] = "nm"
    n: int = 2
    m: int = 4

    def __post_init__(self):
        check_int(self.m, "m")
        _check_convertible(self.m, "m")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= self.m:
            raise ValueError(f"n must be an integer in [1, m={self.m}], got {self.n!r}")

    @property
    def fixed_sparsity(self) -> float | None:
        return 1.0 - self.n / self.m

    @property
    def row_group(self) -> int:
        return self.m

    def units(self, matrix: torch.Tensor) -> int:
        return self.m

    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        length = _row_length(matrix)
        if length % self.m:
            raise ValueError(
                f"m={self.m}{_where(name)} must divide the row length {length} for pattern 'nm'"
            )
        return max(self.n, keep_count(self.m, sparsity, name))

    def mask(self, matrix, keep, prev_mask=None):
        return balanced_mask_k(matrix, self.m, keep, prev_mask=prev_mask)

    def compact_layout(self, keep: int) -> tuple[int, int] | None:
        return self.m, keep

    @property
    def unit_label(self) -> str:
        return f"n of {self.m}"

    @property
    def label(self) -> str:
        return f"nm {self.n}:{self.m}"

    def describe(self) -> str:
        return f"nm ({self.n}:{self.m})"


@dataclass(frozen=True)
class UnstructuredPattern(Pattern):
    """Layer-wise magnitude pruning: the largest |w| of the whole matrix."""

    name: ClassVar[str] = "unstructured"

    def units(self, matrix: torch.Tensor) -> int:
        return matrix.numel()

    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        return units_to_keep(matrix.numel(), sparsity, "unit", name)

    def mask(self, matrix, keep, prev_mask=None):
        return unstructured_mask_k(matrix, keep, prev_mask)


@dataclass(frozen=True)
class RowPattern(Pattern):
    """The largest |w| of each row, the same count in every row: unstructured within a row.

    One group per output row, the comparison group Wanda (Sun et al. 2023) uses; it is
    balanced sparsity with one bank as long as the row, so it bounds what banks cost in
    accuracy. It does not convert (in-row indices need more than 8 bits).
    """

    name: ClassVar[str] = "row"

    def units(self, matrix: torch.Tensor) -> int:
        return _row_length(matrix)

    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        return units_to_keep(_row_length(matrix), sparsity, "weight", name)

    def mask(self, matrix, keep, prev_mask=None):
        scores = _prune_scores(matrix.detach().abs().float(), prev_mask)
        return topk_mask_lastdim(scores, keep)

    @property
    def unit_label(self) -> str:
        return "kept per row"

    def describe(self) -> str:
        return "row (unstructured within each row)"


class _TilePattern(Pattern):
    """Tiles of the matrix view ranked by L2 norm; subclasses give the tile's side."""

    @property
    @abstractmethod
    def side(self) -> tuple[int, int]:
        """`(tile_rows, tile_cols)`."""

    def units(self, matrix: torch.Tensor) -> int:
        return tile_count(matrix, *self.side)

    def keep(self, matrix: torch.Tensor, sparsity: float, name: str | None = None) -> int:
        return units_to_keep(self.units(matrix), sparsity, "unit", name)

    def mask(self, matrix, keep, prev_mask=None):
        return tile_mask(matrix, *self.side, keep, prev_mask)


@dataclass(frozen=True)
class BlockPattern(_TilePattern):
    """`block_size x block_size` tiles kept by L2 norm (edge tiles smaller).

    Attributes:
        block_size: tile side `b >= 1`.
    """

    name: ClassVar[str] = "block"
    block_size: int = 4

    def __post_init__(self):
        check_int(self.block_size, "block_size")

    @property
    def side(self) -> tuple[int, int]:
        return self.block_size, self.block_size

    @property
    def label(self) -> str:
        return f"block {self.block_size}x{self.block_size}"

    def describe(self) -> str:
        return f"block ({self.block_size}x{self.block_size})"


@dataclass(frozen=True)
class VectorPattern(_TilePattern):
    """Runs of `vector_size` consecutive columns of a row kept by L2 norm.

    Attributes:
        vector_size: run length `v >= 1`; the last run of a row may be shorter.
    """

    name: ClassVar[str] = "vector"
    vector_size: int = 4

    def __post_init__(self):
        check_int(self.vector_size, "vector_size")

    @property
    def side(self) -> tuple[int, int]:
        return 1, self.vector_size

    @property
    def label(self) -> str:
        return f"vector {self.vector_size}"

    def describe(self) -> str:
        return f"vector (runs of {self.vector_size})"


# the one map from a pattern's name to its class
PATTERNS: dict[str, type[Pattern]] = {
    cls.name: cls
    for cls in (
        BalancedPattern,
        NMPattern,
        UnstructuredPattern,
        RowPattern,
        BlockPattern,
        VectorPattern,
    )
}

# every shape option a pattern may take, with the callback's defaults
_OPTION_DEFAULTS = {"bank_size": 32, "n": 2, "m": 4, "block_size": 4, "vector_size": 4}


def _option_names(cls: type[Pattern]) -> list[str]:
    return [f.name for f in fields(cls)]


def _pattern_class(name: Any) -> type[Pattern]:
    cls = PATTERNS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {name!r}")
    return cls


def make_pattern(pattern: str = "balanced", **options: int) -> Pattern:
    """Builds a pattern from its name and the callback's shape options.

    The pattern validates the options it owns; every other option given must still be an
    integer >= 1 (the callback passes them all), so a bad value never passes silently.

    Args:
        pattern: a key of `PATTERNS`.
        **options: any of `bank_size`, `n`, `m`, `block_size`, `vector_size`.

    Returns:
        The pattern object.

    Raises:
        ValueError: for an unknown pattern or option, or an invalid option value.
    """
    cls = _pattern_class(pattern)
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown pattern option(s) {unknown}; valid options: {list(_OPTION_DEFAULTS)}"
        )
    for key, value in options.items():
        if key not in _option_names(cls):
            check_int(value, key)
    merged = {**_OPTION_DEFAULTS, **options}
    return cls(**{f: merged[f] for f in _option_names(cls)})


def pattern_from_dict(data: dict[str, Any]) -> Pattern:
    """Inverse of `Pattern.to_dict`.

    Raises:
        ValueError: for an unknown pattern name or option.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a pattern must be a dict with a 'pattern' key, got {data!r}")
    options = dict(data)
    cls = _pattern_class(options.pop("pattern", None))
    unknown = sorted(set(options) - set(_option_names(cls)))
    if unknown:
        raise ValueError(
            f"pattern {cls.name!r} has no option(s) {unknown}; valid options: {_option_names(cls)}"
        )
    return cls(**options)
