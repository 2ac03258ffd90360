"""The best migration window from assessment history, on plain data."""

from __future__ import annotations

import math

import pytest

from vmigrate.plan.assessment import Assessment, DirtyWindow
from vmigrate.plan.window import WindowAdvice, best_window

MiB = 1 << 20
DAY = 86_400


def at(hour: int, rate_mib: float, day: int = 0, minute: int = 10, vm: str = "web-1",
       windows: bool = True) -> Assessment:
    dirty = (DirtyWindow(seconds=1.0, rate=rate_mib * MiB),) if windows else ()
    return Assessment(vm=vm, host="h1", at=day * DAY + hour * 3600 + minute * 60,
                      memory_bytes=1 << 30, dirty=dirty)


def linear(rate: float) -> float:
    """10 s plus 1 s per MiB/s of dirty rate."""
    return 10 + rate / MiB


def test_empty_history_gives_advice_without_a_window() -> None:
    advice = best_window([], linear)
    assert advice.best is None and advice.runner_up is None
    assert advice.unmeasured == tuple(range(24))
    assert any("assess" in m for m in advice.message)
    assert WindowAdvice.model_validate_json(advice.model_dump_json()) == advice


def test_lowest_cost_hour_with_median_and_iqr_by_hand() -> None:
    night = [at(3, r, day=d) for d, r in enumerate([1, 2, 3, 4, 100])]
    day = [at(14, r, day=d) for d, r in enumerate([40, 50, 60])]
    advice = best_window(night + day, linear)
    best = advice.best
    assert best is not None and best.hour == 3
    assert best.samples == 5
    assert best.dirty_median == 3 * MiB
    # inclusive quartiles of 1, 2, 3, 4, 100: 2 and 4
    assert (best.spread, best.dirty_low, best.dirty_high) == ("iqr", 2 * MiB, 4 * MiB)
    assert best.cost_s == 13 and (best.cost_low_s, best.cost_high_s) == (12, 14)
    runner = advice.runner_up
    assert runner is not None and runner.hour == 14
    assert (runner.spread, runner.dirty_low, runner.dirty_high) == ("range", 40 * MiB, 60 * MiB)
    assert runner.cost_s == 60
    assert advice.clearly_better
    assert advice.unmeasured == tuple(h for h in range(24) if h not in (3, 14))
    joined = "\n".join(advice.message)
    assert "03:00-04:00" in joined and "5 samples" in joined
    assert "clearly better" in joined and "not clearly" not in joined
    assert "22 of 24" in joined


def test_overlapping_ranges_are_not_clearly_better() -> None:
    a = [at(2, r, day=d) for d, r in enumerate([5, 10, 15])]    # median 10, cost 15..25
    b = [at(4, r, day=d) for d, r in enumerate([8, 12, 30])]    # median 12, cost 18..40
    advice = best_window(a + b, linear)
    assert advice.best is not None and advice.best.hour == 2
    assert not advice.clearly_better
    assert any("not clearly better" in m for m in advice.message)


def test_single_samples_never_count_as_clearly_better() -> None:
    advice = best_window([at(1, 1), at(9, 90)], linear)
    assert advice.best is not None and advice.best.hour == 1
    assert advice.best.spread == "none"
    assert not advice.clearly_better
    assert any("spread is unknown" in m for m in advice.message)


def test_utc_offset_shifts_the_hour() -> None:
    sample = at(23, 1, minute=30)
    plain = best_window([sample], linear)
    assert plain.best is not None and plain.best.hour == 23
    shifted = best_window([sample], linear, utc_offset_s=3600)
    assert shifted.best is not None and shifted.best.hour == 0
    assert "UTC+01:00" in shifted.message[0]
    west = best_window([sample], linear, utc_offset_s=-5 * 3600)
    assert west.best is not None and west.best.hour == 18
    assert "UTC-05:00" in west.message[0]


def test_ties_go_to_the_lower_dirty_rate_then_the_earlier_hour() -> None:
    flat = best_window([at(8, 5), at(6, 7), at(20, 3)], lambda rate: 42.0)
    assert flat.best is not None and flat.best.hour == 20
    same = best_window([at(8, 5), at(6, 5)], lambda rate: 42.0)
    assert same.best is not None and same.best.hour == 6


def test_min_samples_keeps_thin_hours_out() -> None:
    history = [at(2, 1)] + [at(10, 20, day=d) for d in range(3)]
    advice = best_window(history, linear, min_samples=2)
    assert advice.best is not None and advice.best.hour == 10
    thin = next(h for h in advice.hours if h.hour == 2)
    assert not thin.eligible
    assert any("Fewer than 2" in m and "02" in m for m in advice.message)
    none = best_window(history, linear, min_samples=5)
    assert none.best is None
    assert any("5 samples" in m for m in none.message)


def test_infinite_cost_ranks_last_and_serialises() -> None:
    def cost(rate: float) -> float:
        return math.inf if rate > 50 * MiB else rate / MiB

    advice = best_window([at(1, 80), at(2, 40)], cost)
    assert advice.best is not None and advice.best.hour == 2
    assert advice.runner_up is not None and advice.runner_up.cost_s is None
    assert any("no finish" in m for m in advice.message)
    assert WindowAdvice.model_validate_json(advice.model_dump_json()) == advice


def test_assessments_without_dirty_windows_are_left_out() -> None:
    advice = best_window([at(5, 0, windows=False), at(7, 3)], linear)
    assert advice.best is not None and advice.best.hour == 7
    assert (advice.used, advice.skipped) == (1, 1)
    assert 5 in advice.unmeasured
    only = best_window([at(5, 0, windows=False)], linear)
    assert only.best is None and only.skipped == 1


def test_dirty_rate_is_the_assessments_mean() -> None:
    a = Assessment(vm="web-1", host="h1", at=3 * 3600, memory_bytes=1,
                   dirty=(DirtyWindow(seconds=1, rate=10 * MiB),
                          DirtyWindow(seconds=3, rate=2 * MiB)))
    advice = best_window([a], linear)
    assert advice.best is not None and advice.best.dirty_median == pytest.approx(4 * MiB)


def test_caller_errors() -> None:
    with pytest.raises(ValueError):
        best_window([at(1, 1, vm="a"), at(2, 1, vm="b")], linear)
    with pytest.raises(ValueError):
        best_window([], linear, min_samples=0)


def test_unmeasured_hours_are_listed_as_ranges() -> None:
    history = [at(h, 1) for h in (0, 1, 2, 3, 6)]
    advice = best_window(history, linear)
    assert any("04-05, 07-23" in m for m in advice.message)
