"""The durable wave orchestrator: :class:`WaveRunner` runs a stored wave's moves through
:class:`~vmigrate.service.migrations.MigrationService`, several at once, and picks a
wave up again after its controller died (:meth:`WaveRunner.resume`).

Admission: the stored schedule, followed
----------------------------------------
The runner does not re-run the scheduler; it follows the stored schedule's start
order, and starts the next *batch* (the pending moves that start at the same instant
of the schedule: a group or an affinity unit starts together) only when the
migrations running now and the batch were all in flight together at some instant of
the schedule: ``max(start_s) < min(end_s)`` over them. A move that ends early lets
nothing start that the schedule had not running beside it; a move that runs late
holds back the moves the schedule started after its end. So at every instant the
set of running migrations is a subset of the schedule's in-flight set at one of its
instants ``t``, and whatever :func:`~vmigrate.plan.fleet.check_schedule` checked
there holds for it: at most ``max_out``/``max_in`` per host, anti-affinity, memory
reserved on the destinations. Links: every move runs capped at the least bandwidth
the schedule allocates it over its life (:func:`~vmigrate.fleet.waves.move_cap`),
which is at most its allocation at ``t``; the allocations at ``t`` sum to within each
link's allowance, so the caps do too.

The engine offers no way to change a running migration's ``max-bandwidth``
(``JobOptions.bandwidth`` is read when the memory strategy sets its parameters), so
bandwidth a finished move frees is not given to the moves running: they keep their
caps, and the next moves start with theirs. A failed attempt is retried (``retries``,
default 2) after a backoff (5 s, then 20 s); while it waits it keeps its place among
the running (so nothing the schedule started after its end starts early). A move that
fails every attempt is left ``failed``, its VM on its source; the others go on; the
wave ends ``failed``, naming it.

Write-ahead: no VM migrated twice
---------------------------------
For every attempt, in this order, each write its own transaction:

1. the VM's store record is read: already on the destination -> the move is
   ``done`` without a migration; on a third host -> ``skipped``;
2. the move is *claimed*: ``pending`` -> ``running``, one more attempt, job NULL,
   ``started`` = now (:meth:`~vmigrate.store.Store.claim_move`; refused unless the
   move was pending);
3. :meth:`MigrationService.migrate` creates the job (``create_job``: the store's VM
   lock; its ``created_at`` is after ``started``) and calls back with its id, which is
   written to the move at once (:meth:`~vmigrate.store.Store.set_move_job`);
4. the job's end decides: completed -> ``done`` with what it measured; failed or
   cancelled (the engine guarantees the source runs and the destination is clean:
   both end before the point of no return) -> ``pending`` (to retry) or ``failed``;
   needs-operator -> left ``running``, the job named.

A controller killed at any instant leaves each move in one of these states, and
:meth:`WaveRunner.resume` settles a ``running`` move before anything starts: its job
is the one recorded, else the newest job of the VM from the move's source to its
destination created at or after ``started`` (killed between 3's ``create_job`` and its
callback). No such job: the migration never began (killed between 2 and 3) -> the
move is pending again. A job still ``running`` (its controller died) is settled by
:meth:`MigrationService.recover` first, then read as in 4. Finally the VM's record
decides over everything: on its destination -> ``done``. A migration therefore starts
only from a ``pending`` move whose VM the store has on its source and that has no
live job (the store's VM lock refuses a second one, and the runner treats that
refusal as a failed attempt): no VM is migrated twice. A wave is taken by one
controller at a time (:meth:`~vmigrate.store.Store.claim_wave`, a compare and swap on
its state and controller pid), and one whose controller is alive (its pid runs
vmigrate) is not resumed by another process.

Cancelling: a wave whose state another process set to ``cancelled``
(:meth:`~vmigrate.store.Store.set_wave_state`) starts no more moves; the migrations
running end as they do, and the wave ends ``cancelled``.

Events
------
``on_event(dict)`` is called (guarded: a display that raises ``Exception`` is
switched off; the wave goes on) with, by ``event``:

``wave``      ``wave, state, eta_s`` (and ``resumed`` when it starts; ``report`` at its end)
``move``      ``wave, vm, src, dst, mode, state, attempt, job, bandwidth, error``
              (``state``: ``running`` once claimed (write-ahead, no job yet),
              ``started`` once its job exists, ``done``, ``failed``, ``skipped``,
              ``retry`` (with ``delay_s``), ``needs-operator``, ``pending`` (settled
              back by a resume); ``settled`` or ``note`` may be added)
``progress``  ``wave, vm, job, phase, bytes, total, bandwidth (bytes/s or None),
              eta_s (None when unknown)``
``eta``       ``wave, eta_s``: the wave's remaining time, re-estimated at each end

The wave's ETA: the schedule's span of the moves not yet ended (from the earliest
start to the latest end among them), scaled by measured/predicted time of the moves
done so far.

Audit: ``wave-start``, ``wave-move`` (each attempt's start and end) and ``wave-end``
records (no job id: the wave is not a job; the move's job is in the data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from vmigrate.audit.log import AuditLog
from vmigrate.errors import ConflictError, NotFoundError, StoreError, VmigrateError
from vmigrate.migration.report import MigrationReport, load_report
from vmigrate.progress import Event, ProgressFn, quiet
from vmigrate.service.migrations import MigrationRequest, MigrationService, controller_alive
from vmigrate.store import JobRecord, Store, WaveMoveRecord, WaveRecord
from vmigrate.store.db import NEEDS_OPERATOR, RUNNING

__all__ = ["DEFAULT_BACKOFF", "DEFAULT_RETRIES", "EventFn", "ServiceFactory", "WaveRunner",
           "wave_eta", "wave_report"]

_log = logging.getLogger(__name__)

EventFn = Callable[[dict[str, Any]], None]
#: a fresh :class:`MigrationService` whose progress goes to the given callback (one per
#: migration, so each migration's progress is told apart)
ServiceFactory = Callable[[ProgressFn], MigrationService]

DEFAULT_RETRIES = 2
DEFAULT_BACKOFF = (5.0, 20.0)
_EPS = 1e-6
#: request fields a wave's options may set (the move sets vm, dest, mode, bandwidth)
_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(MigrationRequest)) - {
    "vm", "dest", "mode", "bandwidth"}


def _pid_alive(pid: int | None) -> bool:
    """Another process that runs vmigrate has this pid."""
    if not pid or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"vmigrate" in fh.read()
    except OSError:
        return False


def _measured(report: MigrationReport) -> dict[str, Any]:
    return {"time_s": report.total_time_s, "downtime_ms": report.downtime_ms,
            "bytes_moved": report.bytes_transferred}


def _stored_measures(job: JobRecord) -> dict[str, Any]:
    if not job.report:
        return {}
    try:
        return _measured(load_report(job.report))
    except StoreError:
        return {}


def wave_report(wave: WaveRecord, moves: Sequence[WaveMoveRecord]) -> dict[str, Any]:
    """The wave's report: its figures and one row per move (predicted and measured)."""
    rows = [{
        "vm": m.vm, "src": m.src, "dst": m.dst, "mode": m.mode, "state": m.state,
        "attempts": m.attempts, "job": m.job, "error": m.error, "bandwidth": m.bandwidth,
        "predicted": {"time_s": m.predicted_time_s, "downtime_ms": m.predicted_downtime_ms,
                      "bytes": m.predicted_bytes},
        "measured": {"time_s": m.time_s, "downtime_ms": m.downtime_ms, "bytes": m.bytes},
    } for m in moves]
    return {
        "wave": wave.id, "kind": wave.kind, "host": wave.host, "state": wave.state,
        "started": wave.started, "ended": wave.ended,
        "elapsed_s": (round(wave.ended - wave.started, 3)
                      if wave.started is not None and wave.ended is not None else None),
        "planned_eta_s": wave.plan.get("schedule", {}).get("makespan_s"),
        "moves": rows,
        "done": [m.vm for m in moves if m.state == "done"],
        "failed": [m.vm for m in moves if m.state == "failed"],
        "skipped": [m.vm for m in moves if m.state == "skipped"],
        "needs_operator": [m.vm for m in moves if m.state == "running"],
    }


def wave_eta(moves: Sequence[WaveMoveRecord]) -> float:
    """Seconds the wave has left (see the module doc)."""
    left = [m for m in moves if m.state in ("pending", "running")]
    if not left:
        return 0.0
    span = max(m.plan_end_s for m in left) - min(m.plan_start_s for m in left)
    done = [m for m in moves if m.state == "done" and m.time_s and m.predicted_time_s]
    predicted = sum(m.predicted_time_s or 0.0 for m in done)
    scale = sum(m.time_s or 0.0 for m in done) / predicted if predicted > 0 else 1.0
    return max(0.0, span * scale)


class WaveRunner:
    """Runs stored waves (see the module doc).

    ``services``: a :class:`MigrationService` per migration, given its progress
    callback. ``retries``: attempts after the first; ``backoff``: seconds before each
    retry (the last repeats). ``sleep``: what waits out a backoff (tests pass a quick
    one)."""

    def __init__(self, store: Store, audit: AuditLog, services: ServiceFactory, *,
                 on_event: EventFn | None = None, retries: int = DEFAULT_RETRIES,
                 backoff: Sequence[float] = DEFAULT_BACKOFF,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.store = store
        self.audit = audit
        self.services = services
        self.retries = retries
        self.backoff = tuple(backoff) or (0.0,)
        self.sleep = sleep
        self._on_event = on_event
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.notes: list[str] = []

    # -- events and audit -------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        """Tell the display; one that raises an ``Exception`` is switched off (a
        ``BaseException`` passes: the tests' controller crash)."""
        fn = self._on_event
        if fn is None:
            return
        try:
            fn(event)
        except Exception:
            self._on_event = None
            _log.warning("wave event display failed; it is switched off", exc_info=True)

    def _audit(self, event: str, data: Mapping[str, Any]) -> None:
        try:
            self.audit.append(event, data)
        except (StoreError, ValueError) as exc:
            self.notes.append(f"audit record {event!r} not written: {exc}")
            _log.error("audit write failed: %s", exc)

    def _move_event(self, m: WaveMoveRecord, state: str, **extra: Any) -> None:
        cur = self.store.wave_move(m.wave, m.vm)
        data = {"event": "move", "wave": m.wave, "vm": m.vm, "src": m.src, "dst": m.dst,
                "mode": m.mode, "state": state, "attempt": cur.attempts, "job": cur.job,
                "bandwidth": m.bandwidth, "error": cur.error, **extra}
        self._emit(data)
        if state != "pending":
            self._audit("wave-move", {k: v for k, v in data.items() if k != "event"})

    # -- the public entries -------------------------------------------------------------

    async def run(self, wave: int) -> dict[str, Any]:
        """Run a ``planned`` wave to its end; its report (also stored with the wave and
        audited). :class:`ConflictError` for a wave that is not planned (nothing
        runs). The wave ends ``failed`` when a move failed or waits for an operator."""
        rec = self.store.get_wave(wave)
        if rec.state != "planned" or not self.store.claim_wave(
                wave, os.getpid(), state="planned", controller_pid=rec.controller_pid):
            raise ConflictError(f"wave {wave} is {self.store.get_wave(wave).state}: only a "
                                "planned wave is run ('vmigrate wave resume' goes on with "
                                "a started one)")
        return await self._drive(rec, resumed=False)

    async def resume(self, wave: int) -> dict[str, Any]:
        """Go on with a wave whose controller died or that ended failed: moves left
        ``running`` are settled first (see the module doc), ``failed`` ones are tried
        again, ``done`` ones never run again. :class:`ConflictError` when the wave is
        cancelled, or another live process runs it; a ``done`` wave returns its
        report."""
        rec = self.store.get_wave(wave)
        if rec.state == "done" and rec.report is not None:
            return rec.report
        if rec.state == "cancelled":
            raise ConflictError(f"wave {wave} was cancelled")
        if rec.state == "running" and _pid_alive(rec.controller_pid):
            raise ConflictError(f"wave {wave} is run by process {rec.controller_pid}")
        if not self.store.claim_wave(wave, os.getpid(), state=rec.state,
                                     controller_pid=rec.controller_pid):
            raise ConflictError(f"wave {wave} was taken by another controller")
        await self.settle(wave)
        for vm in self.store.retry_failed_moves(wave):
            self.notes.append(f"{vm}: failed before, tried again")
        return await self._drive(self.store.get_wave(wave), resumed=True)

    async def settle(self, wave: int) -> list[WaveMoveRecord]:
        """Settle every move left ``running`` by a controller that died (see the module
        doc); the moves after it."""
        service: MigrationService | None = None
        for m in self.store.wave_moves(wave):
            if m.state != "running":
                continue
            job = self.store.find_job(m.job) if m.job else self._job_of(m)
            if job is not None and job.status == RUNNING:
                if controller_alive(job):
                    self.store.note_move(wave, m.vm, f"job {job.id} is still run by "
                                         f"process {job.controller_pid}")
                    continue
                service = service or self.services(quiet)
                for r in await service.recover([job]):
                    self.notes.append(f"{m.vm}: job {r.job} {r.outcome}: {r.detail}")
                job = self.store.find_job(job.id)
            self._after_job(m, job)
        return self.store.wave_moves(wave)

    # -- settling ------------------------------------------------------------------------

    def _job_of(self, m: WaveMoveRecord) -> JobRecord | None:
        """The job a controller killed before it wrote the job's id down."""
        if m.started is None:
            return None
        found = [j for j in self.store.list_jobs(vm=m.vm)
                 if j.source == m.src and j.dest == m.dst and j.created_at >= m.started]
        return found[-1] if found else None

    def _vm_host(self, vm: str) -> str | None:
        try:
            return self.store.get_vm(vm).host
        except NotFoundError:
            return None

    def _after_job(self, m: WaveMoveRecord, job: JobRecord | None) -> None:
        """A running move after its job was settled (or found missing)."""
        wave, vm = m.wave, m.vm
        host = self._vm_host(vm)
        if (job is not None and job.status == "completed") or host == m.dst:
            measures = _stored_measures(job) if job is not None else {}
            self.store.end_move(wave, vm, "done", job=job.id if job else None, **measures)
            self._move_event(m, "done", settled=True)
        elif job is None:
            self.store.end_move(wave, vm, "pending", error="the controller died before the "
                                "migration began")
            self._move_event(m, "pending", settled=True)
        elif job.status in ("failed", "cancelled"):
            self.store.end_move(wave, vm, "pending", job=job.id,
                                error=f"job {job.id} {job.status}: {job.error or ''}".strip())
            self._move_event(m, "pending", settled=True)
        elif job.status == NEEDS_OPERATOR:
            self.store.note_move(wave, vm, f"job {job.id} needs an operator: {job.error}")
            self._move_event(m, "needs-operator", settled=True)
        else:
            self.store.note_move(wave, vm, f"job {job.id} is {job.status}")

    # -- the wave -----------------------------------------------------------------------

    async def _drive(self, rec: WaveRecord, *, resumed: bool) -> dict[str, Any]:
        wave = rec.id
        moves = self.store.wave_moves(wave)
        eta = wave_eta(moves)
        self.audit.append("wave-start", {  # the log must take it before anything runs
            "wave": wave, "kind": rec.kind, "host": rec.host, "resumed": resumed,
            "eta_s": eta, "moves": [{"vm": m.vm, "src": m.src, "dst": m.dst,
                                     "mode": m.mode, "state": m.state,
                                     "bandwidth": m.bandwidth} for m in moves]})
        self.store.set_wave_eta(wave, eta)
        self._emit({"event": "wave", "wave": wave, "state": "running", "eta_s": eta,
                    "resumed": resumed})
        tasks = self._tasks
        try:
            while True:
                self._admit(wave)
                if not tasks:
                    break
                finished, _ = await asyncio.wait(tasks.values(),
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    del tasks[task.get_name()]
                    task.result()  # a bug, a store that fails or a crash ends the wave here
                eta = wave_eta(self.store.wave_moves(wave))
                self.store.set_wave_eta(wave, eta)
                self._emit({"event": "eta", "wave": wave, "eta_s": eta})
        finally:
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
            tasks.clear()
        moves = self.store.wave_moves(wave)
        bad = any(m.state in ("failed", "running") for m in moves)
        if self.store.get_wave(wave).state == "cancelled":
            state = "cancelled"
        else:
            state = "failed" if bad else "done"
        self.store.set_wave_state(wave, state, eta_s=0.0)
        report = wave_report(self.store.get_wave(wave), moves)
        report["notes"] = list(self.notes)
        self.store.set_wave_state(wave, state, report=report)
        self._audit("wave-end", {k: v for k, v in report.items() if k != "notes"})
        self._emit({"event": "wave", "wave": wave, "state": state, "eta_s": 0.0,
                    "report": report})
        return report

    def _admit(self, wave: int) -> None:
        """Start the next batches the schedule allows beside the running ones."""
        while True:
            if self.store.get_wave(wave).state == "cancelled":
                return  # an operator cancelled it: what runs ends, nothing more starts
            moves = self.store.wave_moves(wave)
            active = [m for m in moves if m.vm in self._tasks]
            pending = [m for m in moves if m.state == "pending" and m.vm not in self._tasks]
            if not pending:
                return
            first = pending[0]
            batch = [m for m in pending if abs(m.plan_start_s - first.plan_start_s) <= _EPS]
            both = active + batch
            if active and (max(m.plan_start_s for m in both)
                           >= min(m.plan_end_s for m in both) - _EPS):
                return
            for m in batch:
                self._start(m)

    def _start(self, m: WaveMoveRecord) -> None:
        host = self._vm_host(m.vm)
        if host == m.dst:
            self.store.end_move(m.wave, m.vm, "done", error=None)
            self._move_event(m, "done", note="already on its destination")
            return
        if host != m.src:
            where = "no longer managed" if host is None else f"on {host}, not {m.src}"
            self.store.end_move(m.wave, m.vm, "skipped", error=f"the VM is {where}")
            self._move_event(m, "skipped")
            return
        # the first attempt is claimed here, with the rest of its batch, before any of
        # them runs: a group starts together (or, after a crash, is pending together)
        if not self.store.claim_move(m.wave, m.vm):  # write-ahead (see the module doc)
            return
        self._tasks[m.vm] = asyncio.create_task(self._move(m), name=m.vm)
        self._move_event(m, "running")

    async def _move(self, m: WaveMoveRecord) -> None:
        """Every attempt of one move (the first claimed already), to its end state."""
        wave, vm = m.wave, m.vm
        claimed = True
        while True:
            if not claimed:
                if self._vm_host(vm) == m.dst:
                    self.store.end_move(wave, vm, "done", error=None)
                    self._move_event(m, "done", note="already on its destination")
                    return
                if self.store.get_wave(wave).state == "cancelled":
                    return  # no retry in a cancelled wave (the move stays pending)
                if not self.store.claim_move(wave, vm):  # write-ahead
                    return
                self._move_event(m, "running")
            claimed = False
            outcome, error, report = await self._attempt(m)
            if outcome == "done":
                measures = _measured(report) if report is not None else {}
                self.store.end_move(wave, vm, "done", **measures)
                self._move_event(m, "done")
                return
            if outcome == NEEDS_OPERATOR:
                self.store.note_move(wave, vm, error)
                self._move_event(m, "needs-operator")
                return
            attempts = self.store.wave_move(wave, vm).attempts
            if attempts > self.retries:
                self.store.end_move(wave, vm, "failed", error=error)
                self._move_event(m, "failed")
                return
            delay = self.backoff[min(attempts - 1, len(self.backoff) - 1)]
            self.store.end_move(wave, vm, "pending", error=error)
            self._move_event(m, "retry", delay_s=delay)
            await self.sleep(delay)

    async def _attempt(self, m: WaveMoveRecord
                       ) -> tuple[str, str, MigrationReport | None]:
        """One migration of the move: ("done" | "failed" | "needs-operator", error,
        report)."""
        job: list[str] = []

        def on_job(job_id: str) -> None:
            self.store.set_move_job(m.wave, m.vm, job_id)
            job.append(job_id)
            self._move_event(m, "started")

        def progress(ev: Event) -> None:
            if ev.done is None:
                return
            mbps = ev.figures.get("mbps")
            rate = mbps * 125_000 if mbps else None
            left = ev.figures.get("remaining")
            if left is None and ev.total is not None:
                left = max(0, ev.total - ev.done)
            self._emit({"event": "progress", "wave": m.wave, "vm": m.vm,
                        "job": job[0] if job else None, "phase": ev.phase, "bytes": ev.done,
                        "total": ev.total, "bandwidth": rate,
                        "eta_s": left / rate if rate and left is not None else None})

        rec = self.store.get_wave(m.wave)
        opts = {k: v for k, v in rec.options.items() if k in _REQUEST_FIELDS}
        req = MigrationRequest(vm=m.vm, dest=m.dst, mode=m.mode, bandwidth=str(m.bandwidth),
                               **opts)
        service = self.services(progress)
        try:
            report = await service.migrate(req, on_job=on_job)
        except ConflictError as exc:  # the VM lock: another job moves it
            return "failed", f"refused: {exc}", None
        except VmigrateError as exc:
            return "failed", f"{type(exc).__name__}: {exc}", None
        except Exception as exc:  # one VM's unexpected error does not stop the wave
            _log.error("the migration of %s raised", m.vm, exc_info=True)
            return "failed", f"unexpected {type(exc).__name__}: {exc}", None
        if report.status == "completed":
            return "done", "", report
        if report.status == NEEDS_OPERATOR:
            return NEEDS_OPERATOR, f"job {report.job} needs an operator: {report.error}", report
        return "failed", f"job {report.job} {report.status}: {report.error}", report
