"""Argument checks shared by every stage, so each rule and its error message exist once.

Each check names the parameter, the layer (when one is given) and the valid values, and
returns the value converted to its plain Python type. Nothing here imports torch or
Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_BANK_SIZE",
    "check_bank_size",
    "check_int",
    "check_sparsity",
    "glob_list",
    "is_dense_target",
    "where",
]

# in-bank indices are stored as uint8
MAX_BANK_SIZE = 256


def where(name: str | None) -> str:
    """`" for layer 'name'"`, or `""` without a name: the suffix of every error message."""
    return f" for layer {name!r}" if name else ""


def check_int(
    value: Any, param: str, low: int = 1, high: int | None = None, name: str | None = None
) -> int:
    """Validates an integer argument in `[low, high]` (`high=None`: no upper bound).

    Raises:
        ValueError: when `value` is not an int (bools are rejected) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        valid = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValueError(f"{param}{where(name)} must be {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{param}{where(name)} must be an integer {valid}, got {value!r}")
    return value


def check_bank_size(bank_size: Any, name: str | None = None) -> int:
    """Validates the bank size of a compact matrix: in [1, 256] (in-bank indices are uint8).

    Args:
        bank_size: columns per bank.
        name: layer name used in the error message.

    Raises:
        ValueError: when `bank_size` is not an integer in [1, 256].
    """
    return check_int(bank_size, "bank_size", 1, MAX_BANK_SIZE, name)


def check_sparsity(sparsity: Any, name: str | None = None) -> float:
    """Validates a sparsity value and returns it as a float.

    Args:
        sparsity: fraction of weights to remove, in [0, 1).
        name: layer or parameter name used in the error message.

    Returns:
        `sparsity` as a Python float.

    Raises:
        ValueError: when `sparsity` is not a real number in [0, 1).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(
            f"sparsity{where(name)} must be a float in [0, 1), got {sparsity!r} "
            f"of type {type(sparsity).__name__}"
        )
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity{where(name)} must be in [0, 1), got {sparsity!r}")
    return s


def glob_list(value: Any, param: str) -> list[str] | None:
    """`None`, one glob or a list of globs, as a list (None stays None).

    Raises:
        ValueError: for anything else (an empty string included), naming `param`.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, str) and v for v in value)
    ):
        return list(value)
    raise ValueError(
        f"{param} must be None, a glob string or a list of glob strings, got {value!r}"
    )


def is_dense_target(sparsity: Any) -> bool:
    """The one "is this a dense run" rule: a target sparsity that prunes nothing.

    Args:
        sparsity: a float, or a mapping from glob to float (per-layer targets); None means
            the pruning default (not dense).

    Returns:
        True when `sparsity` is 0, or a mapping whose every target is 0.
    """
    if sparsity is None:
        return False
    if isinstance(sparsity, Mapping):
        return bool(sparsity) and all(float(v) == 0.0 for v in sparsity.values())
    return float(sparsity) == 0.0
