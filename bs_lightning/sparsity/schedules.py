"""Sparsity schedules over optimizer steps, and the steps at which pruning happens.

- "cubic" (Zhu & Gupta 2017, "To prune or not to prune"):
  `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3` for `t0 <= t <= t1`.
- "linear": `s_t = s_i + (s_f - s_i) * (t - t0) / (t1 - t0)`.
- "constant" (alias "one_shot"): `s_t = s_f` from `t0` on.

Before `t0` the sparsity is 0 (nothing pruned); from `t1` on it is `s_f`. Masks are
recomputed at `t0, t0 + frequency, t0 + 2 * frequency, ...` while `t < t1`, and once more at
the first step `t >= t1` so the target is always reached exactly.
"""

from __future__ import annotations

from bs_lightning.validation import check_int

__all__ = ["SCHEDULES", "check_schedule", "is_pruning_step", "sparsity_at"]


def _cubic(progress: float, initial: float, final: float) -> float:
    return final + (initial - final) * (1.0 - progress) ** 3


def _linear(progress: float, initial: float, final: float) -> float:
    return initial + (final - initial) * progress


def _constant(progress: float, initial: float, final: float) -> float:
    return final


# config string -> s(progress in [0, 1], initial, final)
SCHEDULES = {"cubic": _cubic, "linear": _linear, "constant": _constant, "one_shot": _constant}


def check_schedule(schedule: str, start_step: int, end_step: int | None, frequency: int) -> None:
    """Validates schedule arguments.

    Args:
        schedule: one of `SCHEDULES`.
        start_step: first pruning step `t0 >= 0`.
        end_step: step `t1 > t0` at which the target is reached, or None (decided later).
        frequency: steps between mask updates, >= 1.

    Raises:
        ValueError: naming the bad argument and its valid values.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    check_int(start_step, "start_step", 0)
    check_int(frequency, "frequency", 1)
    if end_step is not None and (
        isinstance(end_step, bool) or not isinstance(end_step, int) or end_step <= start_step
    ):
        raise ValueError(
            f"end_step must be None or an integer > start_step={start_step}, got {end_step!r}"
        )


def sparsity_at(
    schedule: str,
    step: int,
    start_step: int,
    end_step: int,
    final: float,
    initial: float = 0.0,
) -> float:
    """Scheduled sparsity at optimizer step `step`.

    Args:
        schedule: one of `SCHEDULES`.
        step: optimizer step `t` (`trainer.global_step`).
        start_step: `t0`.
        end_step: `t1 > t0`.
        final: target sparsity `s_f`.
        initial: sparsity `s_i` at `t0`.

    Returns:
        `s_t`: 0 before `t0`, `s_f` from `t1` on, the schedule in between.
    """
    if step < start_step:
        return 0.0
    progress = min(1.0, (step - start_step) / (end_step - start_step))
    return SCHEDULES[schedule](progress, initial, final)


def is_pruning_step(step: int, start_step: int, end_step: int, frequency: int) -> bool:
    """True when masks are recomputed at `step` (see the module docstring).

    The first step at or after `end_step` is a pruning step only if it was not reached by
    the frequency grid; callers skip it when the target is already in place.
    """
    if step < start_step:
        return False
    return step >= end_step or (step - start_step) % frequency == 0
