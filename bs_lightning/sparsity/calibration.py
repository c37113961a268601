"""Calibration for one-shot pruning without retraining: Wanda scores (Sun et al. 2023).

Wanda ranks weight `W[o, c]` by `|W[o, c]| * ||X[:, c]||_2`, the norm of input column `c`
over calibration inputs: a small weight on a loud input matters more than a large one on a
quiet input. With balanced banks the scores are ranked per bank (`k` of `B`), which is the
N:M case Wanda supports (N = k, M = B).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from bs_lightning.sparsity.params import PrunableParam

__all__ = ["input_norms", "wanda_scores"]


@torch.no_grad()
def input_norms(
    run: Callable[[object], object], params: Sequence[PrunableParam], batches: Iterable
) -> dict[str, torch.Tensor]:
    """`||X[:, c]||_2` of every parameter's module input over the calibration batches.

    Args:
        run: called with each batch (e.g. `lambda b: model(**b)`); runs the model.
        params: the parameters whose modules' inputs are measured (`[..., in]` inputs:
            `nn.Linear`, GPT-2 `Conv1D`).
        batches: the calibration batches, at least one.

    Returns:
        Parameter name -> float32 `[in]` column norms.

    Raises:
        ValueError: for no batch, or a batch `run` fails on (naming its index and the
            error); the model's weights are never changed.
    """
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().float()
            squares = x.reshape(-1, x.shape[-1]).square().sum(0)
            sums[name] = squares if name not in sums else sums[name] + squares

        return hook

    handles = [p.module.register_forward_pre_hook(hook_for(p.name)) for p in params]
    count = 0
    try:
        for count, batch in enumerate(batches, start=1):
            try:
                run(batch)
            except Exception as err:  # any failure of the user's batch, reported as one line
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(
                    f"calibration batch {count - 1} cannot be run by the model: "
                    f"{type(err).__name__}: {first}"
                ) from err
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration is empty: pass at least one batch of model inputs")
    missing = [p.name for p in params if p.name not in sums]
    if missing:
        raise ValueError(f"the calibration batches never reached {missing[:5]}")
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_scores(
    params: Sequence[PrunableParam], norms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`|W| * ||X_c||` per parameter, `[out, in]` like its matrix view (float32)."""
    return {
        p.name: p.matrix().detach().float().abs() * norms[p.name].to(p.param.device)[None, :]
        for p in params
    }
