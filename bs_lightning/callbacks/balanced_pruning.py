"""`BalancedPruningCallback`: gradual balanced (or other pattern) pruning inside `Trainer.fit`.

Only orchestration lives here; the math is in `bs_lightning.sparsity`. Per optimizer step:

1. `on_train_batch_start` at `trainer.global_step = t`: if `t` is a pruning step and some
   layer's keep-count goes down, new masks are computed on the weights' matrix views (only
   ever shrinking), multiplied into the weights in place and into the optimizer state
   (Adam moments, SGD momentum), broadcast from rank 0 under DDP, and logged. Under FSDP2
   each rank computes the masks of its own rows (`callbacks/sharding.py`); under FSDP1 each
   unit is gathered in turn and each rank keeps its piece (`callbacks/flat_sharding.py`).
2. `on_before_optimizer_step` (after backward and AMP unscaling): pruned gradients are zeroed.
3. A step post-hook on every optimizer re-applies the masks right after `optimizer.step()`.

Weights stay plain `Parameter`s with exact zeros (no reparametrisation), so checkpoints load
into the plain model and cuDNN's flattened RNN weights stay valid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from bs_lightning.callbacks.flat_sharding import (
    FlatShard,
    flat_shards,
    full_params,
    init_roots,
    local_piece,
    orig_params_error,
)
from bs_lightning.callbacks.sharding import (
    check_shardable,
    global_counts,
    is_sharded,
    local,
    matrix_shape,
)
from bs_lightning.sparsity import (
    PlannedParam,
    PrunableParam,
    SparsityPlan,
    check_schedule,
    check_sparsity,
    find_prunable,
    is_pruning_step,
    make_pattern,
    matrix_to_param,
    sparsity_at,
)
from bs_lightning.sparsity.calibration import check_calibratable
from bs_lightning.sparsity.oneshot import check_method, prune_calibrated_
from bs_lightning.sparsity.params import as_matrix
from bs_lightning.validation import glob_list

__all__ = ["BalancedPruningCallback"]

# strategies that flatten parameters, so per-parameter masks cannot be applied (FSDP2 under
# ModelParallelStrategy keeps them, FSDP1 with use_orig_params=True keeps views of them: see
# callbacks/sharding.py and callbacks/flat_sharding.py)
_UNSUPPORTED_STRATEGIES = ("DeepSpeedStrategy",)
_DEFAULT_SPARSITY = 0.9
# 2: the pattern is stored with its options (`Pattern.to_dict`), and the sparsity plan
_STATE_VERSION = 2


@dataclass
class _Layer:
    """Pruning state of one parameter."""

    entry: PrunableParam
    shape: tuple[int, ...]  # the whole parameter's (FSDP1 leaves each rank a 1-D piece)
    final: float  # target sparsity
    units: int  # keep-count with nothing pruned
    keep_final: int  # keep-count at the target
    keep: int  # current keep-count (never goes up)
    mask: Tensor | None = None  # bool, the local parameter's shape, True = kept; None = dense
    mask_mul: Tensor | None = None  # mask in the parameter's dtype for the per-step multiply
    effective: float = 0.0  # fraction of zeros the mask imposes


class BalancedPruningCallback(Callback):
    """Prunes a model's weight matrices to a balanced-sparse pattern on a gradual schedule.

    Steps are optimizer steps (`trainer.global_step`). From `start_step` the sparsity
    follows `schedule` and reaches the target at `end_step`; masks are recomputed every
    `frequency` steps (and once at the first step `>= end_step`), and each layer's keep-count
    `k_t = round(bank_size * (1 - s_t))` never goes up. Pruned weights are exact zeros after
    every optimizer step, also with Adam/AdamW and mixed precision.

    Layers pruned by default: `nn.Linear`, `nn.Conv1d/2d/3d` (rows = output channels),
    `nn.LSTM/GRU/RNN` `weight_ih_l*`/`weight_hh_l*` (all layers and directions),
    `nn.MultiheadAttention.in_proj_weight` (its `out_proj` is a Linear), Hugging Face GPT-2
    `Conv1D` (banks along the input dimension). Biases, norms and embeddings only when an
    `include` pattern names them (e.g. `"embed.weight"`). See `bs_lightning.sparsity`.

    Rows whose length is not a multiple of `bank_size` end in a short bank that keeps
    `min(r, max(1, round(k * r / bank_size)))` of its `r` columns.

    Args:
        sparsity: target sparsity in [0, 1), or a mapping from glob (module or parameter
            name) to target; with a mapping, the first matching key sets a parameter's target
            and parameters matching no key stay dense. None means 0.9 (for "nm": `1 - n/m`).
        bank_size: columns per bank ("balanced"); must not exceed any selected row.
        pattern: "balanced", "nm" (N:M with `n`, `m`), "unstructured" (per layer), "row"
            (the same count per row, any columns), "block" (`block_size x block_size` tiles
            by L2 norm) or "vector" (runs of `vector_size` columns by L2 norm).
        schedule: "cubic" (Zhu & Gupta 2017), "linear", "constant" or "one_shot" (prune to the
            target at `start_step`).
        start_step: first pruning step.
        end_step: step at which the target is reached; None means
            `round(DEFAULT_END_FRACTION * trainer.estimated_stepping_batches)` (0.75: the last
            quarter of training fine-tunes the final masks).
        frequency: optimizer steps between mask updates.
        include: glob or globs selecting parameters (module or parameter names); None = all
            prunable ones.
        exclude: glob or globs removing parameters from the selection.
        n: weights kept per group of `m` for pattern "nm".
        m: group length for pattern "nm".
        block_size: tile side for pattern "block".
        vector_size: run length for pattern "vector".
        initial_sparsity: schedule's sparsity at `start_step` (Zhu & Gupta's `s_i`).
        verbose: print the rank-zero summary table at the end of fit.
        method: how the one-shot masks are chosen: "magnitude" (the largest |w|), "wanda"
            (|w| times the input column's norm) or "sparsegpt" (OBS masks with the
            remaining weights updated, layer after layer); the calibrated two need
            `schedule="one_shot"` and prune at `start_step` from the first
            `calibration_batches` batches of the train dataloader, the model in eval mode
            (see `bs_lightning.sparsity.oneshot.prune_calibrated_`).
        calibration_batches: train batches the calibrated methods run through the model.
        calibration_forward: `f(pl_module, batch)` running the model on one batch for
            calibration; None calls `pl_module(batch[0])` for a tuple/list batch `(x, y)`,
            `pl_module(**batch)` for a mapping, else `pl_module(batch)`.

    Raises:
        ValueError: at construction for a sparsity outside [0, 1), a bank size < 1, a
            sparsity that keeps 0 weights per bank, an unknown pattern or schedule, bad steps
            or globs; at setup for a glob matching no parameter, a bank longer than a row or
            an N:M group not dividing a row (all before any weight changes).
        TypeError: at setup when a calibrated method meets a layer whose inputs it cannot
            measure (e.g. an LSTM), naming it.
        RuntimeError: at setup under DeepSpeed or FSDP1 without `use_orig_params=True`, and
            a calibrated method under FSDP2 or FSDP1 (it needs whole weight matrices).
    """

    DEFAULT_END_FRACTION = 0.75

    def __init__(
        self,
        sparsity: float | Mapping[str, float] | None = None,
        bank_size: int = 32,
        pattern: str = "balanced",
        schedule: str = "cubic",
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 100,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        n: int = 2,
        m: int = 4,
        block_size: int = 4,
        vector_size: int = 4,
        initial_sparsity: float = 0.0,
        verbose: bool = True,
        method: str = "magnitude",
        calibration_batches: int = 16,
        calibration_forward: Callable[[LightningModule, Any], Any] | None = None,
    ) -> None:
        super().__init__()
        check_method(method)
        if method != "magnitude" and schedule != "one_shot":
            raise ValueError(
                f"method {method!r} chooses the masks once, from calibration batches: use "
                f"schedule='one_shot' (got {schedule!r}), or method='magnitude' for a gradual "
                f"schedule"
            )
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(
                f"calibration_batches must be an integer >= 1, got {calibration_batches!r}"
            )
        if calibration_forward is not None and not callable(calibration_forward):
            raise ValueError(
                f"calibration_forward must be callable as f(pl_module, batch) or None, got "
                f"{calibration_forward!r}"
            )
        self.method = method
        self.calibration_batches = calibration_batches
        self.calibration_forward = calibration_forward
        self.pattern = make_pattern(
            pattern, bank_size=bank_size, n=n, m=m, block_size=block_size, vector_size=vector_size
        )
        check_schedule(schedule, start_step, end_step, frequency)
        self.targets = self._check_targets(sparsity)
        low = min(self.targets.values())
        if (
            isinstance(initial_sparsity, bool)
            or not isinstance(initial_sparsity, (int, float))
            or not 0.0 <= initial_sparsity <= low
        ):
            raise ValueError(
                f"initial_sparsity must be a float in [0, {low}] (at most the target "
                f"sparsity), got {initial_sparsity!r}"
            )
        self.initial_sparsity = float(initial_sparsity)
        self.schedule = schedule
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.include = glob_list(include, "include")
        self.exclude = glob_list(exclude, "exclude")
        self.verbose = verbose
        self.layers: dict[str, _Layer] = {}
        self.last_pruned_step: int | None = None
        self._resolved_end: int | None = None
        self._loaded: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._sharded = False  # masks differ per rank (FSDP2 DTensors, FSDP1 flat shards)
        self._flat: dict[str, FlatShard] = {}  # FSDP1: layer name -> its piece of the shard

    # ---------------------------------------------------------------- validation

    def _check_targets(self, sparsity: Any) -> dict[str, float]:
        """Glob -> target sparsity (`"*"` for a single float); validated keep-counts."""
        fixed = self.pattern.fixed_sparsity
        if fixed is not None:  # N:M fixes the target
            if sparsity is not None and (
                isinstance(sparsity, Mapping) or check_sparsity(sparsity) != fixed
            ):
                options = ", ".join(f"{k}={v}" for k, v in self.pattern.options().items())
                raise ValueError(
                    f"pattern {self.pattern.name!r} with {options} fixes sparsity to "
                    f"{fixed}; pass sparsity=None or {fixed}, got {sparsity!r}"
                )
            return {"*": fixed}
        if sparsity is None:
            sparsity = _DEFAULT_SPARSITY
        if isinstance(sparsity, Mapping):
            if not sparsity:
                raise ValueError("sparsity mapping must name at least one glob pattern")
            targets = {}
            for key, value in sparsity.items():
                if not isinstance(key, str):
                    raise ValueError(f"sparsity mapping keys must be glob strings, got {key!r}")
                targets[key] = self.pattern.check_target(value, key)
        else:
            targets = {"*": self.pattern.check_target(sparsity)}
        return targets

    def _target_for(self, entry: PrunableParam) -> float | None:
        for key, value in self.targets.items():
            if entry.matches(key):
                return value
        return None

    @staticmethod
    def _check_strategy(trainer: Trainer) -> None:
        strategy = type(trainer.strategy).__name__
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        bad = names.intersection(_UNSUPPORTED_STRATEGIES)
        if bad:
            raise RuntimeError(
                f"BalancedPruningCallback does not support {strategy}: "
                f"it flattens parameters, so per-parameter masks cannot be applied in place. "
                f"Use a single device, 'ddp' or 'ddp_spawn', or shard with FSDP2 "
                f"(ModelParallelStrategy and fully_shard in configure_model) or FSDPStrategy."
            )
        if (
            "FSDPStrategy" in names
            and getattr(trainer.strategy, "kwargs", {}).get("use_orig_params", True) is False
        ):
            raise orig_params_error(strategy)

    # ---------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Selects and validates the parameters to prune (no weight changes here)."""
        if stage != "fit":
            return
        self._check_strategy(trainer)
        entries = find_prunable(pl_module, self.include, self.exclude)
        unmatched = [
            key for key in self.targets if key != "*" and not any(e.matches(key) for e in entries)
        ]
        if unmatched:
            raise ValueError(
                f"sparsity keys {unmatched} match no selected parameter; selected: "
                f"{[e.name for e in entries][:12]}"
            )
        layers = {}
        for entry in entries:
            final = self._target_for(entry)
            if final is None:
                continue
            matrix = entry.matrix()
            units = self.pattern.units(matrix)
            keep_final = self.pattern.keep(matrix, final, entry.name)
            old = self.layers.get(entry.name)
            if old is not None and old.shape == tuple(entry.param.shape):
                # a second fit with the same callback continues from the current masks
                old.entry = entry
                layers[entry.name] = old
            else:
                layers[entry.name] = _Layer(
                    entry, tuple(entry.param.shape), final, units, keep_final, units
                )
        if self.method != "magnitude":
            check_calibratable([layer.entry for layer in layers.values()], self.method)
        self.layers = layers

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Checks that sharded parameters (FSDP2 and FSDP1 shard them after `setup`) can be
        pruned shard by shard, before any weight changes, and finds FSDP1's pieces."""
        strategy = type(trainer.strategy).__name__
        for layer in self.layers.values():
            check_shardable(layer.entry, self.pattern, strategy)
        shards = flat_shards(
            trainer.strategy.model, [layer.entry.param for layer in self.layers.values()], strategy
        )
        self._flat = {
            name: shards[id(layer.entry.param)]
            for name, layer in self.layers.items()
            if id(layer.entry.param) in shards
        }
        if self._flat:
            init_roots(trainer.strategy.model)
        self._sharded = bool(self._flat) or any(
            is_sharded(layer.entry.param) for layer in self.layers.values()
        )
        if self._sharded and self.method != "magnitude":
            raise RuntimeError(
                f"BalancedPruningCallback: method {self.method!r} needs whole weight matrices, "
                f"and {strategy} shards them; use method='magnitude', or prune before sharding "
                f"(bs_lightning.sparsity.oneshot.prune_calibrated_)"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolves `end_step`, restores masks after a resume, hooks the optimizers."""
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self.plan.record(pl_module)
        self._resolved_end = self._resolve_end(trainer)
        for layer in self.layers.values():
            if layer.mask is not None:
                self._install_mask(layer, layer.mask)
        self._update_effective()
        self._zero_optimizer_state(trainer)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [layer for layer in self.layers.values() if id(layer.entry.param) in params]
            self._hooks.append(
                optimizer.register_step_post_hook(
                    lambda *_args, _mine=mine: self._apply_masks(_mine, grads=False)
                )
            )

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # gradient accumulation calls this several times per optimizer step
        if step == self.last_pruned_step:
            return
        if all(layer.keep == layer.keep_final for layer in self.layers.values()):
            return  # target in place: nothing left to schedule
        if not is_pruning_step(step, self.start_step, self._resolved_end, self.frequency):
            return
        self.last_pruned_step = step
        if self.method == "magnitude":
            changed = self._prune(step, trainer)
        else:
            changed = self._prune_calibrated(trainer, pl_module)
        if changed:
            self.plan.record(pl_module)
            self._log(trainer, step)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._apply_masks(self.layers.values(), grads=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        self._apply_masks(self.layers.values(), grads=False)
        self.plan.record(pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.verbose and self.layers:
            rank_zero_info(self.summary_table())

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # a failed fit must not leave mask hooks on the user's optimizers
        self._remove_hooks()

    # ---------------------------------------------------------------- state

    @property
    def plan(self) -> SparsityPlan:
        """What this callback prunes how: every selected parameter with its pattern, target
        and the keep-count reached so far (the full count before its first pruning step).

        It is kept in the checkpoint state (`SparsityPlan.from_checkpoint`) and recorded for
        the model being trained (`SparsityPlan.recorded(model)`), which `convert_to_sparse`
        uses when no plan is passed.
        """
        return SparsityPlan(
            PlannedParam(
                layer.entry.module_name,
                layer.entry.param_name,
                self.pattern,
                layer.final,
                layer.keep,
                layer.shape,
            )
            for layer in self.layers.values()
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """Masks, keep-counts and schedule position, for an exact resume, and the plan."""
        return {
            "version": _STATE_VERSION,
            "pattern": self.pattern.to_dict(),
            "plan": self.plan.to_dict(),
            "end_step": self._resolved_end,
            "last_pruned_step": self.last_pruned_step,
            "layers": {
                name: {
                    "shape": layer.shape,
                    "keep": layer.keep,
                    # a sharded run's masks differ per rank: rebuilt from the zeros on resume
                    "mask": None
                    if layer.mask is None or self._sharded
                    else layer.mask.detach().cpu(),
                }
                for name, layer in self.layers.items()
            },
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keeps the state until `on_train_start`, when parameters and devices are known.

        Raises:
            ValueError: when the checkpoint was pruned with another pattern or option.
        """
        mine = self.pattern.to_dict()
        saved = state_dict.get("pattern", mine)
        if not isinstance(saved, Mapping):  # version 1: the name, and bank_size beside it
            saved = {"pattern": saved, "bank_size": state_dict.get("bank_size")}
        # the name first: options of another pattern mean nothing to this one
        keys = ["pattern"] + [key for key in mine if key != "pattern"]
        for key in keys:
            if saved.get(key, mine[key]) != mine[key]:
                raise ValueError(
                    f"checkpoint was pruned with {key}={saved[key]!r} but this callback "
                    f"has {key}={mine[key]!r}; resume with the same {key}"
                )
        self._loaded = state_dict

    def _restore(self, state: dict[str, Any]) -> None:
        saved = state.get("layers", {})
        if set(saved) != set(self.layers):
            raise ValueError(
                f"checkpoint prunes {sorted(saved)} but this callback selects "
                f"{sorted(self.layers)}; resume with the same include/exclude/sparsity"
            )
        for name, layer in self.layers.items():
            item = saved[name]
            if tuple(item["shape"]) != layer.shape:
                raise ValueError(
                    f"checkpoint mask for {name!r} has shape {tuple(item['shape'])}, the "
                    f"parameter has {layer.shape}"
                )
            if item["keep"] < layer.keep_final:
                raise ValueError(
                    f"checkpoint keeps {item['keep']} units per {self.pattern.unit_label!r} in "
                    f"{name!r}, fewer than this callback's target sparsity {layer.final} keeps "
                    f"({layer.keep_final}); the keep-count never goes up: resume with a "
                    f"sparsity at least the checkpoint's"
                )
        saved_end = state.get("end_step")
        if self.end_step is not None and saved_end is not None and self.end_step != saved_end:
            raise ValueError(
                f"checkpoint was pruned with end_step={saved_end} but this callback has "
                f"end_step={self.end_step}; resume with end_step={saved_end} or None"
            )
        for name, layer in self.layers.items():
            item = saved[name]
            layer.keep = item["keep"]
            if item["mask"] is not None:
                layer.mask = item["mask"].to(layer.entry.param.device)
            elif self._sharded and layer.keep < layer.units:
                # pruned weights are exact zeros: this rank's part of the mask
                layer.mask = local(layer.entry.param).detach() != 0
        self.last_pruned_step = state.get("last_pruned_step")
        if saved_end is not None:
            self._resolved_end = saved_end

    # ---------------------------------------------------------------- pruning

    def _resolve_end(self, trainer: Trainer) -> int:
        if self._resolved_end is not None:
            return self._resolved_end
        if self.end_step is not None:
            end = self.end_step
        else:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise ValueError(
                    "end_step=None needs a finite trainer.estimated_stepping_batches (set "
                    "max_steps or max_epochs with a sized dataloader), or pass end_step"
                )
            end = round(self.DEFAULT_END_FRACTION * total)
            if end <= self.start_step:
                raise ValueError(
                    f"end_step=None resolves to round({self.DEFAULT_END_FRACTION} * {total}) = "
                    f"{end}, not after start_step={self.start_step}; pass end_step explicitly"
                )
        total = trainer.estimated_stepping_batches
        if total != float("inf") and end > total:
            rank_zero_warn(
                f"BalancedPruningCallback: end_step={end} is after the last training step "
                f"({total}); the target sparsity will not be reached"
            )
        return end

    def _prune(self, step: int, trainer: Trainer) -> bool:
        """Lowers keep-counts to the schedule at `step`; True when any mask changed."""
        changed = False
        for unit, layers in self._pruning_groups():
            with nullcontext() if unit is None else full_params(unit):
                for layer in layers:
                    changed |= self._prune_layer(layer, step)
        if changed:
            self._update_effective()
            self._apply_masks(self.layers.values(), grads=False)
            self._zero_optimizer_state(trainer)
        return changed

    def _pruning_groups(self) -> list[tuple[Any, list[_Layer]]]:
        """`(None, layers)` for the layers each rank can rank on its own, then
        `(unit, layers)` per FSDP1 unit, whose parameters are gathered one unit at a time."""
        groups: dict[int, tuple[Any, list[_Layer]]] = {}
        for name, layer in self.layers.items():
            unit = self._flat[name].unit if name in self._flat else None
            groups.setdefault(id(unit), (unit, []))[1].append(layer)
        return sorted(groups.values(), key=lambda group: group[0] is not None)

    def _prune_layer(self, layer: _Layer, step: int) -> bool:
        """Lowers one layer's keep-count to the schedule at `step`; True when it changed.

        An FSDP1 layer is called inside `full_params` of its unit: its parameter has the full
        shape, the new mask is multiplied into it there (written back to every shard), and
        the layer keeps this rank's piece of it.
        """
        entry = layer.entry
        s_t = sparsity_at(
            self.schedule,
            step,
            self.start_step,
            self._resolved_end,
            layer.final,
            self.initial_sparsity,
        )
        flat = self._flat.get(entry.name)
        param = entry.param if flat is not None else local(entry.param)
        matrix = as_matrix(entry.module, param)
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(
                f"BalancedPruningCallback: {entry.name!r} has NaN or inf weights at "
                f"step {step}; masks ranked on them would be arbitrary (lower the learning "
                f"rate or clip gradients)"
            )
        shape = matrix_shape(entry)  # the whole matrix's: same keep on every rank
        keep = layer.units if s_t == 0.0 else self.pattern.keep(shape, s_t, entry.name)
        keep = max(layer.keep_final, min(layer.keep, keep))
        if keep == layer.keep:
            return False
        if layer.mask is None:
            prev = None
        elif flat is not None:
            # only this rank's piece of the mask is kept; pruned weights are exact zeros
            prev = matrix != 0
        else:
            prev = as_matrix(entry.module, layer.mask)
        mask = self.pattern.mask(matrix, keep, prev)
        new = matrix_to_param(entry.module, entry.param_name, mask, param.shape)
        layer.keep = keep
        if flat is not None:
            with torch.no_grad():
                param.mul_(new.to(param.dtype))
            new = local_piece(new, flat)
        # replicated weights: rank 0's mask everywhere; sharded: each rank its own part
        self._install_mask(layer, new if self._sharded else self._broadcast(new))
        return True

    def _calibration(self, trainer: Trainer) -> list:
        """The first `calibration_batches` batches of the train dataloader, on the device."""
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError(
                f"BalancedPruningCallback: method {self.method!r} calibrates on the train "
                f"dataloader, and the trainer has none"
            )
        return [
            trainer.strategy.batch_to_device(batch)
            for batch in islice(iter(loader), self.calibration_batches)
        ]

    def _prune_calibrated(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Every layer to its target at once by `method`, rank 0's result on every rank."""
        forward = self.calibration_forward or _forward_batch
        layers = list(self.layers.values())
        training = pl_module.training
        pl_module.eval()
        try:
            _, masks = prune_calibrated_(
                lambda batch: forward(pl_module, batch),
                [layer.entry for layer in layers],
                self.pattern,
                [layer.final for layer in layers],
                self.method,
                self._calibration(trainer),
            )
        finally:
            pl_module.train(training)
        for layer in layers:
            layer.keep = layer.keep_final
            # each rank calibrated on its own batches: rank 0's weights and masks everywhere
            _broadcast_(layer.entry.param.data)
            self._install_mask(layer, self._broadcast(masks[layer.entry.name]))
        self._update_effective()
        self._apply_masks(self.layers.values(), grads=False)
        self._zero_optimizer_state(trainer)
        return True

    @staticmethod
    def _broadcast(mask: Tensor) -> Tensor:
        """Rank 0's mask on every rank, so all ranks prune identically."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return mask
        as_bytes = mask.to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        return as_bytes.bool()

    def _install_mask(self, layer: _Layer, mask: Tensor) -> None:
        param = local(layer.entry.param)
        layer.mask = mask.to(param.device)
        # multiplying by a mask of the parameter's own dtype is the fastest in-place update
        layer.mask_mul = layer.mask.to(param.dtype)

    def _update_effective(self) -> None:
        """Each layer's fraction of zeros its mask imposes, over all ranks' parts of it
        (one all-reduce of counts when sharded)."""
        masked = [layer for layer in self.layers.values() if layer.mask is not None]
        if not masked:
            return
        counts = torch.tensor(
            [[int(layer.mask.sum()), layer.mask.numel()] for layer in masked], dtype=torch.int64
        )
        if self._sharded:
            device = masked[0].mask.device
            counts = global_counts(counts.to(device)).cpu()
        for layer, (kept, total) in zip(masked, counts.tolist(), strict=True):
            layer.effective = 1.0 - kept / total if total else 0.0

    @staticmethod
    @torch.no_grad()
    def _apply_masks(layers, grads: bool) -> None:
        """Multiplies masks into the parameters (or their gradients), grouped per dtype."""
        groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for layer in layers:
            if layer.mask_mul is None:
                continue
            param = layer.entry.param
            target = param.grad if grads else param
            if target is None:
                continue
            target = local(target)
            mask = layer.mask_mul
            if target.dtype != mask.dtype:  # e.g. fp32 gradients of a bf16 parameter
                mask = mask.to(target.dtype)
            group = groups.setdefault((target.device, target.dtype), ([], []))
            group[0].append(target)
            group[1].append(mask)
        for targets, masks in groups.values():
            torch._foreach_mul_(targets, masks)

    @torch.no_grad()
    def _zero_optimizer_state(self, trainer: Trainer) -> None:
        """Zeroes optimizer state (momentum, Adam moments) at pruned positions."""
        for optimizer in trainer.optimizers:
            for layer in self.layers.values():
                state = optimizer.state.get(layer.entry.param)
                if layer.mask is None or not state:
                    continue
                for value in state.values():
                    value = local(value) if isinstance(value, Tensor) else value
                    if isinstance(value, Tensor) and value.shape == layer.mask.shape:
                        value.mul_(layer.mask.to(value.dtype))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---------------------------------------------------------------- reporting

    def sparsity_report(self) -> dict[str, float]:
        """Effective sparsity per parameter (`"sparsity/<name>"`) and `"sparsity/overall"`."""
        report = {f"sparsity/{name}": layer.effective for name, layer in self.layers.items()}
        total = sum(math.prod(layer.shape) for layer in self.layers.values())
        pruned = sum(layer.effective * math.prod(layer.shape) for layer in self.layers.values())
        report["sparsity/overall"] = pruned / total if total else 0.0
        return report

    def _log(self, trainer: Trainer, step: int) -> None:
        if not trainer.is_global_zero:
            return
        metrics = self.sparsity_report()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def summary_table(self) -> str:
        """Markdown table: parameter, shape, pattern, keep-count, target and effective sparsity."""
        lines = [
            f"| parameter | shape | pattern | {self.pattern.unit_label} | target | effective |",
            "|---|---|---|---|---|---|",
        ]
        for name, layer in self.layers.items():
            shape = "x".join(str(d) for d in layer.shape)
            lines.append(
                f"| {name} | {shape} | {self.pattern.name} | {layer.keep} | "
                f"{layer.final:.4f} | {layer.effective:.4f} |"
            )
        overall = self.sparsity_report()["sparsity/overall"]
        lines.append(f"| overall | | | | | {overall:.4f} |")
        return f"BalancedPruningCallback summary: {self.pattern.describe()}\n" + "\n".join(lines)


def _forward_batch(pl_module: LightningModule, batch: Any) -> Any:
    """The default calibration forward: the inputs of an `(x, y)` batch, a mapping's keys."""
    if isinstance(batch, (tuple, list)):
        return pl_module(batch[0])
    if isinstance(batch, Mapping):
        return pl_module(**batch)
    return pl_module(batch)


def _broadcast_(tensor: Tensor) -> None:
    """Rank 0's values into `tensor` on every rank (nothing to do on one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
