"""Calibration for one-shot pruning without retraining: what a layer sees on real inputs.

Wanda (Sun et al. 2023) ranks weight `W[o, c]` by `|W[o, c]| * ||X[:, c]||_2`, the norm of
input column `c` over calibration inputs: a small weight on a loud input matters more than a
large one on a quiet input. SparseGPT (Frantar & Alistarh 2023) needs each layer's Hessian
`X^T X` of the same inputs, captured layer after layer from a model whose earlier layers are
already pruned. Both see a layer's input as rows `X [rows, in]` matching the columns of its
`[out, in]` matrix view (`input_rows`).

Every function here only reads the model: the weights change in `bs_lightning.sparsity.oneshot`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from bs_lightning.sparsity.params import PrunableParam, is_transposed

__all__ = [
    "CALIBRATED_LAYERS",
    "check_calibratable",
    "input_hessians",
    "input_norms",
    "input_rows",
    "run_batches",
    "run_inputs",
    "stages",
    "wanda_scores",
]

# the layers whose inputs map onto the columns of their weight's matrix view
CALIBRATED_LAYERS = (
    "nn.Linear (not nn.MultiheadAttention's), Hugging Face Conv1D, nn.Conv1d/nn.Conv2d (groups=1)"
)


class _Stop(Exception):
    """Ends a calibration forward pass once the layers being measured have their inputs."""


def run_inputs(model: nn.Module) -> Callable[[object], object]:
    """The default way to run `model` on one calibration batch.

    A mapping is passed as keyword arguments (a tokenizer's output), a tuple or list as
    positional arguments, anything else as the one argument.
    """

    def run(batch):
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)

    return run


def _unsupported(p: PrunableParam) -> str | None:
    """Why `p`'s inputs do not map onto its matrix columns, or None when they do."""
    m = p.module
    if p.param_name != "weight":
        return f"its parameter {p.param_name!r} is not a layer's input weight"
    if isinstance(m, NonDynamicallyQuantizableLinear):
        return "it is nn.MultiheadAttention's out_proj, which its forward never calls"
    if isinstance(m, nn.Linear) or is_transposed(m):
        return None
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if m.groups != 1:
            return f"it is a grouped convolution (groups={m.groups})"
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            return f"its padding ({m.padding!r}, {m.padding_mode}) is not explicit zeros"
        return None
    return f"it is a {type(m).__name__}"


def check_calibratable(params: Sequence[PrunableParam], method: str) -> None:
    """Raises before any weight changes when a layer's inputs cannot calibrate `method`.

    Raises:
        TypeError: naming the layers, why, and the layers that are supported.
    """
    bad = [(p.name, why) for p in params if (why := _unsupported(p)) is not None]
    if bad:
        listed = "; ".join(f"{name}: {why}" for name, why in bad[:6])
        raise TypeError(
            f"method {method!r} calibrates on layer inputs, supported for {CALIBRATED_LAYERS}; "
            f"{len(bad)} selected parameter(s) are not ({listed}): exclude them or use "
            f"method='magnitude'"
        )


def input_rows(p: PrunableParam, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its matrix view's columns.

    Args:
        p: a parameter `check_calibratable` accepts.
        x: the module's input: `[..., in]` for Linear/Conv1D, `[N, C, (H,) W]` for convs.

    Returns:
        float32 `[rows, in]`: one row per token / output position, columns ordered as the
        `[out, in]` matrix view's (`in = C * prod(kernel)` for convolutions).
    """
    m = p.module
    x = x.detach().float()
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if isinstance(m, nn.Conv1d):  # as a convolution of height 1
            x = x.unsqueeze(-2)
            kernel, dilation = (1, m.kernel_size[0]), (1, m.dilation[0])
            padding, stride = (0, 0 if m.padding == "valid" else m.padding[0]), (1, m.stride[0])
        else:
            kernel, dilation, stride = m.kernel_size, m.dilation, m.stride
            padding = (0, 0) if m.padding == "valid" else m.padding
        if x.dim() == 3:  # an unbatched input
            x = x.unsqueeze(0)
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N * L, C * kernel]
    return x.reshape(-1, x.shape[-1])


def run_batches(run: Callable[[object], object], batches: Sequence, first: int = 0) -> None:
    """Runs every batch; a batch the model fails on is one clear error.

    Args:
        run: runs the model on one batch.
        batches: the batches.
        first: the index of `batches[0]` in the whole calibration, for messages.

    Raises:
        ValueError: for no batch, or a batch `run` fails on (naming its index and the error).
    """
    if not batches:
        raise ValueError("calibration is empty: pass at least one batch of model inputs")
    for index, batch in enumerate(batches, start=first):
        try:
            run(batch)
        except _Stop:
            continue
        except Exception as err:  # any failure of the user's batch, reported as one line
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"calibration batch {index} cannot be run by the model: "
                f"{type(err).__name__}: {first}"
            ) from err


def _run_hooked(run, params, batches, make_hook, reached: dict) -> None:
    """Runs the batches without gradients with `make_hook(p)` as a forward pre-hook of every
    layer, which records the layers it saw in `reached`; all must be reached."""
    handles = [p.module.register_forward_pre_hook(make_hook(p)) for p in params]
    try:
        with torch.no_grad():
            run_batches(run, batches)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p.name for p in params if p.name not in reached]
    if missing:
        raise ValueError(f"the calibration batches never reach {missing[:5]}")


@dataclass
class _Seen:
    """What one discovery pass saw of a layer."""

    order: int  # position of its first call in the forward pass
    calls: int  # calls per forward pass
    source: tuple  # identity of its first input (storage, shape, strides)


def stages(
    run: Callable[[object], object], params: Sequence[PrunableParam], batch
) -> tuple[list[list[PrunableParam]], bool]:
    """The layers in the order one forward pass calls them, grouped by shared input.

    Consecutive layers fed the very same tensor (e.g. the query, key and value projections)
    form one stage: they can be measured in one pass, and none is fed by another.

    Args:
        run: runs the model on one batch (e.g. `run_inputs(model)`).
        params: the layers to order.
        batch: one calibration batch.

    Returns:
        `(stages, once)`: the stages in call order, and whether every layer is called once
        per pass (then a measuring pass may stop after the stage's last layer).

    Raises:
        ValueError: when the batch cannot be run, or never reaches a layer (naming it).
    """
    seen: dict[str, _Seen] = {}
    counter = itertools.count()

    def hook_for(name: str):
        def hook(module, args):
            if name in seen:
                seen[name].calls += 1
                return
            x = args[0]
            source = (x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride())
            seen[name] = _Seen(next(counter), 1, source)

        return hook

    _run_hooked(run, params, [batch], lambda p: hook_for(p.name), seen)
    ordered = sorted(params, key=lambda p: seen[p.name].order)
    groups: list[list[PrunableParam]] = []
    for p in ordered:
        if groups and seen[groups[-1][-1].name].source == seen[p.name].source:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups, all(s.calls == 1 for s in seen.values())


def _measure(
    run: Callable[[object], object],
    params: Sequence[PrunableParam],
    batches: Sequence,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    stop_early: bool = False,
) -> dict[str, torch.Tensor]:
    """Sums `reduce(input_rows)` per layer over the batches; with `stop_early`, each pass
    ends right after the last of `params` has its input."""
    sums: dict[str, torch.Tensor] = {}
    last = params[-1].name

    def hook_for(p: PrunableParam):
        def hook(module, args):
            value = reduce(input_rows(p, args[0]))
            sums[p.name] = value if p.name not in sums else sums[p.name] + value
            if stop_early and p.name == last:
                raise _Stop

        return hook

    _run_hooked(run, params, batches, hook_for, sums)
    return sums


def input_norms(
    run: Callable[[object], object], params: Sequence[PrunableParam], batches: Sequence
) -> dict[str, torch.Tensor]:
    """`||X[:, c]||_2` of every layer's input columns over the calibration batches.

    Args:
        run: runs the model on one batch (e.g. `run_inputs(model)`).
        params: layers `check_calibratable` accepts.
        batches: the calibration batches, at least one.

    Returns:
        Parameter name -> float32 `[in]` column norms.

    Raises:
        ValueError: for no batch, or a batch `run` fails on (naming its index and the
            error), or a layer no batch reaches; the model's weights are never changed.
    """
    sums = _measure(run, params, batches, lambda rows: rows.square().sum(0))
    return {name: total.sqrt() for name, total in sums.items()}


def input_hessians(
    run: Callable[[object], object],
    params: Sequence[PrunableParam],
    batches: Sequence,
    stop_early: bool = False,
) -> dict[str, torch.Tensor]:
    """`X^T X` of every layer's input rows over the calibration batches (SparseGPT).

    Args:
        run: runs the model on one batch.
        params: layers `check_calibratable` accepts, e.g. one stage of `stages`.
        batches: the calibration batches, at least one.
        stop_early: end each pass after the last of `params` (in call order) has its input;
            only valid when every layer is called once per pass.

    Returns:
        Parameter name -> float32 `[in, in]`.

    Raises:
        ValueError: as `input_norms`.
    """
    return _measure(run, params, batches, lambda rows: rows.T @ rows, stop_early)


def wanda_scores(
    params: Sequence[PrunableParam], norms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`|W| * ||X_c||` per parameter, `[out, in]` like its matrix view (float32)."""
    return {
        p.name: p.matrix().detach().float().abs() * norms[p.name].to(p.param.device)[None, :]
        for p in params
    }
