"""What each migration mode will cost a VM: the prediction models, and their calibration.

:func:`predict` takes an :class:`~vmigrate.plan.assessment.Assessment` (what was
measured of the VM and its link) and a convergence policy, and returns one
:class:`~vmigrate.plan.assessment.ModePrediction` per mode: total time, downtime
and bytes on the wire (``raw``: the model's own; ``figures``: after
calibration), whether the mode can run at all and why not, what the policy will
do, and notes an operator can read.

The models, and what they assume
--------------------------------
Bandwidth. ``L`` = the probed link bandwidth x ``link_efficiency`` (the share of
the probe's TCP rate QEMU and our transfer engine really reach). A bandwidth cap
is a rate limiter, so it binds as it is: the sending rate is ``min(L, cap)``.
Which cap applies follows what the migration code does: live/online memory
streams take ``bandwidth`` if given, else the policy's (QEMU ``max-bandwidth``);
cold/warm disk copies take ``bandwidth`` **per disk** (the disks copy in
parallel and share ``L``); online disk mirrors have no cap.

live
    The real :class:`~vmigrate.plan.convergence.ConvergenceController`, set up by
    :func:`~vmigrate.plan.capabilities.plan_setup` exactly as a migration would be,
    drives a :class:`~vmigrate.plan.simulate.SimulatedMigration` in simulated
    time (sampled every 0.5 s, like the engine). The simulation sends RAM at
    ``min(L, cap)`` while the guest dirties the assessment's mean dirty rate
    bytes/s, never more than its working set (``dirty_set_bytes``, else all of
    RAM). Simplification: the first pass is ``memory_bytes x
    first_pass_fraction`` (zero pages cost next to nothing) and later passes
    are whatever the guest dirtied, whole. Time = ``setup_s`` + the simulated
    run; downtime = the simulated stop-and-copy + ``switchover_ms``, or
    ``postcopy_switch_ms`` when the policy switches to post-copy (plus the
    pause, if it paused the guest first). The run is repeated at the peak
    dirty rate and the difference is told in the notes. A run that the policy
    cancels (an abort step, a timeout with ``abort``) predicts the time and
    bytes spent until then, no downtime, and ``aborts``; a run that never ends
    (no timeout, never converges) makes the mode infeasible.
    Needs: a running VM, every disk on shared storage.
online
    The disks are mirrored first: the mirror copies the allocated bytes while
    the guest's disk writes ``W`` are copied again as they happen, so it is
    ready after ``allocated / (L - W)`` seconds, having sent ``allocated + W x
    that``. With ``W >= L`` it never gets ready: infeasible. Then the memory
    moves as in live, on ``L - W`` (the mirror keeps streaming the writes,
    ``W x`` the live part's time more bytes); downtime = the live downtime +
    ``handover_ms``. Needs: a running VM.
cold
    The guest powers off (``min(shutdown_s, shutdown_timeout)``; a stopped VM
    skips it and stays stopped on the destination, so there is no downtime and
    no boot), every disk's allocated bytes x its compression ratio (1.0 when
    not sampled) x ``1 + stream_overhead`` crosses the link, all disks at once
    (``copy_setup_s`` once, for the SSH sessions and agents), then the guest
    boots (``boot_s``). Downtime = all of that; time = ``setup_s`` + downtime.
warm
    The base copy (as cold, ``copy_setup_s`` + transfer) while the guest runs;
    then rounds: round ``i`` sends what the guest wrote during round ``i-1``,
    ``min(W x t(i-1) x warm_granularity, virtual size)`` per disk (dirty
    bitmaps mark whole 64 KiB granules), compressed and framed as in cold,
    each round paying ``copy_setup_s`` again. It cuts over once a round sent at
    most ``warm_small_delta`` bytes or after ``warm_max_rounds`` rounds; the
    last delta holds the writes of the last round and of the shutdown.
    Downtime = shutdown + ``copy_setup_s`` + last delta / rate + ``boot_s``.
    Needs: a running VM, QEMU 5.0+ (dirty bitmaps exported over NBD).

Nothing is predicted without a measured link. No mode models failures, retries
or a link that changes speed.

Calibration
-----------
Every migration stores the raw prediction it started from next to what it
measured (:func:`measured_figures` reads a finished report).
:func:`calibrate` turns that history into per-mode multiplicative factors
(median of measured / raw over the latest migrations), which :func:`predict`
applies to ``raw`` to give ``figures``, with the remaining spread as the
prediction's ``uncertainty``.

Pure: plain data in, plain data out; no clock (times come in as data).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmigrate.plan.adaptive import Situation, make_controller
from vmigrate.plan.assessment import (
    MODES,
    Assessment,
    DiskAssessment,
    Figures,
    Mode,
    ModePrediction,
)
from vmigrate.plan.capabilities import MigrationOptions, MigrationSetup, plan_setup
from vmigrate.plan.policy import Policy
from vmigrate.plan.simulate import SimRun, SimulatedMigration, drive_sparse

__all__ = [
    "DEFAULT_PRIORS",
    "FACTOR_MAX",
    "FACTOR_MIN",
    "MIN_FACTOR_SAMPLES",
    "PRIOR_SPREAD",
    "Calibration",
    "Factors",
    "HistoryEntry",
    "Priors",
    "calibrate",
    "live_start",
    "measured_figures",
    "predict",
]

MiB = 1 << 20
GiB = 1 << 30
#: calibration factors are clamped to this range: a factor outside it says the
#: model or the history is broken, not that the VM is slow
FACTOR_MIN = 0.2
FACTOR_MAX = 5.0
#: a spread needs at least this many usable migrations
MIN_SPREAD_SAMPLES = 3
#: one migration is not enough to move the model: a figure needs this many to calibrate
MIN_FACTOR_SAMPLES = 2
#: the spread stated while fewer than MIN_SPREAD_SAMPLES migrations calibrate a mode
PRIOR_SPREAD = 0.5
#: the QEMU version assumed when the assessment does not say (not running)
_DEFAULT_QEMU = (7, 2, 0)
_FIGURES = ("total_time_s", "downtime_ms", "wire_bytes")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Priors(_Frozen):
    """The models' constants before any calibration (seconds, ms, bytes, ratios)."""

    #: begin + prepare: reach the destination, start its QEMU (``-incoming``), connect
    setup_s: float = Field(default=2.0, ge=0)
    #: fixed part of a live stop-and-copy downtime: stop, last device state, resume
    switchover_ms: float = Field(default=20.0, ge=0)
    #: downtime of the switch to post-copy (the guest resumes on the destination)
    postcopy_switch_ms: float = Field(default=110.0, ge=0)
    #: what the link's queues hold when QEMU is not paced below the link (it writes as
    #: fast as the socket takes): added to either switch. Lab, 200 mbit: 2.1-3.7 MB
    #: reached the destination after the source stopped unpaced, 0.8-2.8 MB paced
    backlog_ms: float = Field(default=40.0, ge=0)
    #: online, before the mirrors start: create the target images, export them over NBD
    #: on the destination, add and start the mirror jobs (lab: about 3 s)
    mirror_setup_s: float = Field(default=3.0, ge=0)
    #: online: completing the ready mirrors at the switchover, added to the downtime
    handover_ms: float = Field(default=100.0, ge=0)
    #: a guest's ACPI power-off; never counted above the shutdown timeout (then it
    #: is stopped hard)
    shutdown_s: float = Field(default=3.0, ge=0)
    #: the guest boots on the destination until it answers
    boot_s: float = Field(default=8.0, ge=0)
    #: cold/warm, per disk copy (every round): SSH sessions and the two transfer agents
    copy_setup_s: float = Field(default=1.5, ge=0)
    #: share of RAM the first pre-copy pass really sends (zero pages cost next to nothing)
    first_pass_fraction: float = Field(default=1.0, gt=0, le=1)
    #: share of the probed link bandwidth QEMU and our engine reach
    link_efficiency: float = Field(default=0.95, gt=0, le=1)
    #: warm: bytes a round sends per byte the guest wrote (bitmaps mark 64 KiB granules)
    warm_granularity: float = Field(default=1.5, ge=1)
    #: warm: cut over once a round sent at most this (restates
    #: ``vmigrate.migration.cold.SMALL_DELTA``: the plan layer cannot import migration/)
    warm_small_delta: int = Field(default=32 << 20, ge=0)
    #: warm: ... or after this many rounds (restates ``vmigrate.migration.cold.MAX_ROUNDS``)
    warm_max_rounds: int = Field(default=8, ge=1)
    #: transfer stream framing and AEAD tags, per byte of data
    stream_overhead: float = Field(default=0.002, ge=0)


#: the priors as documented above
DEFAULT_PRIORS = Priors()


class Factors(_Frozen):
    """One mode's calibration: measured / raw, per figure, and what remains after it."""

    total_time_s: float = Field(default=1.0, ge=FACTOR_MIN, le=FACTOR_MAX)
    downtime_ms: float = Field(default=1.0, ge=FACTOR_MIN, le=FACTOR_MAX)
    wire_bytes: float = Field(default=1.0, ge=FACTOR_MIN, le=FACTOR_MAX)
    #: migrations the factors come from (0 = uncalibrated)
    samples: int = Field(default=0, ge=0)
    #: median relative error left after the factors (the worst of the three figures);
    #: None with fewer than MIN_SPREAD_SAMPLES usable migrations
    spread: float | None = Field(default=None, ge=0)

    def apply(self, raw: Figures) -> Figures:
        """``raw`` multiplied by the factors."""
        return Figures(total_time_s=raw.total_time_s * self.total_time_s,
                       downtime_ms=raw.downtime_ms * self.downtime_ms,
                       wire_bytes=round(raw.wire_bytes * self.wire_bytes))


class Calibration(_Frozen):
    """Per-mode factors; a mode that is not here is uncalibrated (factors 1)."""

    modes: dict[Mode, Factors] = Field(default_factory=dict)

    def factors(self, mode: Mode) -> Factors:
        return self.modes.get(mode, Factors())


class HistoryEntry(_Frozen):
    """One finished migration: the raw prediction it started from and what it measured."""

    mode: Mode
    vm: str
    #: epoch seconds (when it ran)
    at: float
    raw: Figures
    measured: Figures


# -- formatting -------------------------------------------------------------------------------


def _size(n: float) -> str:
    if n >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / MiB:.1f} MiB"


def _rate(r: float) -> str:
    return f"{r / MiB:.1f} MiB/s"


# -- shared pieces ----------------------------------------------------------------------------


def _parallel_copy_s(sizes: Sequence[float], link: float, cap: float | None) -> float:
    """Seconds to send ``sizes`` at once over one link of ``link`` bytes/s, each
    stream limited to ``cap``: the active streams share the link evenly
    (max-min fair), and one stream alone can fill it."""
    left = sorted(s for s in sizes if s > 0)
    t = 0.0
    while left:
        each = link / len(left) if cap is None else min(cap, link / len(left))
        dt = left[0] / each
        t += dt
        left = [s - left[0] for s in left[1:] if s - left[0] > 0]
    return t


def _ratio(disk: DiskAssessment) -> float:
    return 1.0 if disk.compress_ratio is None else disk.compress_ratio


@dataclass(frozen=True)
class _Live:
    """One simulated live migration, read for the prediction."""

    run: SimRun
    #: the migration completed (by pre-copy, post-copy or pause)
    finished: bool
    #: the policy cancelled it
    aborts: bool
    #: seconds from migrate to the end (or to the simulation's limit)
    time_s: float
    downtime_ms: float
    wire: float
    postcopy: bool
    paused: bool
    steps: tuple[str, ...]

    @property
    def converges(self) -> bool:
        return self.finished and not (self.postcopy or self.paused)

    def outcome(self) -> str:
        run = self.run
        if self.aborts:
            return f"the policy cancels the migration at {self.time_s:.1f} s"
        if not self.finished:
            return f"pre-copy does not finish within {self.time_s:.0f} s"
        if run.postcopy_at is not None:
            return (f"switches to post-copy at {run.postcopy_at:.1f} s (iteration "
                    f"{self.run.iterations}), done at {self.time_s:.1f} s, downtime "
                    f"{self.downtime_ms:.0f} ms")
        if run.paused_at is not None:
            return (f"pauses the guest at {run.paused_at:.1f} s to finish, done at "
                    f"{self.time_s:.1f} s, downtime {self.downtime_ms:.0f} ms")
        return (f"pre-copy converges after {run.iterations} iterations in {self.time_s:.1f} s, "
                f"downtime {self.downtime_ms:.0f} ms")


def _simulate_live(opts: MigrationOptions, setup: MigrationSetup, *, ram: float,
                   link_rate: float, dirty_rate: float, wss: int,
                   priors: Priors) -> _Live:
    policy = opts.policy
    cap = setup.parameters.get("max-bandwidth")
    rate = min(link_rate, float(cap)) if isinstance(cap, int) else link_rate
    drain = (ram + wss) / rate  # sending all there is, once more
    if math.isfinite(policy.timeout_s):
        # room to finish after the timeout (post-copy streams the rest, a pause drains it)
        limit = policy.timeout_s + 2 * drain + 60.0
    else:
        limit = 10 * drain + 600.0
    mig = SimulatedMigration.from_setup(
        setup, ram=round(ram), link_rate=link_rate, dirty_rate=dirty_rate, wss=wss,
        switchover_ms=priors.switchover_ms, postcopy_switch_ms=priors.postcopy_switch_ms,
        backlog_ms=priors.backlog_ms, fast=True)
    # an adaptive policy plans from these figures as it would from the assessment
    controller = make_controller(
        opts, setup, start=Situation(remaining=ram, dirty_rate=dirty_rate, wss=wss,
                                     bandwidth=link_rate),
        wss=wss, bandwidth=link_rate, switchover_ms=priors.switchover_ms,
        postcopy_switch_ms=priors.postcopy_switch_ms, backlog_ms=priors.backlog_ms)
    run = drive_sparse(controller, mig, timeout_s=policy.timeout_s, limit_s=limit)
    finished = run.status == "completed"
    aborts = run.status in ("cancelled", "failed")
    time_s = run.ended_at if run.ended_at is not None else run.t
    downtime = run.downtime_ms if finished and run.downtime_ms is not None else 0.0
    steps = tuple(f"{r.t:.1f} s, iteration {r.iteration}: {r.detail}" for r in run.history)
    return _Live(run=run, finished=finished, aborts=aborts, time_s=time_s,
                 downtime_ms=downtime, wire=run.transferred,
                 postcopy=run.postcopy_at is not None, paused=run.paused_at is not None,
                 steps=steps)


def _live_inputs(a: Assessment, priors: Priors) -> tuple[float, int, list[str]]:
    """(first pass bytes, working set, notes) of the memory migration."""
    fraction = (a.nonzero_fraction if a.nonzero_fraction is not None
                else priors.first_pass_fraction)
    wss = a.memory_bytes if a.dirty_set_bytes is None else a.dirty_set_bytes
    # the pages the guest keeps dirtying are not zero, whatever the sample said
    ram = max(a.memory_bytes * fraction, min(a.dirty_set_bytes or 0, a.memory_bytes))
    notes: list[str] = []
    if a.dirty:
        notes.append(f"guest dirties {_rate(a.dirty_rate)} (mean of {len(a.dirty)} "
                     f"window{'s' if len(a.dirty) != 1 else ''}, peak "
                     f"{_rate(a.dirty_peak)}), working set {_size(wss)}")
    else:
        notes.append("no dirty-rate measurement: the guest is assumed idle")
    if a.nonzero_fraction is not None:
        notes.append(f"{a.nonzero_fraction:.0%} of {_size(a.memory_bytes)} of RAM is not "
                     "zero (sampled; zero pages cost next to nothing)")
    elif priors.first_pass_fraction < 1:
        notes.append(f"first pass = {priors.first_pass_fraction:g} x {_size(a.memory_bytes)} "
                     "of RAM (zero pages cost next to nothing)")
    return ram, wss, notes


def live_start(a: Assessment, priors: Priors | None = None) -> Situation | None:
    """Where a memory migration of ``a``'s guest starts, as the adaptive planner sees
    it (what the models use; None without a measured link)."""
    if a.link is None:
        return None
    priors = priors or DEFAULT_PRIORS
    ram, wss, _ = _live_inputs(a, priors)
    return Situation(remaining=ram, dirty_rate=a.dirty_rate, wss=float(wss),
                     bandwidth=a.link.bandwidth * priors.link_efficiency,
                     link=a.link.bandwidth)


def _peak_note(mean: _Live, peak: _Live, peak_rate: float, setup_s: float) -> str:
    what = f"at the peak dirty rate {_rate(peak_rate)}"
    changed = ""
    if peak.aborts and not mean.aborts:
        changed = " (the policy would cancel it)"
    elif not peak.finished and mean.finished:
        changed = " (it would not finish)"
    elif peak.postcopy and not mean.postcopy:
        changed = " (it would need post-copy)"
    elif peak.paused and not mean.paused:
        changed = " (the guest would be paused)"
    if not peak.finished:
        return f"{what}: {peak.outcome()}{changed}"
    return (f"{what}: {peak.time_s + setup_s:.1f} s in all, downtime "
            f"{peak.downtime_ms:.0f} ms{changed}")


# -- the modes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Model:
    """One mode's raw result before calibration."""

    raw: Figures
    postcopy: bool = False
    converges: bool = True
    aborts: bool = False
    iterations: int | None = None
    steps: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


class _Infeasible(Exception):
    def __init__(self, reason: str, *, converges: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.converges = converges


def _memory(a: Assessment, opts: MigrationOptions, setup: MigrationSetup, *, link: float,
            priors: Priors, before_s: float, notes: list[str]) -> _Live:
    """The memory migration at the mean dirty rate (and, in the notes, at the peak) on
    ``link`` bytes/s, ``before_s`` seconds into the job; notes are appended."""
    ram, wss, live_notes = _live_inputs(a, priors)
    cap = setup.parameters.get("max-bandwidth")
    rate = min(link, float(cap)) if isinstance(cap, int) else link
    notes.append(f"{'then memory: ' if before_s > priors.setup_s else ''}first pass "
                 f"{_size(ram)} at {_rate(rate)}")
    notes += live_notes
    mean = _simulate_live(opts, setup, ram=ram, link_rate=link, dirty_rate=a.dirty_rate,
                          wss=wss, priors=priors)
    if not mean.finished and not mean.aborts:
        raise _Infeasible(f"{mean.outcome()} and policy {opts.policy.name!r} never forces "
                          "completion", converges=False)
    notes.append(mean.outcome())
    if a.dirty_peak > a.dirty_rate:
        peak = _simulate_live(opts, setup, ram=ram, link_rate=link, dirty_rate=a.dirty_peak,
                              wss=wss, priors=priors)
        notes.append(_peak_note(mean, peak, a.dirty_peak, before_s))
    return mean


def _from_memory(raw: Figures, mean: _Live, notes: list[str]) -> _Model:
    return _Model(raw=raw, postcopy=mean.postcopy or mean.paused, converges=mean.converges,
                  aborts=mean.aborts, iterations=mean.run.iterations, steps=mean.steps,
                  notes=tuple(notes))


def _live_model(a: Assessment, opts: MigrationOptions, setup: MigrationSetup, *,
                link: float, priors: Priors) -> _Model:
    notes: list[str] = []
    mean = _memory(a, opts, setup, link=link, priors=priors, before_s=priors.setup_s,
                   notes=notes)
    raw = Figures(total_time_s=priors.setup_s + mean.time_s, downtime_ms=mean.downtime_ms,
                  wire_bytes=round(mean.wire))
    return _from_memory(raw, mean, notes)


def _online_model(a: Assessment, opts: MigrationOptions, setup: MigrationSetup, *,
                  link: float, priors: Priors) -> _Model:
    writes = a.disk_write_rate
    allocated = a.allocated_bytes
    if writes >= link:
        raise _Infeasible(f"the guest writes its disks at {_rate(writes)}, as fast as the "
                          f"link carries ({_rate(link)}): the disk mirror never gets ready",
                          converges=False)
    left = link - writes
    mirror_s = allocated / left
    mirror_bytes = allocated + writes * mirror_s
    notes = [f"mirror {_size(allocated)} of disk at {_rate(left)} (link {_rate(link)} less "
             f"disk writes {_rate(writes)}): ready after {mirror_s:.1f} s"]
    mirror_setup = priors.mirror_setup_s if a.disks else 0.0
    mean = _memory(a, opts, setup, link=left, priors=priors,
                   before_s=priors.setup_s + mirror_setup + mirror_s, notes=notes)
    downtime = mean.downtime_ms + priors.handover_ms if mean.finished else 0.0
    wire = mirror_bytes + mean.wire + writes * mean.time_s
    raw = Figures(total_time_s=priors.setup_s + mirror_setup + mirror_s + mean.time_s,
                  downtime_ms=downtime, wire_bytes=round(wire))
    return _from_memory(raw, mean, notes)


def _shutdown_s(priors: Priors, shutdown_timeout: float) -> float:
    return min(priors.shutdown_s, max(0.0, shutdown_timeout))


def _cold_model(a: Assessment, *, link: float, cap: float | None, shutdown_timeout: float,
                priors: Priors) -> _Model:
    per_byte = 1 + priors.stream_overhead
    sizes = [d.allocated_bytes * _ratio(d) * per_byte for d in a.disks]
    data = sum(sizes)
    copy_s = _parallel_copy_s(sizes, link, cap)
    notes = [f"copy {_size(a.allocated_bytes)} allocated of {len(a.disks)} "
             f"disk{'s' if len(a.disks) != 1 else ''}, {_size(data)} on the wire, "
             f"in {copy_s:.1f} s at {_rate(link)}"
             + ("" if cap is None else f" (at most {_rate(cap)} per disk)")]
    if any(d.compress_ratio is None for d in a.disks):
        notes.append("compression not sampled on some disks: ratio 1.0 assumed")
    if a.running:
        shutdown = _shutdown_s(priors, shutdown_timeout)
        down_s = shutdown + priors.copy_setup_s + copy_s + priors.boot_s
        notes.append(f"downtime: shutdown {shutdown:.1f} s + copy setup "
                     f"{priors.copy_setup_s:.1f} s + copy {copy_s:.1f} s + boot "
                     f"{priors.boot_s:.1f} s")
        raw = Figures(total_time_s=priors.setup_s + down_s, downtime_ms=down_s * 1000,
                      wire_bytes=round(data))
    else:
        notes.append("the VM is stopped: it stays stopped on the destination (no shutdown, "
                     "no boot, no downtime)")
        raw = Figures(total_time_s=priors.setup_s + priors.copy_setup_s + copy_s,
                      downtime_ms=0.0, wire_bytes=round(data))
    return _Model(raw=raw, notes=tuple(notes))


def _warm_model(a: Assessment, *, link: float, cap: float | None, shutdown_timeout: float,
                priors: Priors) -> _Model:
    per_byte = 1 + priors.stream_overhead
    factor = [_ratio(d) * per_byte for d in a.disks]

    def on_wire(data: Sequence[float]) -> list[float]:
        return [x * f for x, f in zip(data, factor, strict=True)]

    def written(seconds: float) -> list[float]:
        """Bytes a round sends for ``seconds`` of guest writes, per disk."""
        return [min(d.write_rate * seconds * priors.warm_granularity, float(d.virtual_bytes))
                for d in a.disks]

    base = on_wire([float(d.allocated_bytes) for d in a.disks])
    base_s = priors.copy_setup_s + _parallel_copy_s(base, link, cap)
    wire = sum(base)
    notes = [f"base copy {_size(a.allocated_bytes)} allocated, {_size(wire)} on the "
             f"wire, in {base_s:.1f} s while the guest runs"]
    steps: list[str] = []
    prev_s = base_s
    rounds: list[float] = []  # data bytes of each round
    rounds_s = 0.0
    for i in range(1, priors.warm_max_rounds + 1):
        data = written(prev_s)
        sent = on_wire(data)
        round_s = priors.copy_setup_s + _parallel_copy_s(sent, link, cap)
        rounds.append(sum(data))
        rounds_s += round_s
        wire += sum(sent)
        steps.append(f"round {i}: {_size(sum(data))} written during the previous copy, "
                     f"{round_s:.1f} s")
        prev_s = round_s
        if sum(data) <= priors.warm_small_delta:
            break
    if rounds[-1] > priors.warm_small_delta:
        writes = a.disk_write_rate
        dirty = writes * priors.warm_granularity
        what = (f"rounds do not shrink: disk writes {_rate(writes)} x granularity "
                f"{priors.warm_granularity:g} = {_rate(dirty)} of dirty blocks"
                + (" exceed" if dirty >= link else " against") + f" the link's {_rate(link)}"
                if len(rounds) >= 2 and rounds[-1] >= rounds[-2] else
                f"rounds still above {_size(priors.warm_small_delta)}")
        notes.append(f"{what}: cut over after {len(rounds)} rounds with "
                     f"{_size(rounds[-1])} still moving")
    shutdown = _shutdown_s(priors, shutdown_timeout)
    last = written(prev_s + shutdown)
    last_wire = on_wire(last)
    last_s = _parallel_copy_s(last_wire, link, cap)
    wire += sum(last_wire)
    down_s = shutdown + priors.copy_setup_s + last_s + priors.boot_s
    steps.append(f"cutover: shutdown {shutdown:.1f} s, last delta {_size(sum(last))} in "
                 f"{priors.copy_setup_s + last_s:.1f} s, boot {priors.boot_s:.1f} s")
    notes.append(f"downtime: shutdown {shutdown:.1f} s + copy setup {priors.copy_setup_s:.1f} s"
                 f" + last delta {last_s:.1f} s + boot {priors.boot_s:.1f} s")
    raw = Figures(total_time_s=priors.setup_s + base_s + rounds_s + down_s,
                  downtime_ms=down_s * 1000, wire_bytes=round(wire))
    return _Model(raw=raw, iterations=len(rounds), steps=tuple(steps), notes=tuple(notes))


# -- predict ------------------------------------------------------------------------------------


def _feasibility(a: Assessment, mode: Mode) -> str | None:
    """Why ``mode`` cannot run for ``a`` at all (None: it can)."""
    if a.link is None:
        return "no link measured to the destination"
    if mode == "cold":
        return None
    if not a.running:
        return f"{mode} migration needs a running VM ({a.vm} is stopped)"
    if mode == "live" and not a.shared_storage:
        local = ", ".join(d.device for d in a.disks if not d.shared)
        return f"live migration needs every disk on shared storage (not shared: {local})"
    if mode == "warm" and a.qemu_version is not None and a.qemu_version < (5, 0, 0):
        version = ".".join(str(x) for x in a.qemu_version)
        return (f"warm migration needs QEMU 5.0 or later (dirty bitmaps exported over NBD); "
                f"the source runs {version}")
    return None


def predict(
    a: Assessment,
    *,
    policy: Policy,
    downtime_ms: int | None = None,
    bandwidth: int | None = None,
    shutdown_timeout: float = 60.0,
    calibration: Calibration | None = None,
    priors: Priors = DEFAULT_PRIORS,
    postcopy_allowed: bool = True,
    max_downtime_ms: float | None = None,
) -> dict[Mode, ModePrediction]:
    """One prediction per mode of :data:`MODES`, for ``a`` under ``policy``.

    ``downtime_ms`` and ``bandwidth`` (bytes/s) override the policy's, as the
    migration's command-line options do; ``shutdown_timeout`` is the cold/warm
    power-off timeout. ``calibration`` scales the raw figures (see the module
    doc for the models). A mode that cannot run comes back with
    ``feasible=False`` and its reason, and no figures.

    Raises :class:`~vmigrate.errors.SpecError` for a downtime or bandwidth out of range (as
    :func:`~vmigrate.plan.capabilities.plan_setup` does).
    """
    calibration = Calibration() if calibration is None else calibration
    opts = MigrationOptions(policy=policy, downtime_ms=downtime_ms, bandwidth=bandwidth,
                            postcopy_allowed=postcopy_allowed, max_downtime_ms=max_downtime_ms)
    setup = plan_setup(opts, a.qemu_version or _DEFAULT_QEMU)
    out: dict[Mode, ModePrediction] = {}
    for mode in MODES:
        reason = _feasibility(a, mode)
        if reason is not None:
            out[mode] = ModePrediction(mode=mode, feasible=False, reason=reason)
            continue
        assert a.link is not None
        link = a.link.bandwidth * priors.link_efficiency
        cap = None if bandwidth is None else float(bandwidth)
        try:
            if mode == "live":
                model = _live_model(a, opts, setup, link=link, priors=priors)
            elif mode == "online":
                model = _online_model(a, opts, setup, link=link, priors=priors)
            elif mode == "cold":
                model = _cold_model(a, link=link, cap=cap, shutdown_timeout=shutdown_timeout,
                                    priors=priors)
            else:
                model = _warm_model(a, link=link, cap=cap, shutdown_timeout=shutdown_timeout,
                                    priors=priors)
        except _Infeasible as exc:
            out[mode] = ModePrediction(mode=mode, feasible=False, reason=exc.reason,
                                       converges=exc.converges)
            continue
        notes = list(model.notes)
        if mode == "warm" and a.qemu_version is None:
            notes.append("QEMU version unknown: assumed 5.0 or later")
        factors = calibration.factors(mode)
        if factors.samples:
            notes.append(f"calibrated on {factors.samples} migration"
                         f"{'s' if factors.samples != 1 else ''}: time "
                         f"x{factors.total_time_s:.2f}, downtime x{factors.downtime_ms:.2f}, "
                         f"bytes x{factors.wire_bytes:.2f}")
        out[mode] = ModePrediction(
            mode=mode, figures=factors.apply(model.raw), raw=model.raw,
            postcopy=model.postcopy, converges=model.converges, aborts=model.aborts,
            iterations=model.iterations, steps=model.steps, uncertainty=factors.spread,
            notes=tuple(notes))
    return out


# -- calibration --------------------------------------------------------------------------------


def _clamp(factor: float) -> float:
    return min(FACTOR_MAX, max(FACTOR_MIN, factor))


def _factors(entries: Sequence[HistoryEntry]) -> Factors:
    found: dict[str, float] = {}
    spreads: list[float] = []
    for name in _FIGURES:
        pairs = [(float(getattr(e.raw, name)), float(getattr(e.measured, name)))
                 for e in entries if getattr(e.raw, name) > 0]
        if not pairs:
            continue
        if len(pairs) < MIN_FACTOR_SAMPLES:
            continue
        factor = _clamp(statistics.median(m / r for r, m in pairs))
        found[name] = factor
        if len(pairs) >= MIN_SPREAD_SAMPLES:
            spreads.append(statistics.median(abs(m - factor * r) / (factor * r)
                                             for r, m in pairs))
    spread = max(spreads) if spreads else (PRIOR_SPREAD if found else None)
    return Factors(samples=len(entries), spread=spread, **found)


def calibrate(history: Sequence[HistoryEntry], *, vm: str | None = None,
              last: int = 20) -> Calibration:
    """Per-mode factors from migrations already measured.

    For each mode: the ``last`` most recent entries (by ``at``) of that mode,
    only ``vm``'s own when it has at least 2 of them, else every VM's. Each
    figure's factor is the median of measured / raw over the entries whose raw
    figure is above 0, clamped to [:data:`FACTOR_MIN`, :data:`FACTOR_MAX`]; with
    fewer than :data:`MIN_FACTOR_SAMPLES` such entries it stays 1 (one migration
    is not enough to trust). The spread is the median
    relative error of the calibrated figure (``|measured - factor x raw| /
    (factor x raw)``), the worst of the three, from at least
    :data:`MIN_SPREAD_SAMPLES` entries (:data:`PRIOR_SPREAD` with fewer). Modes
    without entries stay uncalibrated.
    """
    if last < 1:
        raise ValueError(f"last={last}: calibrate on at least one migration")
    modes: dict[Mode, Factors] = {}
    for mode in MODES:
        entries = [e for e in history if e.mode == mode]
        if vm is not None:
            own = [e for e in entries if e.vm == vm]
            if len(own) >= 2:
                entries = own
        entries = sorted(entries, key=lambda e: e.at, reverse=True)[:last]
        if entries:
            modes[mode] = _factors(entries)
    return Calibration(modes=modes)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def measured_figures(report: Mapping[str, Any]) -> Figures | None:
    """The measured figures of a finished migration report (a version-2
    ``MigrationReport`` as a dict; ``vmigrate.migration.report.load_report`` upgrades
    older ones).

    Total time: the job's, less ``checks_s`` (the checks of the guest after it ran on
    the destination, which the models do not predict). Downtime: the probe's
    observed downtime, else QEMU's (``memory.qemu_downtime_ms``). Wire bytes:
    ``bytes_transferred``, which holds the memory stream and every disk. None when
    the migration did not complete, its mode is unknown, or a figure is missing.
    """
    if report.get("status") != "completed" or report.get("mode") not in (
            "live", "online", "cold", "warm"):
        return None
    total = _number(report.get("total_time_s"))
    checks = _number(report.get("checks_s"))
    if total is not None and checks is not None:  # the migration, not our checks after it
        total = max(0.0, total - checks)
    downtime = _number(report.get("observed_downtime_ms"))
    memory = report.get("memory")
    if downtime is None and isinstance(memory, Mapping):
        downtime = _number(memory.get("qemu_downtime_ms"))
    wire = _number(report.get("bytes_transferred"))
    if total is None or downtime is None or wire is None:
        return None
    try:
        return Figures(total_time_s=total, downtime_ms=downtime, wire_bytes=round(wire))
    except ValidationError:
        return None
