"""`SparsityPlan`: the one record of what is pruned how, from pruning to conversion to saving.

Per parameter it holds the module name, the parameter name, the pattern (with its shape
options), the target sparsity, the keep-count reached and the parameter's shape. It is made
from the one selector (`find_prunable`) by the pruning callback and by one-shot pruning,
kept in the callback's checkpoint state (`"plan"`), read by `convert_to_sparse`, and written
into a Hugging Face folder's marker by `save_sparse` (read back by `load_sparse`).

Plans left in this process: `plan.record(model)` remembers a plan for a model (the callback
does so for the model it prunes, `load_sparse` for the model it builds), and
`SparsityPlan.recorded(model)` finds it again, also for a submodule of a recorded model (the
plan is then re-rooted). The record lives in a weak map beside the model, not on it, so
nothing is added to modules, pickled with them or copied by `deepcopy`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bs_lightning.sparsity.patterns import Pattern, pattern_from_dict

__all__ = ["PlannedParam", "SparsityPlan"]

PLAN_FORMAT = "bs_lightning.sparsity_plan"
PLAN_VERSION = 1

# root module -> the plan recorded for it in this process
_RECORDED: weakref.WeakKeyDictionary[nn.Module, SparsityPlan] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PlannedParam:
    """How one parameter is pruned.

    Attributes:
        module: name of the owning module in the model (`""` for the root).
        param: the parameter's name inside its module (`"weight"`, `"weight_hh_l0"`).
        pattern: the pattern and its shape options.
        sparsity: target sparsity.
        keep: keep-count reached, in the pattern's units (weights per bank for balanced).
        shape: the parameter's shape.
    """

    module: str
    param: str
    pattern: Pattern
    sparsity: float
    keep: int
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        """Full parameter name as in `model.named_parameters()`."""
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def compact_layout(self) -> tuple[int, int] | None:
        """`(bank_size, k)` of the compact format, or None when the pattern does not convert."""
        return self.pattern.compact_layout(self.keep)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (see `SparsityPlan.to_dict`)."""
        return {
            "module": self.module,
            "param": self.param,
            "pattern": self.pattern.to_dict(),
            "sparsity": self.sparsity,
            "keep": self.keep,
            "shape": list(self.shape),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlannedParam:
        """Inverse of `to_dict`.

        Raises:
            ValueError: when a key is missing or has the wrong type, naming it.
        """
        try:
            entry = cls(
                module=str(data["module"]),
                param=str(data["param"]),
                pattern=pattern_from_dict(dict(data["pattern"])),
                sparsity=float(data["sparsity"]),
                keep=int(data["keep"]),
                shape=tuple(int(d) for d in data["shape"]),
            )
        except KeyError as err:
            raise ValueError(f"plan entry {dict(data)!r} has no {err.args[0]!r}") from err
        except (TypeError, ValueError) as err:
            raise ValueError(f"plan entry {dict(data)!r} is malformed: {err}") from err
        return entry


class SparsityPlan:
    """What is pruned how: an ordered collection of `PlannedParam`, keyed by full name.

    Args:
        entries: the planned parameters, in module order.

    Raises:
        ValueError: when two entries name the same parameter.
    """

    def __init__(self, entries: Iterable[PlannedParam] = ()) -> None:
        self._entries: dict[str, PlannedParam] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"parameter {entry.name!r} is planned twice")
            self._entries[entry.name] = entry

    # ---------------------------------------------------------------- access

    def __iter__(self) -> Iterator[PlannedParam]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> PlannedParam:
        return self._entries[name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparsityPlan) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"SparsityPlan({len(self)} parameters: {list(self._entries)[:6]})"

    def modules(self) -> dict[str, dict[str, PlannedParam]]:
        """Module name -> {parameter name -> entry}, in module order."""
        out: dict[str, dict[str, PlannedParam]] = {}
        for entry in self:
            out.setdefault(entry.module, {})[entry.param] = entry
        return out

    def rooted_at(self, prefix: str) -> SparsityPlan:
        """The entries below module `prefix`, with names relative to it (`""`: unchanged)."""
        if not prefix:
            return self
        head = prefix + "."
        entries = []
        for e in self:
            if e.module == prefix or e.module.startswith(head):
                module = e.module[len(head) :] if e.module != prefix else ""
                entries.append(
                    PlannedParam(module, e.param, e.pattern, e.sparsity, e.keep, e.shape)
                )
        return SparsityPlan(entries)

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: `{"format", "version", "params": [entry, ...]}`."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "params": [entry.to_dict() for entry in self],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityPlan:
        """Inverse of `to_dict`.

        Raises:
            ValueError: for another format, a newer version or a malformed entry.
        """
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a sparsity plan (format must be {PLAN_FORMAT!r}): {data!r:.200}")
        version = data.get("version")
        if not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
            raise ValueError(
                f"sparsity plan version {version!r} is not supported; this bs_lightning reads "
                f"versions 1..{PLAN_VERSION}"
            )
        return cls(PlannedParam.from_dict(e) for e in data.get("params", []))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> SparsityPlan:
        """Reads the plan a `BalancedPruningCallback` stored in a Lightning checkpoint.

        Args:
            path: a `.ckpt` file written by a `Trainer` that had the callback.

        Returns:
            The plan at the time of the checkpoint (keep-counts reached so far).

        Raises:
            FileNotFoundError: when `path` does not exist.
            ValueError: when the checkpoint holds no plan, or more than one.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        callbacks = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
        found = {
            key: state["plan"]
            for key, state in callbacks.items()
            if isinstance(state, Mapping) and isinstance(state.get("plan"), Mapping)
        }
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({sorted(found)})"
            raise ValueError(
                f"checkpoint {str(path)!r} holds {what} sparsity plans; it must come from a "
                f"Trainer with one BalancedPruningCallback"
            )
        return cls.from_dict(next(iter(found.values())))

    # ---------------------------------------------------------------- this process

    def record(self, model: nn.Module) -> SparsityPlan:
        """Remembers this plan for `model` in this process (see the module docstring)."""
        _RECORDED[model] = self
        return self

    @staticmethod
    def recorded(model: nn.Module) -> SparsityPlan | None:
        """The plan recorded for `model`, or for a model containing it (re-rooted), or None."""
        plan = _RECORDED.get(model)
        if plan is not None:
            return plan
        for root, root_plan in list(_RECORDED.items()):
            for name, module in root.named_modules():
                if module is model and name:
                    return root_plan.rooted_at(name)
        return None
