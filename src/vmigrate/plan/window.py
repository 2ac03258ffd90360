"""The best time of day to migrate a VM, from its assessment history (``plan --window``).

:func:`best_window` groups a VM's stored assessments by local hour of day and, per
hour, takes the median dirty rate, its spread, and the predicted migration cost
of that median (the caller's ``cost`` function: seconds for a dirty rate, e.g.
the live model's total time). The best hour is the cheapest (ties: the lower
dirty rate, then the earlier hour). The advice says how sure it is: the samples
behind it, the spread, whether its cost range overlaps the next best hour's
(then it is *not clearly better*), and the hours never measured.

Spread: the interquartile range (``statistics.quantiles``, inclusive method) with
four samples or more, else min..max; a single sample has no spread to show. The
cost range is the cost of the spread's two ends. A cost that is not finite (the
model predicts no finish) is stored as None and ranks last.

Pure: no I/O, no clock; assessments without a dirty-rate window are left out
(they measured nothing about the guest's writes).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vmigrate.plan.assessment import Assessment

__all__ = ["HourStats", "WindowAdvice", "best_window"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HourStats(_Frozen):
    """What the history says about one local hour of day."""

    #: local hour, 0..23 (the window is hour:00 to hour+1:00)
    hour: int = Field(ge=0, le=23)
    samples: int = Field(ge=1)
    #: bytes/s
    dirty_median: float = Field(ge=0)
    #: the spread's ends, bytes/s (IQR with >= 4 samples, else min..max)
    dirty_low: float = Field(ge=0)
    dirty_high: float = Field(ge=0)
    spread: Literal["iqr", "range", "none"]
    #: predicted migration seconds at the median; None = the model sees no finish
    cost_s: float | None
    #: the cost of the spread's ends, lower first (None = no finish)
    cost_low_s: float | None
    cost_high_s: float | None
    #: has at least min_samples samples (only those can be advised)
    eligible: bool = True


class WindowAdvice(_Frozen):
    """The advised window and how sure it is."""

    #: None when no hour has enough samples
    best: HourStats | None
    #: the next cheapest eligible hour
    runner_up: HourStats | None = None
    #: the best hour's cost range does not overlap the runner-up's, and both have
    #: at least two samples
    clearly_better: bool = False
    #: every measured hour, by hour
    hours: tuple[HourStats, ...] = ()
    #: local hours with no sample at all
    unmeasured: tuple[int, ...] = tuple(range(24))
    utc_offset_s: int = 0
    #: assessments used (with a dirty-rate window)
    used: int = 0
    #: assessments left out (no dirty-rate window)
    skipped: int = 0
    #: sentences for the operator
    message: tuple[str, ...]


def _fmt_rate(rate: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if rate >= size:
            return f"{rate / size:.3g} {unit}/s"
    return f"{rate:.0f} B/s"


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "no finish"
    if seconds < 60:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.3g} min"


def _fmt_hour(hour: int) -> str:
    return f"{hour:02d}:00-{(hour + 1) % 24:02d}:00"


def _fmt_offset(offset_s: int) -> str:
    sign = "+" if offset_s >= 0 else "-"
    minutes = abs(offset_s) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _hour_ranges(hours: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"00-02, 05"``."""
    parts: list[str] = []
    run: list[int] = []
    for hour in sorted(hours):
        if run and hour == run[-1] + 1:
            run.append(hour)
            continue
        if run:
            parts.append(f"{run[0]:02d}" if len(run) == 1 else f"{run[0]:02d}-{run[-1]:02d}")
        run = [hour]
    if run:
        parts.append(f"{run[0]:02d}" if len(run) == 1 else f"{run[0]:02d}-{run[-1]:02d}")
    return ", ".join(parts)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _stats(hour: int, rates: list[float], cost: Callable[[float], float],
           min_samples: int) -> HourStats:
    rates = sorted(rates)
    median = statistics.median(rates)
    spread: Literal["iqr", "range", "none"]
    if len(rates) >= 4:
        q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive")
        low, high, spread = q1, q3, "iqr"
    elif len(rates) >= 2:
        low, high, spread = rates[0], rates[-1], "range"
    else:
        low = high = median
        spread = "none"
    ends = [_finite(cost(low)), _finite(cost(high))]
    known = [c for c in ends if c is not None]
    cost_low = min(known) if known else None
    cost_high = None if None in ends else max(known)
    return HourStats(
        hour=hour, samples=len(rates), dirty_median=median, dirty_low=low, dirty_high=high,
        spread=spread, cost_s=_finite(cost(median)), cost_low_s=cost_low,
        cost_high_s=cost_high, eligible=len(rates) >= min_samples,
    )


def _rank(stats: HourStats) -> tuple[float, float, int]:
    return (math.inf if stats.cost_s is None else stats.cost_s, stats.dirty_median, stats.hour)


def _overlap(a: HourStats, b: HourStats) -> bool:
    a_low = math.inf if a.cost_low_s is None else a.cost_low_s
    a_high = math.inf if a.cost_high_s is None else a.cost_high_s
    b_low = math.inf if b.cost_low_s is None else b.cost_low_s
    b_high = math.inf if b.cost_high_s is None else b.cost_high_s
    return a_low <= b_high and b_low <= a_high


def _describe(stats: HourStats) -> str:
    samples = f"{stats.samples} sample{'s' if stats.samples != 1 else ''}"
    text = f"median dirty rate {_fmt_rate(stats.dirty_median)} over {samples}"
    if stats.spread == "iqr":
        text += (f" (interquartile range {_fmt_rate(stats.dirty_low)} to "
                 f"{_fmt_rate(stats.dirty_high)})")
    elif stats.spread == "range":
        text += f" (from {_fmt_rate(stats.dirty_low)} to {_fmt_rate(stats.dirty_high)})"
    text += f", predicted migration {_fmt_s(stats.cost_s)}"
    if stats.spread != "none" and stats.cost_low_s != stats.cost_high_s:
        text += f" ({_fmt_s(stats.cost_low_s)} to {_fmt_s(stats.cost_high_s)})"
    return text


def best_window(
    history: Sequence[Assessment],
    cost: Callable[[float], float],
    *,
    utc_offset_s: int = 0,
    min_samples: int = 1,
) -> WindowAdvice:
    """The local hour of day with the lowest predicted migration cost, and how sure.

    ``history`` is one VM's assessments (any order); ``cost`` gives predicted
    migration seconds for a dirty rate in bytes/s; ``utc_offset_s`` shifts the
    epoch timestamps to local time; hours with fewer than ``min_samples``
    samples are shown but never advised. Never raises for an empty or thin
    history: ``best`` is None and the message says why. Raises ValueError when
    the history mixes VMs or ``min_samples`` < 1 (caller errors).
    """
    if min_samples < 1:
        raise ValueError("min_samples must be at least 1")
    if len({a.vm for a in history}) > 1:
        raise ValueError("the history mixes VMs: pass one VM's assessments")
    used = [a for a in history if a.dirty]
    skipped = len(history) - len(used)
    by_hour: dict[int, list[float]] = {}
    for a in used:
        hour = int(((a.at + utc_offset_s) % 86_400) // 3600)
        by_hour.setdefault(hour, []).append(a.dirty_rate)
    hours = tuple(_stats(h, by_hour[h], cost, min_samples) for h in sorted(by_hour))
    unmeasured = tuple(h for h in range(24) if h not in by_hour)
    zone = _fmt_offset(utc_offset_s)

    def advice(best: HourStats | None, runner: HourStats | None, clearly: bool,
               message: Sequence[str | None]) -> WindowAdvice:
        return WindowAdvice(
            best=best, runner_up=runner, clearly_better=clearly, hours=hours,
            unmeasured=unmeasured, utc_offset_s=utc_offset_s, used=len(used),
            skipped=skipped, message=tuple(m for m in message if m),
        )

    left_out = (f"{skipped} assessment{'s' if skipped != 1 else ''} without a dirty-rate "
                "measurement left out.") if skipped else None

    ranked = sorted((s for s in hours if s.eligible), key=_rank)
    if not ranked:
        if not used:
            text = ("No assessment with a dirty-rate measurement in the history: run "
                    "`vmigrate assess` at different times of day first.")
        else:
            text = (f"No hour has {min_samples} samples yet (most: "
                    f"{max(s.samples for s in hours)}): assess more often before choosing "
                    "a window.")
        return advice(None, None, False, (text, left_out))

    best = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    message: list[str | None] = [f"Best window {_fmt_hour(best.hour)} ({zone}): {_describe(best)}."]
    clearly = False
    if runner is None:
        message.append("No other hour to compare with: it is the only one with enough "
                       "samples.")
    else:
        message.append(f"Next best {_fmt_hour(runner.hour)}: {_describe(runner)}.")
        if best.samples < 2 or runner.samples < 2:
            message.append("Too few samples to know the spread: not clearly better.")
        elif _overlap(best, runner):
            message.append(f"The predicted ranges overlap: {best.hour:02d}:00 is not clearly "
                           "better.")
        else:
            clearly = True
            message.append(f"The predicted ranges do not overlap: {best.hour:02d}:00 is "
                           "clearly better.")
    if best.spread == "none":
        message.append(f"A single sample at {best.hour:02d}:00: its spread is unknown.")
    thin = [s.hour for s in hours if not s.eligible]
    if thin:
        message.append(f"Fewer than {min_samples} samples (not advised): "
                       f"{_hour_ranges(thin)}.")
    if unmeasured:
        message.append(f"Never measured: {_hour_ranges(unmeasured)} ({len(unmeasured)} of 24 "
                       "hours); one of them could be better.")
    message.append(left_out)
    return advice(best, runner, clearly, message)
