"""The adaptive convergence policy: plan the path that finishes soonest within the
limits, and plan it again after every pass (pure: no I/O, no clock).

A fixed policy (``balanced``, Nova's downtime steps, Proxmox's doubling) climbs a
ladder on a stall counter. This one uses the models instead: a *path* is a way to
finish a memory migration from where it stands --

* ``precopy``: pre-copy at a downtime limit (nothing else);
* ``throttle``: pre-copy with the guest's CPUs throttled from the next pass (at a
  starting percentage, raised by QEMU's auto-converge while it does not converge);
* ``postcopy``: switch to post-copy now, or after one or two more passes;
* ``pause``: stop the guest at the next pass end and copy the rest;
* ``policy``: one of the fixed built-in schedules, run from here.

Each path is a fixed schedule (:class:`~vmigrate.plan.policy.Policy`) the real
:class:`~vmigrate.plan.convergence.ConvergenceController` follows, and
:func:`simulate` runs it from a :class:`Situation` with
:class:`~vmigrate.plan.simulate.SimulatedMigration`, the physics the predictions
use. :func:`choose` keeps the paths that finish within the time budget, whose
downtime stays within the limit, and that the tier allows (post-copy only where
allowed); of those it takes

1. the plain pre-copy (at :data:`MIN_LIMIT_MS` or more) with the *lowest* predicted
   downtime whose time is within
   ``slack`` (50 %) of the fastest path: a guest that converges gets the lowest
   downtime limit that converges in good time, down to what it keeps rewriting
   over the bandwidth (the floor), and no post-copy (whose page faults over the
   link stall the guest longer than its switch shows, and whose link failure
   splits the guest between the hosts);
2. else the fastest path (ties: the lower downtime).

Nothing left means nothing finishes within the limits: the caller refuses before
the migration starts (an assessment said so) or lets the policy's timeout decide.

:class:`AdaptiveController` has the controller's interface. It plans at the start
from the assessment, or without one starts a plain pre-copy at the lowest limit
(the first pass is the measurement); at every pass end it replaces the
assumptions with what QEMU measured (the dirty rate of the pass, its throughput,
what is left) and plans again, keeping the current path unless the new one is
clearly better. A pass's dirty rate is a noisy figure: it is what the pass found
dirty over its length, so a guest rewriting its working set faster than a pass
saturates it (a lower figure replaces the assessment's only when the pass also
left clearly less), and a plain pre-copy whose passes keep shrinking (each leaves
at most 80 % of the one before) is converging as planned and is not planned
again. Every change of path is a decision
(:meth:`~AdaptiveController.take_decisions`, audited by the engine) and a step in
the report.

It also *paces* the stream: unless the operator capped the bandwidth, it sets
``max-bandwidth`` (and ``max-postcopy-bandwidth``) to :data:`PACE` of the link as
measured: by the assessment's probe, else by QEMU's own throughput over the first
pass. QEMU writes as fast as the socket takes, so an
unpaced migration keeps the link's queues full (the socket's send buffer, the
switch's buffer): at the switchover the guest is stopped until that backlog has
drained, which QEMU's own downtime figure does not count, and in post-copy every page
the guest faults on waits behind it. In the lab (200 mbit, tbf) pacing took the
observed downtime of an idle guest from 103-146 ms to 44-51 ms, of a guest at half the
link from 165-168 to 118-138 ms, and a post-copy guest's stall from 930-1060 to
620 ms, for 0-8 % more time (docs/BENCHMARKS.md). The simulation's ``backlog_ms``
applies only to an unpaced stream.

Two bounds come from the lab, not from the models: a plain pre-copy is planned at
:data:`MIN_LIMIT_MS` or more, and post-copy is enabled only when the assessment
leaves it a chance of being needed (:func:`postcopy_worth_enabling`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from vmigrate.plan.capabilities import (
    UNLIMITED_BANDWIDTH,
    MigrationOptions,
    MigrationSetup,
    plan_setup,
    throttle_parameters,
)
from vmigrate.plan.convergence import (
    Action,
    ConvergenceController,
    Sample,
    SetParameters,
    StartPostcopy,
    StepRecord,
)
from vmigrate.plan.policy import BUILTIN, Policy, Step
from vmigrate.plan.simulate import SimulatedMigration, drive_sparse

__all__ = [
    "LIMITS_MS",
    "PACE",
    "PACE_CALM",
    "AdaptiveController",
    "Choice",
    "Limits",
    "Outcome",
    "Path",
    "Situation",
    "candidates",
    "choose",
    "make_controller",
    "max_downtime_ms",
    "max_throttle_pct",
    "pace_parameters",
    "postcopy_worth_enabling",
    "simulate",
    "throttle_pause_ms",
]

#: the downtime limits a plain pre-copy is tried at (ms), up to the job's limit
LIMITS_MS = (5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000)
#: starting CPU throttles (%) tried (never above :func:`max_throttle_pct`)
THROTTLES = (20, 40, 60, 80, 90, 95, 99)
#: QEMU throttles a vCPU by making it sleep ``pct / (100 - pct)`` times this timeslice
#: after each one it runs (cpu_throttle_timeslice): 99 % stops the guest 990 ms at a time
THROTTLE_SLICE_MS = 10.0
#: the fixed built-in schedules that are candidates too (run from the situation)
FIXED = ("balanced", "minimal-downtime", "postcopy")
#: keep the path in force unless the new one is this much faster
KEEP_MARGIN = 0.05
#: the lowest downtime limit a plain pre-copy is planned at (ms; the job's limit when
#: lower). Lower ones are simulated for the floor but not taken: in the lab a 5-10 ms
#: limit meant many short passes, after which 3 of 4 TCG guests arrived corrupted, and
#: the observed downtime did not follow the limit below 50 ms (it was the link's backlog,
#: which pacing removes; docs/BENCHMARKS.md)
MIN_LIMIT_MS = 50
#: post-copy is enabled only when the assessment leaves it a chance of being needed:
#: QEMU 7.2 with ``postcopy-ram`` on takes 70-100 ms more to switch over even when the
#: migration never uses it (lab: 111-137 ms against 2-45 ms without, same 50 ms limit)
CALM_SHARE = 0.75
#: a plain pre-copy whose pass ends with at most this share of what the previous pass
#: left is converging as planned: it is not planned again (a single pass's dirty rate
#: is a noisy figure; the shrinking remainder is the evidence)
CONVERGING = 0.8

#: pacing a plain pre-copy is worth it for a guest dirtying at most this share ``r`` of
#: the link: each pass sent more slowly leaves more to send again, so the link-bound part
#: takes ``(1 - r) / (PACE - r)`` times as long: 3 % longer idle, 8 % at a quarter of the
#: link, 17 % at half (lab: 17.6-18.3 s against 15.1-15.5, for an observed downtime of
#: 114-141 ms against 147-168), 21 % at 0.6
PACE_CALM = 0.6
#: the share of the measured link (the assessment's probe, else QEMU's own throughput
#: over the first pass) an adaptive migration is paced at (see the module doc). Lab,
#: 200 mbit: the link's queues drained with QEMU's stream at 94 % of what the link
#: carried, and stayed full at 96-99 %
PACE = 0.93

PathKind = Literal["precopy", "throttle", "postcopy", "pause", "policy"]


@dataclass(frozen=True)
class Situation:
    """What the planner knows of the memory migration now. Bytes, bytes/s, seconds."""

    #: what is still to send in this pass (at the start: the first pass)
    remaining: float
    #: what the guest dirties per second (less any throttle already in force)
    dirty_rate: float
    #: the most the guest keeps dirty (its working set)
    wss: float
    #: what the link carries for the migration
    bandwidth: float
    #: seconds since the migration started (the budget counts from its start)
    elapsed: float = 0.0
    #: the CPU throttle in force (%)
    throttle_pct: int = 0
    #: the first pass is still to go: switching to post-copy now is not a candidate
    at_start: bool = True
    #: what a probe measured the link to carry (``bandwidth`` is the share of it the
    #: models expect QEMU to reach); None: ``bandwidth`` was measured as it is
    link: float | None = None

    @property
    def measured_link(self) -> float:
        return self.bandwidth if self.link is None else self.link


@dataclass(frozen=True)
class Limits:
    """What a path must respect."""

    #: the most downtime accepted (the job's limit, and the tier's)
    downtime_ms: float
    #: post-copy is allowed (the tier, no multifd)
    postcopy: bool = True
    #: seconds since the migration started by which it must have finished
    budget_s: float = 600.0
    #: a plain pre-copy within this share of the fastest path is preferred: post-copy
    #: costs what its stop-and-copy downtime does not show (the guest waits on page
    #: faults over the link: 0.7 to 2.3 s observed in the lab against 0.1 to 0.2 s for
    #: a converged pre-copy, docs/BENCHMARKS.md; and a failed link splits it)
    slack: float = 0.5
    #: fixed part of a stop-and-copy downtime and of a post-copy switch (ms)
    switchover_ms: float = 20.0
    postcopy_switch_ms: float = 110.0
    #: what the link's queues add to either switch when the stream is not paced (ms; the
    #: candidates are simulated unpaced: an adaptive migration paces only some paths)
    backlog_ms: float = 0.0


@dataclass(frozen=True)
class Path:
    """One way to finish (see the module doc)."""

    kind: PathKind
    #: the downtime limit the path runs at (ms)
    downtime_ms: int
    throttle_pct: int = 0
    #: post-copy: switch after this many more passes (0: now)
    after_passes: int = 0
    #: kind ``policy``: the built-in schedule's name
    name: str = ""

    def label(self) -> str:
        if self.kind == "precopy":
            return f"pre-copy at {self.downtime_ms} ms"
        if self.kind == "throttle":
            return f"pre-copy at {self.downtime_ms} ms, CPUs throttled from {self.throttle_pct} %"
        if self.kind == "postcopy":
            return ("post-copy now" if self.after_passes == 0 else
                    f"post-copy after {self.after_passes} more "
                    f"pass{'es' if self.after_passes != 1 else ''}")
        if self.kind == "pause":
            return "pause the guest at the next pass end"
        return f"policy {self.name}"

    def schedule(self, *, timeout_s: float, timeout_action: Literal["abort", "complete"]
                 ) -> Policy:
        """The fixed policy the convergence controller follows for this path."""
        if self.kind == "policy":
            return BUILTIN[self.name].model_copy(update={
                "timeout_s": timeout_s, "timeout_action": timeout_action})
        steps: tuple[Step, ...] = ()
        stall_ratio = 0.95
        if self.kind == "throttle":
            steps, stall_ratio = (Step(after_stalls=1, action="throttle",
                                       value=self.throttle_pct),), 0.0
        elif self.kind == "postcopy" and self.after_passes > 0:
            steps, stall_ratio = (Step(after_stalls=self.after_passes, action="postcopy"),), 0.0
        elif self.kind == "pause":
            steps, stall_ratio = (Step(after_stalls=1, action="pause"),), 0.0
        return Policy(name=f"adaptive: {self.label()}", downtime_ms=self.downtime_ms,
                      steps=steps, stall_ratio=stall_ratio, timeout_s=timeout_s,
                      timeout_action=timeout_action)


@dataclass(frozen=True)
class Outcome:
    """One path simulated from a situation."""

    path: Path
    finished: bool
    #: seconds from now to the end (or to where the simulation stopped)
    time_s: float
    downtime_ms: float
    wire: float
    postcopy: bool
    paused: bool
    #: the highest CPU throttle reached (%)
    throttled: int
    iterations: int

    @property
    def plain(self) -> bool:
        """Pre-copy alone finishes it: no post-copy, no pause, no throttle."""
        return not (self.postcopy or self.paused or self.throttled)

    def describe(self) -> str:
        if not self.finished:
            return f"{self.path.label()}: does not finish within the budget"
        how = ("post-copy" if self.postcopy else "paused" if self.paused else
               f"throttled to {self.throttled} %" if self.throttled else "converges")
        return (f"{self.path.label()}: {how}, {self.time_s:.1f} s, downtime "
                f"{self.downtime_ms:.0f} ms, {self.wire / 2**20:.0f} MiB")


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` found."""

    #: None when no path finishes within the limits
    chosen: Outcome | None
    considered: tuple[Outcome, ...]
    why: str
    #: the lowest downtime a plain pre-copy reaches (the floor), if one finishes
    floor_ms: float | None = None


def throttle_pause_ms(pct: int) -> float:
    """How long a vCPU throttled at ``pct`` % stops at a time (the guest's own downtime)."""
    return 0.0 if pct <= 0 else THROTTLE_SLICE_MS * pct / max(1, 100 - pct)


def max_throttle_pct(limit_ms: float) -> int:
    """The highest throttle whose pauses stay within ``limit_ms``."""
    pct = int(100 * limit_ms / (limit_ms + THROTTLE_SLICE_MS))
    while pct > 0 and throttle_pause_ms(pct) > limit_ms:
        pct -= 1
    return max(0, min(99, pct))


class _Capped:
    """A convergence controller whose throttle steps never go above ``cap`` %."""

    def __init__(self, inner: ConvergenceController, cap: int) -> None:
        self._inner = inner
        self._cap = cap

    def initial_parameters(self) -> dict[str, object]:
        return self._inner.initial_parameters()

    @property
    def history(self) -> list[StepRecord]:
        return self._inner.history

    def observe(self, sample: Sample) -> list[Action]:
        out: list[Action] = []
        for a in self._inner.observe(sample):
            if isinstance(a, SetParameters) and "max-cpu-throttle" in a.params:
                initial = a.params.get("cpu-throttle-initial", 1)
                a = SetParameters(throttle_parameters(
                    int(initial) if isinstance(initial, int) else 1, self._cap), a.why)
            out.append(a)
        return out


def candidates(sit: Situation, limits: Limits) -> list[Path]:
    """Every path worth simulating from ``sit`` within ``limits``."""
    ceiling = max(1, int(limits.downtime_ms))
    levels = [lim for lim in LIMITS_MS if lim <= ceiling]
    if not levels or levels[-1] != ceiling:
        levels.append(min(ceiling, LIMITS_MS[-1]))
    # the other paths run at the highest limit whose stop-and-copy stays within the
    # limit (the switchover's fixed part comes on top of what QEMU's limit allows)
    fits = [lim for lim in levels if lim + limits.switchover_ms <= limits.downtime_ms]
    top = fits[-1] if fits else levels[0]
    paths = [Path("precopy", lim) for lim in levels]
    cap = max_throttle_pct(limits.downtime_ms)
    paths += [Path("throttle", top, throttle_pct=t) for t in THROTTLES if t <= cap]
    if limits.postcopy:
        paths += [Path("postcopy", top, after_passes=k) for k in (0, 1, 2)
                  if not (k == 0 and sit.at_start)]
    paths.append(Path("pause", top))
    for name in FIXED:
        if limits.postcopy or not BUILTIN[name].uses_postcopy:
            paths.append(Path("policy", BUILTIN[name].downtime_ms, name=name))
    return paths


def simulate(path: Path, sit: Situation, limits: Limits) -> Outcome:
    """Run ``path`` from ``sit`` in the simulation (the engine's 0.5 s sampling)."""
    budget = max(1.0, limits.budget_s - sit.elapsed)
    policy = path.schedule(timeout_s=budget, timeout_action="abort")
    opts = MigrationOptions(policy=policy, postcopy_allowed=limits.postcopy)
    setup = plan_setup(opts)
    if path.kind == "postcopy" and path.after_passes == 0:
        setup = replace(setup, capabilities={**setup.capabilities, "postcopy-ram": True},
                        postcopy=True)
    mig = SimulatedMigration.from_setup(
        setup, ram=max(1, round(sit.remaining)), link_rate=max(1.0, sit.bandwidth),
        dirty_rate=max(0.0, sit.dirty_rate), wss=max(1, round(sit.wss)),
        switchover_ms=limits.switchover_ms, postcopy_switch_ms=limits.postcopy_switch_ms,
        backlog_ms=limits.backlog_ms, fast=True)
    if sit.throttle_pct and setup.capabilities.get("auto-converge"):
        mig.throttle_pct = sit.throttle_pct
    if path.kind == "postcopy" and path.after_passes == 0:
        mig.start_postcopy()
    controller = _Capped(ConvergenceController(opts, setup), max_throttle_pct(limits.downtime_ms))
    drain = (sit.remaining + sit.wss) / max(1.0, sit.bandwidth)
    run = drive_sparse(controller, mig, timeout_s=budget, limit_s=budget + drain + 30)
    finished = run.status == "completed"
    end = run.ended_at if run.ended_at is not None else run.t
    # a throttled guest stops for a while after every timeslice: that is downtime too
    downtime = max(run.downtime_ms or 0.0, throttle_pause_ms(run.max_throttle))
    return Outcome(path=path, finished=finished, time_s=end,
                   downtime_ms=downtime if finished else 0.0,
                   wire=run.transferred, postcopy=run.postcopy_at is not None,
                   paused=run.paused_at is not None, throttled=run.max_throttle,
                   iterations=run.iterations)


def _eligible(o: Outcome, limits: Limits) -> bool:
    return (o.finished and o.downtime_ms <= limits.downtime_ms
            and (limits.postcopy or not o.postcopy))


def _pick(ok: Sequence[Outcome], slack: float, elapsed: float) -> Outcome:
    # the slack is a share of the whole migration's time, from its start
    best = elapsed + min(o.time_s for o in ok)
    plain = [o for o in ok if o.plain and elapsed + o.time_s <= best * (1 + slack) + 0.5]
    if plain:
        return min(plain, key=lambda o: (o.downtime_ms, o.time_s))
    return min(ok, key=lambda o: (o.time_s, o.downtime_ms))


def _lowest(limits: Limits) -> float:
    return min(float(MIN_LIMIT_MS), limits.downtime_ms)


def choose(sit: Situation, limits: Limits, paths: Sequence[Path] | None = None) -> Choice:
    """The path to take from ``sit`` (see the module doc)."""
    outs = tuple(simulate(p, sit, limits) for p in (paths or candidates(sit, limits)))
    # the floor: the lowest downtime any plain pre-copy reaches, even below the lowest
    # limit planned
    floor = min((o.downtime_ms for o in outs if _eligible(o, limits) and o.plain),
                default=None)
    ok = [o for o in outs if _eligible(o, limits)
          and (o.path.kind != "precopy" or o.path.downtime_ms >= _lowest(limits))]
    if not ok:
        finishing = [o for o in outs if o.finished]
        if not finishing:
            why = "no path finishes within the time budget"
        elif not limits.postcopy and any(o.postcopy for o in finishing) and not any(
                o.downtime_ms <= limits.downtime_ms for o in finishing if not o.postcopy):
            best = min((o for o in finishing if not o.postcopy), key=lambda o: o.downtime_ms,
                       default=None)
            why = ("only post-copy would finish within the downtime limit, and the tier "
                   "forbids it" + (f"; without it the best is {best.describe()}" if best
                                   else ""))
        else:
            best = min(finishing, key=lambda o: o.downtime_ms)
            why = (f"nothing finishes within a downtime of {limits.downtime_ms:.0f} ms; the "
                   f"lowest is {best.describe()}")
        return Choice(None, outs, why, floor)
    pick = _pick(ok, limits.slack, sit.elapsed)
    fastest = min(ok, key=lambda o: o.time_s)
    why = (f"{pick.describe()}" + ("" if pick is fastest else
                                  f" (the fastest, {fastest.describe()})"))
    return Choice(pick, outs, why, floor)


def postcopy_worth_enabling(start: Situation, path: Path) -> bool:
    """Whether to enable ``postcopy-ram`` for a migration planned ``path`` from ``start``:
    not when the plan is a plain pre-copy of a guest dirtying at most
    :data:`CALM_SHARE` of the link (a guest hotter than assessed then gets a higher
    limit or a throttle)."""
    return not (path.kind == "precopy" and start.dirty_rate <= CALM_SHARE * start.bandwidth)


def pace_parameters(rate: float, postcopy: bool) -> dict[str, object]:
    """The parameters that pace the stream at ``rate`` bytes/s (pre-copy, and post-copy's
    background push when post-copy is enabled)."""
    cap = max(1, int(rate))
    return {"max-bandwidth": cap, **({"max-postcopy-bandwidth": cap} if postcopy else {})}


def situation(sample: Sample, *, wss: float, fallback_bandwidth: float) -> Situation:
    """What a pass end's ``query-migrate`` sample says (QEMU's own figures)."""
    bandwidth = sample.mbps * 1e6 / 8 if sample.mbps > 0 else fallback_bandwidth
    # QEMU measures what the throttled guest dirtied; the simulation applies the throttle
    unthrottled = sample.dirty_bytes_rate / max(0.01, 1 - sample.throttle_pct / 100)
    return Situation(remaining=float(max(sample.remaining, 1)),
                     dirty_rate=unthrottled, wss=max(wss, float(sample.remaining)),
                     bandwidth=bandwidth, elapsed=sample.t, throttle_pct=sample.throttle_pct,
                     at_start=False)


@dataclass
class _Decision:
    t: float
    iteration: int
    data: dict[str, Any] = field(default_factory=dict)


class AdaptiveController:
    """The convergence controller of an adaptive policy (see the module doc): the same
    interface as :class:`~vmigrate.plan.convergence.ConvergenceController`, plus
    :meth:`take_decisions`."""

    def __init__(self, opts: MigrationOptions, setup: MigrationSetup, *, limits: Limits,
                 start: Situation | None, wss: float, bandwidth: float,
                 pace: bool = False) -> None:
        """``pace``: pace the stream at :data:`PACE` of ``start``'s measured link, else
        of the first pass's throughput."""
        self._opts = opts
        self._setup = setup
        self._limits = limits
        self._wss = wss
        self._bandwidth = bandwidth
        #: the dirty rate believed (the assessment's, then what the passes showed)
        self._rate = start.dirty_rate if start is not None else 0.0
        self._pass_started = 0.0
        #: what was left at the previous pass end (None: the first pass runs)
        self._pass_left: float | None = None
        self._last_iteration: int | None = None
        self._history: list[StepRecord] = []
        self._finished: list[StepRecord] = []
        self._decisions: list[dict[str, Any]] = []
        #: why no path finishes within the limits from the start (None: one does)
        self.refusal: str | None = None
        self._pace = pace
        #: what the link was measured to carry (None: not yet, the first pass measures it)
        self._link = start.measured_link if start is not None else None
        #: the rate the stream is paced at (bytes/s; None: not paced, or not yet)
        self.paced: float | None = None
        self._pace_noted = False
        if start is not None:
            choice = choose(start, limits)
            if choice.chosen is None:
                self.refusal = choice.why
            if choice.chosen is not None:
                path, why = choice.chosen.path, f"from the assessment: {choice.why}"
            else:
                path, why = self._first_pass_path(), (
                    f"from the assessment: {choice.why}; starting a pre-copy and planning "
                    "again after the first pass")
            self._path = path
            if self._worth_pacing(path):
                self.paced = PACE * start.measured_link
            self._record(0.0, 1, None, path, why, start, choice)
        else:
            self._path = self._first_pass_path()
            self._record(0.0, 1, None, self._path, "no assessment: the first pass measures "
                         "the guest", None, None)
        self._inner = self._controller(self._path)

    def _first_pass_path(self) -> Path:
        return Path("precopy", max(1, int(_lowest(self._limits))))

    def _controller(self, path: Path) -> _Capped:
        action: Literal["abort", "complete"] = (
            "complete" if self._opts.policy.timeout_action == "complete"
            and (self._setup.postcopy or self._limits.downtime_ms >= 60_000) else "abort")
        policy = path.schedule(timeout_s=self._limits.budget_s, timeout_action=action)
        params = dict(self._setup.parameters, **{"downtime-limit": path.downtime_ms})
        setup = replace(self._setup, parameters=params)
        return _Capped(ConvergenceController(replace(self._opts, policy=policy), setup),
                       max_throttle_pct(self._limits.downtime_ms))

    def _record(self, t: float, iteration: int, old: Path | None, new: Path, why: str,
                sit: Situation | None, choice: Choice | None) -> None:
        paced = (f"; stream paced at {self.paced / 2**20:.1f} MiB/s"
                 if self.paced is not None and not self._pace_noted else "")
        self._pace_noted = self.paced is not None
        detail = f"{'plan' if old is None else 'change'}: {new.label()} ({why}{paced})"
        self._history.append(StepRecord(t=t, iteration=iteration, action="path",
                                        detail=detail))
        data: dict[str, Any] = {"path": new.label(), "why": why, "t": round(t, 2),
                                "iteration": iteration}
        if old is not None:
            data["from"] = old.label()
        if sit is not None:
            data.update(dirty_rate=round(sit.dirty_rate), bandwidth=round(sit.bandwidth),
                        remaining=round(sit.remaining))
        if self.paced is not None:
            data["paced_bandwidth"] = round(self.paced)
        if choice is not None and choice.chosen is not None:
            data.update(predicted_time_s=round(choice.chosen.time_s, 2),
                        predicted_downtime_ms=round(choice.chosen.downtime_ms, 1),
                        considered=len(choice.considered))
        if choice is not None and choice.floor_ms is not None:
            data["floor_ms"] = round(choice.floor_ms, 1)
        self._decisions.append(data)

    # -- the controller's interface

    def initial_parameters(self) -> dict[str, object]:
        """The source parameters to set before ``migrate`` (paced when the link is known)."""
        params = self._inner.initial_parameters()
        if self.paced is not None:
            params.update(pace_parameters(self.paced, self._setup.postcopy))
        return params

    @property
    def history(self) -> list[StepRecord]:
        """Every path decision and every step taken or skipped, in order (a copy)."""
        return sorted(self._history + self._finished + self._inner.history,
                      key=lambda r: (r.t, r.iteration))

    @property
    def path(self) -> Path:
        """The path in force."""
        return self._path

    def take_decisions(self) -> list[dict[str, Any]]:
        """The path decisions since the last call (for the audit log)."""
        out, self._decisions = self._decisions, []
        return out

    def observe(self, sample: Sample) -> list[Action]:
        actions: list[Action] = []
        if sample.status == "active":
            new_pass = (self._last_iteration is not None
                        and sample.iteration > self._last_iteration)
            self._last_iteration = sample.iteration
            if new_pass and sample.remaining > 0:
                converging = (self._pass_left is not None and self._path.kind == "precopy"
                              and sample.remaining <= CONVERGING * self._pass_left)
                self._pass_left = float(sample.remaining)
                if converging:
                    self._pass_started = sample.t
                else:
                    actions += self._replan(sample)
        return actions + self._inner.observe(sample)

    def _dirty_rate(self, sit: Situation, pass_s: float) -> tuple[float, str]:
        """The dirty rate to plan with, and how it was found. QEMU's rate of a pass is
        what the pass found dirty over its length: a guest rewriting a working set
        faster than a pass saturates it, so a lower figure replaces the believed one
        only when the pass also left clearly less than that belief predicts."""
        measured = sit.dirty_rate
        what = f"measured {measured / 2**20:.1f} MiB/s dirtied"
        if measured >= self._rate:
            return measured, what
        expected = min(self._wss, self._rate * pass_s * (1 - sit.throttle_pct / 100))
        if sit.remaining < 0.5 * expected:
            return measured, what + " (calmer than believed)"
        return self._rate, (f"{what} over the pass, {self._rate / 2**20:.1f} MiB/s kept "
                            "(the pass left as much as that predicts)")

    def _worth_pacing(self, path: Path) -> bool:
        """Pace (see the module doc) where it costs little: a guest dirtying at most
        :data:`PACE_CALM` of the link (a paced pass is hardly ever resent), or a path
        to post-copy (whose page faults wait behind the link's queues)."""
        if not self._pace or self.paced is not None or self._link is None:
            return False
        postcopy = path.kind == "postcopy" or (
            path.kind == "policy" and BUILTIN[path.name].uses_postcopy)
        return postcopy or self._rate <= PACE_CALM * self._link

    def _replan(self, sample: Sample) -> list[Action]:
        sit = situation(sample, wss=self._wss, fallback_bandwidth=self._bandwidth)
        if self._link is None:  # no assessment: the first pass measured the link
            self._link = sit.bandwidth
        if self.paced is not None:
            sit = replace(sit, bandwidth=min(sit.bandwidth, self.paced))
        actions = self._replan_from(sample, sit)
        if self._worth_pacing(self._path):
            assert self._link is not None
            self.paced = PACE * self._link
            why = (f"adaptive: pace the stream at {self.paced / 2**20:.1f} MiB/s, "
                   f"{PACE:.0%} of the {self._link / 2**20:.1f} MiB/s measured on the link, "
                   "so its queues are short at the switchover")
            actions.insert(0, SetParameters(pace_parameters(self.paced, self._setup.postcopy),
                                            why))
            self._history.append(StepRecord(t=sample.t, iteration=sample.iteration,
                                            action="pace", detail=why))
            self._pace_noted = True
        return actions

    def _replan_from(self, sample: Sample, sit: Situation) -> list[Action]:
        pass_s, self._pass_started = sample.t - self._pass_started, sample.t
        rate, rate_why = self._dirty_rate(sit, pass_s)
        self._rate = rate
        sit = replace(sit, dirty_rate=rate)
        self._wss = max(self._wss, float(sample.remaining))
        choice = choose(sit, self._limits)
        new = choice.chosen
        if new is None or new.path == self._path:
            return []
        # the path in force is usually among the candidates just simulated
        current = next((o for o in choice.considered if o.path == self._path), None) \
            or simulate(self._path, sit, self._limits)
        about_as_fast = sit.elapsed + current.time_s <= (
            sit.elapsed + new.time_s) * (1 + KEEP_MARGIN) + 0.5
        about_as_short = current.downtime_ms <= new.downtime_ms * 1.1 or not new.plain
        if _eligible(current, self._limits) and about_as_fast and about_as_short:
            return []  # the path in force is about as good: no change for the sake of it
        old = self._path
        self._path = new.path
        self._finished += self._inner.history
        self._inner = self._controller(new.path)
        self._record(sample.t, sample.iteration, old, new.path,
                     f"{choice.why}; {rate_why}, "
                     f"{sit.bandwidth / 2**20:.1f} MiB/s sent, "
                     f"{sit.remaining / 2**20:.1f} MiB left", sit, choice)
        actions: list[Action] = []
        if new.path.downtime_ms != old.downtime_ms or new.path.kind == "policy":
            actions.append(SetParameters({"downtime-limit": new.path.downtime_ms},
                                         f"adaptive: downtime limit {new.path.downtime_ms} ms"))
        if new.path.kind == "throttle" and self._setup.capabilities.get("auto-converge"):
            actions.append(SetParameters(throttle_parameters(
                new.path.throttle_pct, max_throttle_pct(self._limits.downtime_ms)),
                                         f"adaptive: throttle CPUs from "
                                         f"{new.path.throttle_pct} %"))
        if new.path.kind == "postcopy" and new.path.after_passes == 0 and self._setup.postcopy:
            actions.append(StartPostcopy(f"adaptive: {choice.why}"))
        return actions


def max_downtime_ms(opts: MigrationOptions) -> float:
    """The most downtime an adaptive policy may take: ``--downtime`` (else the
    policy's ``downtime_ms``), never above the tier's limit."""
    limit = float(opts.downtime_ms if opts.downtime_ms is not None
                  else opts.policy.downtime_ms)
    if opts.max_downtime_ms is not None:
        limit = min(limit, opts.max_downtime_ms)
    return limit


def make_controller(opts: MigrationOptions, setup: MigrationSetup, *,
                    start: Situation | None, wss: float, bandwidth: float,
                    switchover_ms: float = 20.0, postcopy_switch_ms: float = 110.0,
                    backlog_ms: float = 40.0
                    ) -> ConvergenceController | AdaptiveController:
    """The controller for ``opts``: the adaptive one for an adaptive policy (within
    :func:`max_downtime_ms`, paced unless the setup caps the bandwidth), the schedule
    follower otherwise."""
    if not opts.policy.adaptive:
        return ConvergenceController(opts, setup)
    limit = max_downtime_ms(opts)
    cap = setup.parameters.get("max-bandwidth")
    capped = isinstance(cap, int) and cap < UNLIMITED_BANDWIDTH
    if capped:  # the operator's cap: no pacing of our own
        assert isinstance(cap, int)
        bandwidth = min(bandwidth, float(cap))
        if start is not None:
            start = replace(start, bandwidth=min(start.bandwidth, float(cap)))
    limits = Limits(downtime_ms=float(limit), postcopy=setup.postcopy,
                    budget_s=opts.policy.timeout_s if math.isfinite(opts.policy.timeout_s)
                    else 3600.0, switchover_ms=switchover_ms,
                    postcopy_switch_ms=postcopy_switch_ms,
                    backlog_ms=backlog_ms)
    return AdaptiveController(opts, setup, limits=limits, start=start, wss=wss,
                              bandwidth=bandwidth, pace=not capped)
