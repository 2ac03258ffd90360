"""The convergence controller: ``query-migrate`` samples in, actions out (pure).

:class:`ConvergenceController` applies a policy's steps
(:mod:`vmigrate.plan.policy`) to a migration set up by
:func:`~vmigrate.plan.capabilities.plan_setup`: it is fed one :class:`Sample`
per ``query-migrate`` reading and returns the :data:`Action` s to execute
(:class:`SetParameters`, :class:`StartPostcopy`, :class:`PauseGuest`,
:class:`Abort`); :class:`StepRecord` s tell the report what it did and skipped.

Stalls
------
The controller looks at ``ram.remaining`` at every iteration end (the first
sample whose ``ram.dirty-sync-count`` is higher than before: right after the
sync, remaining is what the guest dirtied during the pass). An iteration is
*stalled* when that remaining is above ``stall_ratio`` times the best (lowest)
remaining seen at earlier iteration ends; the baseline before the first end is
the whole RAM. Samples come every ~0.5 s, so the first sample of a new iteration
may be well into it: the bytes sent since the sync are added back (estimated
from ``ram.transferred`` since the previous sample, less what the old pass
still had to send above QEMU's threshold of ``mbps`` x downtime limit). Several
syncs between two samples count as one iteration end, without that correction.
``stall_ratio = 0`` makes every iteration end with data left count as stalled,
so ``after_stalls`` becomes "after N completed iterations" (the ``postcopy``
built-in uses that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vmigrate.plan.capabilities import MigrationOptions, MigrationSetup, throttle_parameters
from vmigrate.plan.policy import Step

__all__ = [
    "Abort",
    "Action",
    "Controller",
    "ConvergenceController",
    "PauseGuest",
    "Sample",
    "SetParameters",
    "StartPostcopy",
    "StepRecord",
]


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return default


def _float(value: object, default: float = 0.0) -> float:
    if isinstance(value, bool):
        return default
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return default


def _opt_int(value: object) -> int | None:
    return None if value is None or isinstance(value, bool) else _int(value)


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` reading on the source."""

    #: seconds since perform started
    t: float
    #: setup|active|postcopy-active|postcopy-paused|completed|failed|cancelled|device|...
    status: str
    transferred: int
    remaining: int
    total: int
    #: ram.dirty-sync-count
    iteration: int
    #: pages/s (ram.dirty-pages-rate)
    dirty_rate: float
    page_size: int = 4096
    throttle_pct: int = 0
    mbps: float = 0.0
    #: QEMU's estimate while active (expected-downtime), ms
    expected_downtime_ms: int | None = None
    #: the real downtime once completed (downtime), ms
    downtime_ms: int | None = None
    postcopy_requests: int = 0

    @property
    def dirty_bytes_rate(self) -> float:
        """Bytes per second the guest dirties."""
        return self.dirty_rate * self.page_size

    @classmethod
    def from_query_migrate(cls, t: float, reply: Mapping[str, Any]) -> Sample:
        """Build a sample from ``query-migrate``'s return value (or the whole reply).

        Missing or ill-typed fields read as zero/None: the ``setup`` phase has no
        ``ram``, and a never-started migration has no ``status`` (``"none"``).
        """
        body: Mapping[str, Any] = reply
        inner = reply.get("return")
        if isinstance(inner, Mapping):
            body = inner
        ram = body.get("ram")
        if not isinstance(ram, Mapping):
            ram = {}
        status = body.get("status")
        return cls(
            t=t,
            status=status if isinstance(status, str) else "none",
            transferred=_int(ram.get("transferred")),
            remaining=_int(ram.get("remaining")),
            total=_int(ram.get("total")),
            iteration=_int(ram.get("dirty-sync-count")),
            dirty_rate=_float(ram.get("dirty-pages-rate")),
            page_size=_int(ram.get("page-size"), 4096) or 4096,
            throttle_pct=_int(body.get("cpu-throttle-percentage")),
            mbps=_float(ram.get("mbps")),
            expected_downtime_ms=_opt_int(body.get("expected-downtime")),
            downtime_ms=_opt_int(body.get("downtime")),
            postcopy_requests=_int(ram.get("postcopy-requests")),
        )


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetParameters:
    """Run ``migrate-set-parameters`` on the source with ``params``."""

    params: dict[str, object]
    why: str


@dataclass(frozen=True)
class StartPostcopy:
    """Run ``migrate-start-postcopy`` on the source."""

    why: str


@dataclass(frozen=True)
class PauseGuest:
    """Stop the source guest (``stop``) so the remaining pages stop changing."""

    why: str


@dataclass(frozen=True)
class Abort:
    """Cancel the migration (``migrate_cancel``); the source keeps running."""

    why: str


Action = SetParameters | StartPostcopy | PauseGuest | Abort


@dataclass(frozen=True)
class StepRecord:
    """One thing the controller did (or skipped), for the report."""

    t: float
    iteration: int
    #: downtime|throttle|postcopy|pause|abort, or "timeout"
    action: str
    detail: str
    #: index into policy.steps; None for the timeout
    step: int | None = None
    #: False when the step was skipped (detail says why)
    taken: bool = True


class Controller(Protocol):
    """What drives a memory migration: the schedule follower below, or the adaptive
    planner (:class:`vmigrate.plan.adaptive.AdaptiveController`)."""

    def initial_parameters(self) -> dict[str, object]: ...

    def observe(self, sample: Sample) -> list[Action]: ...

    @property
    def history(self) -> list[StepRecord]: ...


_TERMINAL = frozenset({"completed", "failed", "cancelled", "cancelling"})


class ConvergenceController:
    """Turns ``query-migrate`` samples into actions, by the policy.

    Feed every sample to :meth:`observe` in time order and execute what it
    returns, in order. The controller only reads samples; if an action fails
    to execute, the controller does not know and will not retry it (one-shot
    actions are emitted at most once each).
    """

    def __init__(self, setup_opts: MigrationOptions, setup: MigrationSetup) -> None:
        self._policy = setup_opts.policy
        self._setup = setup
        limit = setup.parameters.get("downtime-limit", self._policy.downtime_ms)
        self._downtime = limit if isinstance(limit, int) else self._policy.downtime_ms
        self._next = 0
        self._since_step = 0
        self._stalls = 0
        self._last_iteration: int | None = None
        self._best: int | None = None
        self._prev: Sample | None = None
        self._done: set[str] = set()
        self._timed_out = False
        self._history: list[StepRecord] = []

    def initial_parameters(self) -> dict[str, object]:
        """The source parameters to set before ``migrate`` (a copy of the setup's)."""
        return dict(self._setup.parameters)

    @property
    def history(self) -> list[StepRecord]:
        """Every step taken or skipped, and the timeout, in order (a copy)."""
        return list(self._history)

    @property
    def stalls(self) -> int:
        """Stalled iterations seen so far."""
        return self._stalls

    def observe(self, sample: Sample) -> list[Action]:
        """Take one sample; return the actions to execute now (often none)."""
        if "abort" in self._done or sample.status in _TERMINAL:
            return []
        actions: list[Action] = []
        if sample.status == "active":
            actions += self._track(sample)
        if "abort" in self._done:  # a step aborted: the timeout has nothing left to do
            return actions
        if not self._timed_out and sample.t >= self._policy.timeout_s:
            actions += self._timeout(sample)
        return actions

    # -- stalls and steps

    def _track(self, sample: Sample) -> list[Action]:
        if self._last_iteration is None or self._best is None:
            self._last_iteration = sample.iteration
            self._prev = sample
            # before the first iteration end, the baseline is the whole RAM
            first = sample.iteration <= 1
            self._best = max(sample.total, sample.remaining) if first else sample.remaining
            return []
        prev, self._prev = self._prev, sample
        if sample.iteration <= self._last_iteration:
            return []
        synced_once = sample.iteration == self._last_iteration + 1
        self._last_iteration = sample.iteration
        remaining = sample.remaining
        if synced_once and prev is not None:
            remaining += self._sent_since_sync(prev, sample)
        stalled = remaining > self._policy.stall_ratio * self._best
        self._best = min(self._best, remaining)
        if not stalled:
            return []
        self._stalls += 1
        self._since_step += 1
        steps = self._policy.steps
        if self._next >= len(steps) or self._since_step < steps[self._next].after_stalls:
            return []
        index = self._next
        self._next += 1
        self._since_step = 0
        action = self._fire(index, steps[index], sample)
        return [] if action is None else [action]

    def _sent_since_sync(self, prev: Sample, sample: Sample) -> int:
        """Estimate of the bytes sent between the sync and ``sample``.

        QEMU syncs once the pass has less left than its threshold (measured
        bandwidth x downtime limit); of what was sent since ``prev``, the part
        beyond ``prev.remaining - threshold`` belongs to the new pass.
        """
        threshold = prev.mbps * 125_000 * self._downtime / 1000
        before_sync = max(0.0, prev.remaining - threshold)
        return max(0, int(sample.transferred - prev.transferred - before_sync))

    def _record(self, sample: Sample, action: str, detail: str, step: int | None,
                taken: bool = True) -> None:
        self._history.append(StepRecord(
            t=sample.t, iteration=sample.iteration, action=action, detail=detail,
            step=step, taken=taken,
        ))

    def _fire(self, index: int, step: Step, sample: Sample) -> Action | None:
        why = f"{self._since_step_text(step)} (step {index + 1} of {self._policy.name!r})"
        skip: str | None = None
        action: Action | None = None
        if step.action == "downtime":
            assert step.value is not None
            if step.value <= self._downtime:
                skip = f"downtime limit is already {self._downtime} ms"
            else:
                self._downtime = step.value
                action = SetParameters({"downtime-limit": step.value},
                                       f"{why}: raise downtime limit to {step.value} ms")
        elif step.action == "throttle":
            assert step.value is not None
            if not self._setup.capabilities.get("auto-converge", False):
                skip = "auto-converge was not enabled before the migration started"
            else:
                action = SetParameters(throttle_parameters(step.value),
                                       f"{why}: throttle guest CPUs from {step.value}%")
        elif step.action == "postcopy":
            if not self._setup.postcopy:
                skip = "postcopy-ram was not enabled before the migration started"
            elif "postcopy" in self._done:
                skip = "already in post-copy"
            else:
                action = StartPostcopy(f"{why}: switch to post-copy")
        elif step.action == "pause":
            if "postcopy" in self._done:
                skip = "the guest already runs on the destination (post-copy)"
            elif "pause" in self._done:
                skip = "the guest is already paused"
            else:
                action = PauseGuest(f"{why}: pause the guest to finish the copy")
        else:
            action = Abort(f"{why}: cancel the migration")
        if action is None:
            self._record(sample, step.action, f"skipped: {skip}", index, taken=False)
            return None
        self._done.add(step.action)
        self._record(sample, step.action, action.why, index)
        return action

    @staticmethod
    def _since_step_text(step: Step) -> str:
        return f"{step.after_stalls} stalled iteration{'s' if step.after_stalls != 1 else ''}"

    # -- timeout

    def _timeout(self, sample: Sample) -> list[Action]:
        status = sample.status
        limit = f"timeout after {self._policy.timeout_s:g} s"
        if status.startswith("postcopy") or "postcopy" in self._done:
            self._timed_out = True
            self._record(sample, "timeout", f"{limit}: in post-copy, cannot cancel; "
                         "waiting for it to finish", None, taken=False)
            return []
        if status not in ("setup", "active"):
            return []  # switching over right now: look again at the next sample
        self._timed_out = True
        action: Action | None = None
        if self._policy.timeout_action == "abort":
            action = Abort(f"{limit}: cancel the migration")
            self._done.add("abort")
        elif self._setup.postcopy:
            action = StartPostcopy(f"{limit}: force completion by post-copy")
            self._done.add("postcopy")
        elif "pause" not in self._done:
            action = PauseGuest(f"{limit}: force completion by pausing the guest")
            self._done.add("pause")
        if action is None:
            self._record(sample, "timeout", f"{limit}: guest already paused; waiting", None,
                         taken=False)
            return []
        self._record(sample, "timeout", action.why, None)
        return [action]
