"""A migration job as the engine runs it: its state, hosts, report, log and undo list.

:class:`Job` is the context every strategy and verifier works on. It owns the
write-ahead rule: :meth:`Job.enter` stores the phase, :meth:`Job.register`
stores an undo, :meth:`Job.save` stores any other fact of :class:`JobState`,
each **before** the side effect it announces.

Undo actions are named and registered in :data:`UNDO` by the modules that
allocate (``@undo_action("name")``), so a rollback runs the same code whether the
controller that allocated is still alive or ``job recover`` runs it after a
crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from vmigrate.audit.log import AuditLog, AuditRecord
from vmigrate.drivers.base import Driver, Monitor
from vmigrate.errors import Cancelled, NeedsOperator, StoreError
from vmigrate.migration.report import MigrationReport
from vmigrate.migration.state import JobOptions, JobState, Phase, Undo
from vmigrate.progress import Event, ProgressFn, guarded
from vmigrate.store import Store
from vmigrate.transfer.mover import Mover

if TYPE_CHECKING:
    from vmigrate.migration.verify import Verifier

T = TypeVar("T")

#: a testing aid for the end-to-end tests: the controller SIGKILLs itself right after
#: it audited the decision of this name (e.g. ``completed``), to test ``job recover``
#: at a precise point
KILL_AT_ENV = "VMIGRATE_TEST_KILL_AT"


@dataclass(frozen=True)
class Timing:
    """How long the engine waits for things (seconds). The defaults are for real
    hosts; the unit tests run the same code with tiny values."""

    #: between two ``query-migrate`` samples
    sample_s: float = 0.5
    #: pre-copy: no byte moved for this long and the link is taken as broken
    link_stall_s: float = 6.0
    #: post-copy: no byte moved for this long while pages remain: pause and recover
    postcopy_stall_s: float = 3.0
    #: a monitor that does not answer within this long is taken as lost
    qmp_timeout_s: float = 20.0
    #: between two polls of a state that is about to change
    poll_s: float = 0.2
    #: for the destination guest to run once the migration completed
    dest_run_wait_s: float = 30.0
    #: for the source's migration to settle after ``migrate_cancel``
    cancel_wait_s: float = 30.0
    #: disk mirrors: between samples, and how long completing them at the switch may take
    mirror_sample_s: float = 0.5
    handover_timeout_s: float = 120.0
    #: after a forced mirror cancel, before cutting the mirrors' connections
    cancel_grace_s: float = 3.0
    #: warm with a cutover time: pause between rounds
    round_pause_s: float = 5.0
    #: after the point of no return, a failing step is tried this many times, this far
    #: apart, before the job needs an operator
    forward_tries: int = 6
    forward_retry_s: float = 2.0
    #: verifiers: how long a booted guest may take to say it is up, to answer ping, to
    #: print its memory check
    boot_wait_s: float = 120.0
    ping_wait_s: float = 30.0
    memcheck_wait_s: float = 60.0


UndoFn = Callable[["Job", Mapping[str, Any]], Awaitable[None]]


class PointOfNoReturnPassed(Exception):
    """Raised by an undo that finds the guest already taken by the destination (QEMU
    completed while the job failed): the rollback stops and the job finishes
    forward."""

#: every undo action by name (filled by the modules that allocate)
UNDO: dict[str, UndoFn] = {}


def undo_action(name: str) -> Callable[[UndoFn], UndoFn]:
    """Register ``fn`` as the undo action ``name`` (an idempotent release)."""

    def register(fn: UndoFn) -> UndoFn:
        if name in UNDO:
            raise ValueError(f"undo action {name!r} registered twice")
        UNDO[name] = fn
        return fn

    return register


class Job:
    """One migration job while the engine (or recovery) drives it."""

    def __init__(self, *, state: JobState, report: MigrationReport, store: Store,
                 audit: AuditLog, src: Driver, dst: Driver, mover: Mover,
                 verifiers: Sequence[Verifier] = (), timing: Timing | None = None,
                 progress: ProgressFn | None = None) -> None:
        self.state = state
        self.report = report
        self.store = store
        self.audit_log = audit
        self.src = src
        self.dst = dst
        self.mover = mover
        self.verifiers = list(verifiers)
        self.timing = timing or Timing()
        self._progress = guarded(progress)
        self.log = logging.getLogger(f"vmigrate.migration.{state.job}")
        self._cancel = asyncio.Event()
        self._cancel_noted = False
        #: after the point of no return (or in a rollback) a failed audit write is
        #: recorded and the job goes on: evidence lost must not strand the VM
        self.tolerant = False

    @property
    def id(self) -> str:
        return self.state.job

    @property
    def vm(self) -> str:
        return self.state.vm

    @property
    def opts(self) -> JobOptions:
        return self.state.options

    def src_monitor(self) -> Monitor:
        return self.src.monitor(self.vm)

    def dst_monitor(self) -> Monitor:
        return self.dst.monitor(self.vm)

    # -- write-ahead -----------------------------------------------------------------

    def save(self) -> None:
        """Store the state now (before the side effect it announces)."""
        self.store.save_state(self.id, self.state.phase.value, self.state.model_dump_json())

    def enter(self, phase: Phase) -> None:
        """Begin ``phase``: stored, then audited, then shown."""
        self.state.phase = phase
        self.report.phase = phase.value
        self.save()
        self.audit("phase", {"phase": phase.value, "vm": self.vm})
        self.log.info("phase %s", phase.value)
        self.progress(Event(message=phase.value, phase=phase.value))

    def register(self, action: str, **args: Any) -> None:
        """Register the undo ``action`` (stored) before allocating what it releases."""
        if action not in UNDO:
            raise ValueError(f"no undo action {action!r}")
        self.state.undo.append(Undo(action=action, phase=self.state.phase, args=args))
        self.save()

    def forget(self, action: str) -> None:
        """Drop a registered undo: what it would release is no longer ours to release
        (the VM runs from it) or is gone."""
        self.state.undo = [u for u in self.state.undo if u.action != action]
        self.save()

    def pass_point_of_no_return(self, why: str) -> None:
        """The guest runs on the destination: from now on the job finishes forward."""
        if self.state.pnr:
            return
        self.state.pnr = True
        self.state.pnr_at = time.time()
        self.tolerant = True
        self.save()
        self.decision("point-of-no-return", why=why)

    # -- evidence and display ------------------------------------------------------------

    def audit(self, event: str, data: Mapping[str, Any]) -> AuditRecord | None:
        """Append to the audit log and return the record. A failed write fails the job
        before the point of no return; after it (and during a rollback) it is recorded
        and the job goes on (None is returned)."""
        try:
            return self.audit_log.append(event, data, job=self.id)
        except StoreError as exc:
            if not self.tolerant:
                raise
            self.log.error("audit write failed: %s", exc)
            note = f"audit record {event!r} not written: {exc}"
            if note not in self.report.cleanup_errors:
                self.report.cleanup_errors.append(note)
            return None

    def decision(self, what: str, **data: Any) -> None:
        """Audit a decision of the engine (before its side effect)."""
        self.audit("decision", {"decision": what, **data})
        self.log.info("decision %s %s", what, data)
        if os.environ.get(KILL_AT_ENV) == what:
            # a testing aid: die here as a SIGKILL would (no cleanup, no report)
            self.log.warning("%s=%s: killing the controller", KILL_AT_ENV, what)
            os.kill(os.getpid(), signal.SIGKILL)

    def progress(self, event: Event) -> None:
        self._progress(event)

    def say(self, message: str, **kw: Any) -> None:
        """A line for the operator."""
        self.progress(Event(message=message, phase=self.state.phase.value, **kw))

    def note(self, text: str) -> None:
        """Something worth knowing in the report that is not an error."""
        if text not in self.report.notes:
            self.report.notes.append(text)

    # -- cancel ------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the job to cancel (a signal handler, another task)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        if self._cancel.is_set():
            return True
        try:
            return self.store.get_job(self.id).cancel_requested
        except StoreError:
            return False

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` if a cancel was asked for, before the point of no
        return; after it, note once that the cancel came too late and go on."""
        if not self.cancel_requested:
            return
        if not self.state.pnr:
            raise Cancelled("cancelled by the operator")
        if not self._cancel_noted:
            self._cancel_noted = True
            self.note("a cancel was asked for after the point of no return: the migration "
                      "finished forward")
            self.decision("cancel-after-point-of-no-return")
            self.say("cancel asked after the point of no return: finishing the migration")

    # -- after the point of no return -------------------------------------------------------

    async def forward(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run one step after the point of no return, trying again (a lost monitor, an
        unreachable host, a refused command) up to ``timing.forward_tries`` times;
        then raise :class:`NeedsOperator`."""
        last: Exception | None = None
        for attempt in range(self.timing.forward_tries):
            try:
                return await step()
            except asyncio.CancelledError:
                raise
            except NeedsOperator:
                raise
            except Exception as exc:  # every failure: the destination must not be lost
                last = exc
                self.log.warning("%s failed (attempt %d): %s", what, attempt + 1, exc)
                await asyncio.sleep(self.timing.forward_retry_s)
        raise NeedsOperator(f"after the point of no return, {what} failed "
                            f"{self.timing.forward_tries} times: {last}") from last

    async def wait_until(self, predicate: Callable[[], Awaitable[bool]],
                         timeout: float) -> bool:
        """Poll ``predicate`` every ``timing.poll_s`` until it holds or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if await predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.timing.poll_s)
