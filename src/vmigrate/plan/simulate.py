"""A simulated QEMU pre-copy/post-copy migration, in simulated time (pure).

:class:`SimulatedMigration` models what the convergence controller sees of a
real migration, without any I/O. It is the physics behind both the live
migration prediction (:mod:`vmigrate.plan.predict`) and the fake the policy
tests drive (:mod:`vmigrate.testing.fakemigration` re-exports it):

* pre-copy sends at ``min(link_rate, max-bandwidth)``; while it does, the
  guest dirties ``dirty_rate`` bytes/s (less the CPU throttle, nothing while
  paused), up to its working set ``wss``;
* QEMU looks at what is left of a pass once per ``tick`` (10 ms: QEMU checks
  the pending size between bursts of sending); a pass ends
  (``dirty-sync-count`` + 1) at the first check where what is left fits in
  ``max-bandwidth x downtime-limit``; the pages dirtied meanwhile join what is
  left of it and become the next pass; if *that* fits, the guest stops and the
  migration completes, with a downtime of its transfer time plus
  ``switchover_ms``, plus ``backlog_ms`` when the stream is not paced to the link
  (``max-bandwidth`` above ``link_rate``, what QEMU reaches on it): QEMU then keeps the
  link's queues full, and the guest waits for them to drain at the switchover;
* ``auto-converge`` follows QEMU 7.2: at a sync, if the guest dirtied more than
  ``throttle-trigger-threshold`` % of what was sent since the last sync twice
  in a row, the throttle starts at ``cpu-throttle-initial`` or grows by
  ``cpu-throttle-increment``, never above ``max-cpu-throttle``;
* ``migrate-start-postcopy`` moves the guest at once (downtime
  ``postcopy_switch_ms``, by default ``switchover_ms``, and the backlog as above) and
  streams what is
  left; with ``multifd`` on, it fails, as the destination of a real QEMU 7.2
  does;
* parameters are range-checked like QEMU 7.2 and a bad one raises
  :class:`~vmigrate.errors.QmpError` (the migration is left unchanged).

Time advances tick by tick. With ``fast`` set, runs of ticks in which nothing
but the counters can change (no pass can end, post-copy cannot finish) are
taken in one step: the state only moves linearly there, so the result is the
same as ticking up to float rounding, and a long simulation stays cheap. (Float
rounding can still tip a knife-edge comparison, such as auto-converge's
"dirtied more than was sent" when both are exactly the working set, so the
tests' fake ticks one tick at a time.)

:meth:`SimulatedMigration.query_migrate` answers like QEMU's
``query-migrate``, so samples go through :meth:`Sample.from_query_migrate`.
:func:`drive` runs a controller against a simulation the way the engine does: a
sample every 0.5 s, and one at every pass end and at the end (QEMU's events).
:func:`drive_sparse` gives the same outcome with only the samples the controller can
act on (see its docstring); the prediction uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmigrate.errors import QmpCommandError
from vmigrate.plan.capabilities import MigrationSetup
from vmigrate.plan.convergence import (
    Abort,
    Action,
    Controller,
    PauseGuest,
    Sample,
    SetParameters,
    StartPostcopy,
    StepRecord,
)
from vmigrate.plan.policy import QEMU_DEFAULT_DOWNTIME_MS, QEMU_DEFAULT_MAX_BANDWIDTH

__all__ = [
    "TERMINAL",
    "SimRun",
    "SimulatedMigration",
    "drive",
    "drive_sparse",
]

TERMINAL = frozenset({"completed", "failed", "cancelled"})

_PARAM_DEFAULTS: dict[str, int] = {
    "downtime-limit": QEMU_DEFAULT_DOWNTIME_MS,
    "max-bandwidth": QEMU_DEFAULT_MAX_BANDWIDTH,
    "max-postcopy-bandwidth": 0,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "max-cpu-throttle": 99,
    "throttle-trigger-threshold": 50,
    "multifd-channels": 2,
}
_STRING_PARAMS = {"multifd-compression": ("none", "zlib", "zstd")}
#: float slack when comparing simulated times
_EPS = 1e-9


def _check(params: Mapping[str, Any]) -> None:
    """QEMU 7.2's range checks (migrate_params_check), on the merged values."""

    def bad(name: str, what: str) -> QmpCommandError:
        return QmpCommandError(f"Parameter '{name}' expects {what}", "GenericError")

    ranges = {
        "downtime-limit": (0, 2_000_000),
        "cpu-throttle-initial": (1, 99),
        "cpu-throttle-increment": (1, 99),
        "throttle-trigger-threshold": (1, 100),
        "max-bandwidth": (0, 2**64 - 1),
        "max-postcopy-bandwidth": (0, 2**64 - 1),
        "multifd-channels": (0, 255),
    }
    for name, (low, high) in ranges.items():
        value = params[name]
        if not low <= value <= high:
            raise bad(name, f"an integer in the range of {low} to {high}")
    if not params["cpu-throttle-initial"] <= params["max-cpu-throttle"] <= 99:
        raise bad("max-cpu-throttle", "an integer in the range of cpu_throttle_initial to 99")


@dataclass
class SimulatedMigration:
    """One simulated outgoing migration. Sizes in bytes, rates in bytes/s, times in s.

    ``t`` is the simulated time since ``migrate``; ``ended_at`` the time it
    reached a terminal status (completed at the tick the last pass fitted,
    cancelled at the ``migrate_cancel``), ``postcopy_at`` / ``paused_at`` when
    post-copy started / the guest was stopped.
    """

    ram: int
    link_rate: float
    dirty_rate: float = 0.0
    #: the most bytes the guest keeps dirty (its working set); default all RAM
    wss: int | None = None
    capabilities: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=lambda: dict(_PARAM_DEFAULTS))
    page_size: int = 4096
    #: fixed part of the stop-and-copy downtime, ms
    switchover_ms: float = 20.0
    #: downtime of the switch to post-copy, ms; None = switchover_ms
    postcopy_switch_ms: float | None = None
    #: what the link's queues hold when the stream is not paced to the link, ms at the
    #: link rate: added to the downtime of either switch
    backlog_ms: float = 0.0
    #: how often QEMU checks what is left of a pass, seconds
    tick: float = 0.01
    #: take quiet runs of ticks in one step (see the module doc)
    fast: bool = False

    t: float = 0.0
    status: str = "active"
    iteration: int = 1
    remaining: float = -1.0
    transferred: float = 0.0
    throttle_pct: int = 0
    paused_at: float | None = None
    postcopy_at: float | None = None
    ended_at: float | None = None
    downtime_ms: float | None = None
    error: str | None = None
    _dirty: float = 0.0
    _xfer_period: float = 0.0
    _dirty_period: float = 0.0
    _high: int = 0

    def __post_init__(self) -> None:
        if self.tick <= 0:
            raise ValueError("tick must be positive")
        if self.remaining < 0:
            self.remaining = float(self.ram)
        for name, value in _PARAM_DEFAULTS.items():
            self.params.setdefault(name, value)
        self.params.setdefault("multifd-compression", "none")

    @classmethod
    def from_setup(cls, setup: MigrationSetup, *, ram: int, link_rate: float,
                   dirty_rate: float = 0.0, wss: int | None = None,
                   switchover_ms: float = 20.0, postcopy_switch_ms: float | None = None,
                   backlog_ms: float = 0.0, fast: bool = False) -> SimulatedMigration:
        """A simulation started the way the engine starts a real migration from ``setup``."""
        mig = cls(ram=ram, link_rate=link_rate, dirty_rate=dirty_rate, wss=wss,
                  capabilities=dict(setup.capabilities), switchover_ms=switchover_ms,
                  postcopy_switch_ms=postcopy_switch_ms, backlog_ms=backlog_ms, fast=fast)
        mig.set_parameters(setup.parameters)
        return mig

    # -- QMP-like surface

    def set_parameters(self, params: Mapping[str, object]) -> None:
        """``migrate-set-parameters``; raises QmpError and changes nothing if out of range."""
        merged = dict(self.params)
        for name, value in params.items():
            if name in _STRING_PARAMS:
                if value not in _STRING_PARAMS[name]:
                    raise QmpCommandError(f"Parameter '{name}' does not accept {value!r}",
                                   "GenericError")
            elif name not in _PARAM_DEFAULTS:
                raise QmpCommandError(f"Parameter '{name}' is unexpected", "GenericError")
            elif not isinstance(value, int) or isinstance(value, bool):
                raise QmpCommandError(f"Invalid parameter type for '{name}', expected: integer",
                               "GenericError")
            merged[name] = value
        _check(merged)
        self.params = merged

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``."""
        if not self.capabilities.get("postcopy-ram", False):
            raise QmpCommandError("Enable postcopy with migrate_set_capability before the start "
                           "of migration", "GenericError")
        if self.status != "active":
            return
        if self.capabilities.get("multifd", False):
            # what QEMU 7.2 does: the destination aborts, the stream breaks
            self._end("failed", self.t)
            self.error = "destination QEMU crashed (multifd with post-copy)"
            return
        self.status = "postcopy-active"
        self.postcopy_at = self.t
        self.remaining += self._dirty
        self._dirty = 0.0
        pause = 0.0 if self.paused_at is None else (self.t - self.paused_at) * 1000
        switch = self.switchover_ms if self.postcopy_switch_ms is None \
            else self.postcopy_switch_ms
        self.downtime_ms = pause + switch + self._backlog()

    def stop_guest(self) -> None:
        """``stop`` on the source."""
        if self.paused_at is None and self.status not in TERMINAL:
            self.paused_at = self.t

    def cancel(self) -> None:
        """``migrate_cancel``."""
        if self.status in ("active", "setup"):
            self._end("cancelled", self.t)

    def apply(self, action: Action) -> None:
        """Execute one controller action the way the engine would."""
        if isinstance(action, SetParameters):
            self.set_parameters(action.params)
        elif isinstance(action, StartPostcopy):
            self.start_postcopy()
        elif isinstance(action, PauseGuest):
            self.stop_guest()
        elif isinstance(action, Abort):
            self.cancel()

    def query_migrate(self) -> dict[str, Any]:
        """What QEMU's ``query-migrate`` would return now."""
        rate = self._rate()
        reply: dict[str, Any] = {"status": self.status}
        reply["ram"] = {
            "transferred": int(self.transferred),
            "remaining": int(self.remaining),
            "total": self.ram,
            "dirty-sync-count": self.iteration,
            "dirty-pages-rate": int(self._effective_dirty_rate() / self.page_size),
            "page-size": self.page_size,
            "mbps": rate * 8 / 1e6,
            "postcopy-requests": 0,
        }
        if self.capabilities.get("auto-converge", False) and self.throttle_pct:
            reply["cpu-throttle-percentage"] = self.throttle_pct
        if self.status == "active":
            reply["expected-downtime"] = int(self.remaining / rate * 1000) if rate else 0
        if self.status == "completed" and self.downtime_ms is not None:
            reply["downtime"] = round(self.downtime_ms)
        if self.error:
            reply["error-desc"] = self.error
        return reply

    def sample(self) -> Sample:
        return Sample.from_query_migrate(self.t, self.query_migrate())

    # -- simulation

    def _rate(self) -> float:
        if self.status == "postcopy-active":
            cap = self.params["max-postcopy-bandwidth"]
            return float(min(self.link_rate, cap)) if cap else float(self.link_rate)
        return float(min(self.link_rate, self.params["max-bandwidth"]))

    def _threshold(self, rate: float) -> float:
        return rate * float(self.params["downtime-limit"]) / 1000

    def _effective_dirty_rate(self) -> float:
        if self.paused_at is not None or self.status != "active":
            return 0.0
        return self.dirty_rate * (1 - self.throttle_pct / 100)

    def _end(self, status: str, at: float) -> None:
        self.status = status
        self.ended_at = at

    def next_change(self) -> float:
        """Seconds until the next pass end or completion, if the state moves on as now.

        A lower bound: the change happens at the first tick at or after it (inf
        when nothing is sent). Actions (parameters, pause, post-copy) reset it.
        """
        if self.status in TERMINAL:
            return 0.0
        rate = self._rate()
        if self.status == "postcopy-active":
            return self.remaining / rate if rate > 0 else math.inf
        left = self.remaining - self._threshold(rate)
        if left <= 0:
            return 0.0
        return left / rate if rate > 0 else math.inf

    def _quiet_ticks(self) -> int:
        """Whole ticks from now in which no pass can end and post-copy cannot finish."""
        rate = self._rate()
        if rate <= 0:
            return 1 << 62
        per_tick = rate * self.tick
        if self.status == "postcopy-active":
            left = self.remaining
        else:
            left = self.remaining - self._threshold(rate)
        # ticks after which more than per_tick is still left (so the last one also
        # sends a full tick and ends nothing); one fewer, for float safety
        return max(0, math.ceil(left / per_tick) - 2)

    def advance(self, seconds: float) -> None:
        """Run the migration for ``seconds`` of simulated time."""
        end = self.t + seconds
        while self.t < end - _EPS and self.status not in TERMINAL:
            quiet = 0
            if self.fast:
                quiet = min(self._quiet_ticks(), int((end - self.t) / self.tick + _EPS))
            dt = min(quiet * self.tick if quiet >= 2 else self.tick, end - self.t)
            self._step(dt)
            self.t += dt
        self.t = end  # not a float's width past it: samples stay on their grid

    def _step(self, dt: float) -> None:
        rate = self._rate()
        sent = min(self.remaining, rate * dt)
        self.remaining -= sent
        self.transferred += sent
        if self.status == "postcopy-active":
            if self.remaining <= 0:
                self._end("completed", self.t + dt)
            return
        self._xfer_period += sent
        wss = float(self.ram if self.wss is None else self.wss)
        new = self._effective_dirty_rate() * dt
        self._dirty = min(wss, self._dirty + new)
        self._dirty_period += new
        threshold = self._threshold(rate)
        if self.remaining > threshold:
            return
        # end of pass: sync the dirty bitmap
        self.iteration += 1
        dirtied = min(self._dirty_period, wss)
        self.remaining += self._dirty
        self._dirty = 0.0
        self._auto_converge(dirtied)
        self._xfer_period = self._dirty_period = 0.0
        if self.remaining <= threshold:
            final_ms = self.remaining / rate * 1000 if rate else 0.0
            now = self.t + dt
            pause = 0.0 if self.paused_at is None else (now - self.paused_at) * 1000
            self.transferred += self.remaining
            self.remaining = 0.0
            self.downtime_ms = pause + final_ms + self.switchover_ms + self._backlog()
            self._end("completed", now)

    def _backlog(self) -> float:
        """What the guest waits for at a switch behind the link's queues (ms): nothing
        when pre-copy was paced to the link."""
        return self.backlog_ms if self.params["max-bandwidth"] > self.link_rate else 0.0

    def _auto_converge(self, dirtied: float) -> None:
        if not self.capabilities.get("auto-converge", False):
            return
        limit = self._xfer_period * self.params["throttle-trigger-threshold"] / 100
        if dirtied <= limit:
            return
        self._high += 1
        if self._high < 2:
            return
        self._high = 0
        if self.throttle_pct == 0:
            self.throttle_pct = self.params["cpu-throttle-initial"]
        else:
            self.throttle_pct = min(self.throttle_pct + self.params["cpu-throttle-increment"],
                                    self.params["max-cpu-throttle"])


@dataclass(frozen=True)
class SimRun:
    """How a driven simulated migration ended."""

    status: str
    #: simulated time of the last sample (the run stops at a sample)
    t: float
    downtime_ms: float | None
    actions: list[Action]
    samples: list[Sample]
    history: list[StepRecord]
    max_throttle: int
    #: when the migration reached its terminal status (None: it had not when the run stopped)
    ended_at: float | None = None
    #: bytes sent in all
    transferred: float = 0.0
    #: ram.dirty-sync-count at the end
    iterations: int = 0
    postcopy_at: float | None = None
    paused_at: float | None = None


def _observe(controller: Controller, mig: SimulatedMigration,
             samples: list[Sample], actions: list[Action]) -> int:
    sample = mig.sample()
    samples.append(sample)
    for action in controller.observe(sample):
        actions.append(action)
        mig.apply(action)
    return sample.throttle_pct


def _run(controller: Controller, mig: SimulatedMigration, actions: list[Action],
         samples: list[Sample], max_throttle: int) -> SimRun:
    return SimRun(status=mig.status, t=mig.t, downtime_ms=mig.downtime_ms, actions=actions,
                  samples=samples, history=controller.history, max_throttle=max_throttle,
                  ended_at=mig.ended_at, transferred=mig.transferred,
                  iterations=mig.iteration, postcopy_at=mig.postcopy_at,
                  paused_at=mig.paused_at)


def _to_change(mig: SimulatedMigration, before: float) -> None:
    """Run ``mig`` until its next pass end, post-copy's end or completion (the source
    emits an event then, MIGRATION_PASS or MIGRATION, which wakes the engine's sampling),
    but not past ``before`` seconds from now."""
    end = mig.t + before
    state = (mig.iteration, mig.status)
    while (mig.iteration, mig.status) == state and mig.t < end - _EPS:
        ahead = mig.next_change()
        step = max(mig.tick, math.ceil(ahead / mig.tick - _EPS) * mig.tick) \
            if math.isfinite(ahead) else end - mig.t
        mig.advance(min(step, end - mig.t))


def drive(controller: Controller, mig: SimulatedMigration, *,
          interval: float = 0.5, limit_s: float = 3600.0) -> SimRun:
    """Sample ``mig`` into ``controller`` and apply its actions as the engine does: every
    ``interval`` s, and at once when a pass ends or the migration completes (the
    engine wakes on QEMU's MIGRATION_PASS and MIGRATION events; the next sample comes
    ``interval`` after it).

    The controller's initial parameters are set first when ``mig`` has not started,
    as the engine sets them before ``migrate``. Stops when the migration ends or
    after ``limit_s`` simulated seconds.
    A QmpError from an action propagates (the test sees the bad parameter).
    """
    actions: list[Action] = []
    samples: list[Sample] = []
    max_throttle = 0
    if mig.t == 0:
        mig.set_parameters(controller.initial_parameters())  # as the engine does
    while True:
        max_throttle = max(max_throttle, _observe(controller, mig, samples, actions))
        if mig.status in TERMINAL or mig.t >= limit_s or not math.isfinite(mig.t):
            break
        _to_change(mig, interval)
    return _run(controller, mig, actions, samples, max_throttle)


def drive_sparse(controller: Controller, mig: SimulatedMigration, *,
                 timeout_s: float, interval: float = 0.5, limit_s: float = 3600.0) -> SimRun:
    """:func:`drive`, leaving out the samples the controller cannot act on.

    Between two changes (a pass end, post-copy's end, completion) only the last
    sample before the change and the one at it are taken, plus the first at or
    after ``timeout_s`` (the policy's timeout, which the controller checks at every
    sample). A sample in between would only tell the controller what it already
    knows (same status, same iteration, same throttle), so the outcome, the actions
    and the step history are those of :func:`drive`; ``samples`` holds only the
    samples taken. ``mig`` must start at ``t = 0``.
    """
    actions: list[Action] = []
    samples: list[Sample] = []
    max_throttle = 0
    if mig.t == 0:
        mig.set_parameters(controller.initial_parameters())  # as the engine does
    while True:
        max_throttle = max(max_throttle, _observe(controller, mig, samples, actions))
        if mig.status in TERMINAL or mig.t >= limit_s or not math.isfinite(mig.t):
            break
        ahead = mig.next_change()
        if ahead < interval - 1e-6:
            _to_change(mig, interval)  # the change, or the next sample if it comes first
            continue
        # the last sample safely before the change; never past the timeout's sample or
        # the limit
        skip: float = max(1, math.ceil((ahead - 1e-6) / interval) - 1) \
            if math.isfinite(ahead) else math.inf
        if mig.t < timeout_s - _EPS and math.isfinite(timeout_s):
            skip = min(skip, math.ceil((timeout_s - mig.t) / interval - _EPS))
        if math.isfinite(limit_s):
            skip = min(skip, max(1, math.ceil((limit_s - mig.t) / interval - _EPS)))
        if not math.isfinite(skip):
            break  # nothing will ever change and there is no limit: stop here
        mig.advance(int(skip) * interval)
    return _run(controller, mig, actions, samples, max_throttle)
