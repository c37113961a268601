"""Schedules (cubic Zhu & Gupta, linear, constant) and pruning steps."""

import pytest

from bs_lightning.sparsity import check_schedule, is_pruning_step, keep_count, sparsity_at


@pytest.mark.parametrize(
    ("step", "expected"),
    # s_t = 0.9 + (0 - 0.9) * (1 - (t - 100) / 1000) ** 3
    [
        (0, 0.0),
        (99, 0.0),
        (100, 0.0),
        (200, 0.9 - 0.9 * 0.9**3),
        (600, 0.9 - 0.9 * 0.5**3),
        (1100, 0.9),
        (5000, 0.9),
    ],
)
def test_cubic_values(step, expected):
    assert sparsity_at("cubic", step, 100, 1100, 0.9) == pytest.approx(expected)


def test_cubic_with_initial_sparsity():
    # halfway: 0.8 + (0.5 - 0.8) * 0.125
    assert sparsity_at("cubic", 50, 0, 100, 0.8, initial=0.5) == pytest.approx(0.7625)


@pytest.mark.parametrize(("step", "expected"), [(10, 0.0), (35, 0.2), (60, 0.4), (90, 0.4)])
def test_linear_values(step, expected):
    assert sparsity_at("linear", step, 10, 60, 0.4) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["constant", "one_shot"])
def test_constant_is_one_shot(name):
    assert sparsity_at(name, 4, 5, 50, 0.7) == 0.0
    assert sparsity_at(name, 5, 5, 50, 0.7) == 0.7
    assert sparsity_at(name, 30, 5, 50, 0.7) == 0.7


def test_cubic_keep_count_never_increases():
    ks = [keep_count(32, sparsity_at("cubic", t, 0, 1000, 0.9)) for t in range(0, 1200, 7)]
    assert all(a >= b for a, b in zip(ks, ks[1:], strict=False))
    assert ks[0] == 32 and ks[-1] == 3


def test_pruning_steps():
    steps = [t for t in range(0, 400) if is_pruning_step(t, 50, 305, 100)]
    assert steps[:4] == [50, 150, 250, 305]
    assert all(is_pruning_step(t, 50, 305, 100) for t in range(305, 400))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ("quadratic", 0, None, 1),
            r"schedule must be one of \['constant', 'cubic', 'linear', 'one_shot'\], got 'quadratic'",
        ),
        (("cubic", -1, None, 1), r"start_step must be an integer >= 0, got -1"),
        (("cubic", 0, None, 0), r"frequency must be an integer >= 1, got 0"),
        (("cubic", 10, 10, 1), r"end_step must be None or an integer > start_step=10, got 10"),
        (("cubic", 0, 2.5, 1), r"end_step must be None or an integer > start_step=0, got 2.5"),
    ],
)
def test_check_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        check_schedule(*args)


def test_check_schedule_accepts_valid():
    check_schedule("linear", 0, 100, 10)
    check_schedule("cubic", 5, None, 1)
