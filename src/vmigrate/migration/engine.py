"""The migration engine: one driver of the five phases for every mode.

A mode is two strategies (:mod:`~vmigrate.migration.memory`,
:mod:`~vmigrate.migration.storage`) and a list of verifiers
(:mod:`~vmigrate.migration.verify`); the engine runs them in one order::

    begin     memory.begin, storage.begin                 check; nothing allocated
    prepare   storage.prepare, memory.prepare             allocate (each undo first)
    perform   memory.perform (storage.start, verifiers'   move the guest off the source
              before_switch, ... storage.final)
              verifiers' source_stopped                   a failure here rolls back
    finish    memory.switch                               the guest runs on the
                                                          destination: POINT OF NO RETURN
              memory.complete, storage.moved, announce,   finish forward
              verifiers' after_switch
    confirm   memory.confirm, storage.confirm             stop and release the source

**The point of no return** is the moment the guest runs on the destination (for
post-copy: the switch), in every mode. Before it, every failure and every
cancel rolls back: the registered undos run newest first, each guarded (a
failing undo is recorded and never hides the first error), and the source runs
on with the destination clean. After it, a failure or a cancel means *finish
forward*: each remaining step is tried again; what cannot be finished ends the
job as ``needs-operator`` with nothing destroyed and the VM still locked. A
failure whose outcome the hosts do not tell (the link died at the switch) is
``needs-operator`` too, never guessed.

Before rolling back, the engine asks the hosts whether the point of no return
has in fact passed (QEMU may complete while the controller fails):
:meth:`~vmigrate.migration.memory.MemoryStrategy.settle`. ``job recover`` asks
the same question after a crash (:meth:`Engine.recover`), from the state saved
in the store; the audit log is never read back to decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from vmigrate.errors import (
    Cancelled,
    DestinationFullError,
    MigrationFailed,
    NeedsOperator,
    VmigrateError,
)
from vmigrate.migration.job import UNDO, Job, PointOfNoReturnPassed
from vmigrate.migration.memory import MemoryStrategy
from vmigrate.migration.report import AuditHead, Check, MigrationReport
from vmigrate.migration.state import Phase
from vmigrate.migration.storage import StorageStrategy
from vmigrate.qemu.process import VmState


class Engine:
    """Runs one :class:`~vmigrate.migration.job.Job` (see the module doc)."""

    def __init__(self, job: Job, memory: MemoryStrategy, storage: StorageStrategy) -> None:
        self.job = job
        self.memory = memory
        self.storage = storage
        self._stopped_checked = False

    # -- the whole job ---------------------------------------------------------------

    async def run(self, *, refused: Exception | None = None) -> MigrationReport:
        """Run the job to an end state and return its report (stored with the job).
        Raises only ``CancelledError`` (re-raised after a rollback, or, past the point
        of no return, with the job left for ``job recover``). ``refused``: the job
        fails in begin with this error before anything is started (e.g. a host that
        could not be reached to lock the VM)."""
        job = self.job
        report = job.report
        report.started_at = time.time()
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, job.cancel)
        status, error = "completed", None
        try:
            try:
                job.audit("job", {"vm": job.vm, "mode": job.state.mode,
                                  "source": job.state.source, "dest": job.state.dest,
                                  "options": report.options})
                if report.prediction is not None:  # the plan this job started from
                    job.audit("prediction", report.prediction)
                if refused is not None:
                    raise refused
                await self._until_point_of_no_return()
                await self._forward()
            except asyncio.CancelledError:
                await self._interrupted(t0)
                raise
            except Exception as exc:
                status, error = await self._after_failure(exc)
        finally:
            await self._close_verifiers()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        report.total_time_s = round(time.monotonic() - t0, 3)
        self._end(status, error)
        return report

    async def recover(self, why: str) -> MigrationReport:
        """Settle a job whose controller died (or that waits for an operator), from
        its saved state and what the hosts say now."""
        job, st = self.job, self.job.state
        job.tolerant = True
        job.report.recovered = True
        job.audit("recover", {"phase": st.phase.value, "why": why})
        t0 = time.monotonic()
        status, error = "completed", None
        try:
            match (st.phase, st.memory):
                case (Phase.BEGIN, _) if not st.undo:
                    # died while checking: nothing had been allocated, nothing to undo
                    status, error = "failed", f"{why} in begin; nothing had been allocated"
                case (Phase.CONFIRM, _):
                    # the guest ran on the destination and the source was being released:
                    # finish releasing it
                    await self._forward()
                case (_, "precopy") if st.pnr:
                    # post-copy switched (or the destination ran): never resume the
                    # source; supervise the post-copy to its end, or need an operator
                    await self._forward()
                case (_, "offline") if st.pnr:
                    # the VM booted on the destination from its copies: keep it, never
                    # restart the source
                    await self._forward()
                case (_, "precopy"):
                    # the source's QEMU tells: migration in flight -> cancelled (source
                    # runs); completed and the destination runs or is held -> let it run
                    # and confirm; completed and the destination gone -> the source takes
                    # the guest back; no answer -> an operator must look
                    status, error = await self._after_failure(MigrationFailed(
                        f"{why} in {st.phase.value}"))
                case (_, "offline"):
                    # the destination tells: never started -> roll back (restart the
                    # source, delete finished copies, keep partial ones); running -> keep
                    # it; started and gone after it printed -> an operator must look
                    status, error = await self._after_failure(MigrationFailed(
                        f"{why} in {st.phase.value}"))
        except NeedsOperator as exc:
            status, error = "needs-operator", str(exc)
        finally:
            await self._close_verifiers()
        job.report.total_time_s = round((job.report.total_time_s or 0.0)
                                        + time.monotonic() - t0, 3)
        self._end(status, error)
        return job.report

    async def resolve(self, keep: Literal["destination", "source"]) -> MigrationReport:
        """An operator settles a job waiting for them: keep the guest on the destination
        (the source QEMU is stopped and released) or on the source (the destination
        QEMU is stopped; the source resumes, or boots from its own disks). Images are
        never deleted: what the job copied stays on the destination."""
        job, st = self.job, self.job.state
        job.tolerant = True
        job.audit("resolve", {"keep": keep, "phase": st.phase.value})
        if keep == "destination":
            await self.storage.moved(job)
            if await job.src.vm_exists(job.vm):
                await job.src.stop_vm(st.spec, force=True)
            await job.src.remove_vm_dir(job.vm)
            job.note("resolved by the operator: the guest stays on the destination")
            status: str = "completed"
        else:
            if await job.dst.vm_exists(job.vm):
                await job.dst.stop_vm(st.dest_spec, force=True)
            await job.dst.remove_vm_dir(job.vm)
            state = await job.src.vm_state(job.vm)
            if state == VmState.STOPPED:
                await job.src.start_vm(st.spec)
            elif state != VmState.RUNNING:
                mon = job.src_monitor()
                if await mon.run_state() == "shutdown":  # powered off, kept (warm)
                    await mon.set_shutdown_action("poweroff")
                    await mon.reset()
                await mon.resume()
            job.store.move_vm(job.vm, st.source, st.spec.model_dump_json())
            st.vm_moved = False
            job.save()
            job.note("resolved by the operator: the guest is back on the source; what the "
                     f"job copied to {job.dst.name} was kept")
            status = "failed"
        self._end(status, job.report.error)
        return job.report

    # -- up to the point of no return ------------------------------------------------

    async def _until_point_of_no_return(self) -> None:
        job, memory, storage = self.job, self.memory, self.storage
        job.enter(Phase.BEGIN)
        await memory.begin(job, storage)
        await storage.begin(job)
        job.check_cancel()
        job.enter(Phase.PREPARE)
        await storage.prepare(job)
        await memory.prepare(job, storage)
        job.check_cancel()
        job.enter(Phase.PERFORM)
        await memory.perform(job, storage)
        await self._source_stopped_checks()
        job.check_cancel()
        job.enter(Phase.FINISH)
        await memory.switch(job, storage)

    async def _source_stopped_checks(self) -> None:
        """The guest stopped on the source: the verifiers' last look before the
        destination runs it. A failure before the point of no return rolls back."""
        if self._stopped_checked:
            return
        self._stopped_checked = True
        failed: list[Check] = []
        for v in self.job.verifiers:
            check = await self._check(v.name, v.source_stopped, "source-stopped")
            if check is not None and check.ok is False:
                failed.append(check)
        if failed and not self.job.state.pnr:
            raise MigrationFailed("checks before the guest may run on the destination failed: "
                                  + "; ".join(f"{c.name}: {c.detail}" for c in failed))

    async def _check(self, name: str, hook: Callable[[Job], Awaitable[Check | None]],
                     when: Literal["source-stopped", "after-switch"]) -> Check | None:
        try:
            check = await hook(self.job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a verifier that cannot check is not a failed check
            self.job.log.warning("verifier %s failed: %s", name, exc)
            check = Check(name=name, ok=None, detail=f"could not check: {exc}", when=when)
        if check is not None:
            self.job.report.add_check(check)
        return check

    # -- after it ----------------------------------------------------------------------

    async def _forward(self) -> None:
        """Everything after the point of no return, each step tried again on failure;
        raises :class:`NeedsOperator` when a step cannot be finished or the guest did
        not arrive intact."""
        job, memory, storage = self.job, self.memory, self.storage
        job.tolerant = True
        await job.forward("supervising the migration to its end",
                          lambda: memory.complete(job, storage))
        if job.state.phase in (Phase.BEGIN, Phase.PREPARE, Phase.PERFORM):
            job.enter(Phase.FINISH)
        if job.state.phase is Phase.FINISH:
            await job.forward("letting the guest run on the destination",
                              lambda: memory.switch(job, storage))
        await job.forward("recording the VM's new home", lambda: storage.moved(job))
        job.check_cancel()  # past the point of no return: only noted
        await self._source_stopped_checks()
        if job.state.phase is Phase.FINISH:
            await self._announce()
            await self._after_switch_checks()
            job.enter(Phase.CONFIRM)
            job.state.undo = []  # nothing is rolled back any more
            job.save()
        await job.forward("stopping the source", lambda: memory.confirm(job, storage))
        await job.forward("releasing the source's disks", lambda: storage.confirm(job))

    async def _announce(self) -> None:
        """Have QEMU announce the guest's NICs from their new port (gratuitous RARP),
        with the policy's rounds and spacing, so switches learn where it runs."""
        job = self.job
        if not job.state.dest_spec.nics or not job.report.verification.dest_running:
            return
        p = job.opts.policy
        try:
            await job.dst_monitor().announce(initial_ms=p.announce_initial_ms,
                                             max_ms=p.announce_max_ms,
                                             rounds=p.announce_rounds,
                                             step_ms=p.announce_step_ms)
        except VmigrateError as exc:
            job.note(f"announcing the guest's NICs failed: {exc}")
            return
        job.report.announced = True
        job.decision("announce", rounds=p.announce_rounds)

    async def _after_switch_checks(self) -> None:
        job = self.job
        t0 = time.monotonic()
        booting = 0.0
        for v in job.verifiers:
            t1 = time.monotonic()
            await self._check(v.name, v.after_switch, "after-switch")
            if v.waits_for_boot and job.state.memory == "offline":
                booting += time.monotonic() - t1  # a cold or warm guest boots: migration time
        job.report.checks_s = round(time.monotonic() - t0 - booting, 3)
        failed = [c for c in job.report.checks if c.ok is False]
        if failed:
            raise NeedsOperator(
                f"{job.vm} runs on {job.dst.name} but did not arrive intact ("
                + "; ".join(f"{c.name}: {c.detail}" for c in failed)
                + "); nothing was destroyed: the source is kept for inspection")

    # -- failures ----------------------------------------------------------------------

    async def _after_failure(self, exc: Exception) -> tuple[str, str | None]:
        """Settle a failed job: finish forward or roll back (see the module doc)."""
        job = self.job
        reason = str(exc) or type(exc).__name__
        if job.state.phase == Phase.BEGIN and isinstance(exc, VmigrateError) \
                and exc.exit_code not in (1, 4):
            job.report.exit_status = exc.exit_code  # refused before anything started
        elif isinstance(exc, DestinationFullError):
            job.report.exit_status = exc.exit_code  # scripts tell "no room" from a failure
        if not isinstance(exc, VmigrateError):
            job.log.exception("unexpected error")
        job.tolerant = True
        if isinstance(exc, NeedsOperator):
            job.decision("needs-operator", reason=reason)
            return "needs-operator", reason
        passed = await self._settle()
        if passed is None:
            why = (f"{reason}; the hosts do not tell whether the guest ran on {job.dst.name}:"
                   " nothing was destroyed")
            job.decision("needs-operator", reason=why)
            return "needs-operator", why
        if passed:
            return await self._finish_forward(reason, f"found after: {reason}")
        try:
            await self._rollback(reason)
        except PointOfNoReturnPassed as passed_now:
            # QEMU completed while the job failed: the destination has the guest
            return await self._finish_forward(reason, f"{passed_now} (found during the "
                                                      "rollback)")
        return ("cancelled" if isinstance(exc, Cancelled) else "failed"), reason

    async def _finish_forward(self, reason: str, why: str) -> tuple[str, str | None]:
        """The point of no return passed although the job failed (``reason``): finish."""
        job = self.job
        job.pass_point_of_no_return(why)
        try:
            await self._forward()
        except NeedsOperator as again:
            job.decision("needs-operator", reason=str(again))
            return "needs-operator", str(again)
        job.note(f"finished forward after: {reason}")
        return "completed", None

    async def _settle(self) -> bool | None:
        """Has the point of no return passed? Asked a few times: a host that does not
        answer once may answer the next time."""
        for attempt in range(3):
            try:
                passed = await self.memory.settle(self.job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.job.log.warning("settling the job failed: %s", exc)
                passed = None
            if passed is not None:
                return passed
            if attempt < 2:
                await asyncio.sleep(self.job.timing.forward_retry_s)
        return None

    async def _rollback(self, reason: str) -> None:
        """Run the registered undos, newest first, each guarded and tried twice; then
        record the end state of both hosts."""
        job = self.job
        job.tolerant = True
        job.audit("rollback", {"reason": reason})
        job.say(f"rolling back: {reason}")
        failed = []
        for undo in reversed(list(job.state.undo)):
            for attempt in range(2):
                try:
                    await UNDO[undo.action](job, undo.args)
                    break
                except (asyncio.CancelledError, PointOfNoReturnPassed):
                    raise
                except Exception as exc:
                    if attempt == 1:
                        job.report.cleanup_errors.append(f"{undo.action}: {exc}")
                        job.log.warning("undo %s failed: %s", undo.action, exc)
                        failed.append(undo)
                    else:
                        await asyncio.sleep(job.timing.forward_retry_s)
        job.state.undo = failed
        job.save()
        await self._end_state()

    async def _end_state(self) -> None:
        job = self.job
        v = job.report.verification
        try:
            if job.state.source_was_running:
                v.source_running = await job.src.vm_state(job.vm) == VmState.RUNNING
            targets = [d.target for d in job.state.disks]
            left = set(targets) - set(await job.dst.missing(targets)) if targets else set()
            v.dest_clean = not await job.dst.vm_exists(job.vm) and not left
        except VmigrateError as exc:
            job.report.cleanup_errors.append(f"checking the end state: {exc}")

    async def _interrupted(self, t0: float) -> None:
        """The controller's task was cancelled (not a cancel of the job: signals ask
        for that softly). Before the point of no return: roll back; after it: leave
        the job running for ``job recover`` (its state is saved)."""
        job = self.job
        job.report.total_time_s = round(time.monotonic() - t0, 3)
        if job.state.pnr:
            job.note("the controller was interrupted after the point of no return: "
                     f"'vmigrate job recover {job.id}' finishes the migration")
            job.store.save_report(job.id, job.report.model_dump(mode="json"))
            return
        try:
            await self._rollback("the controller was interrupted")
        except PointOfNoReturnPassed as passed:
            job.pass_point_of_no_return(f"{passed} (found during the rollback)")
            job.note(f"the controller was interrupted; 'vmigrate job recover {job.id}' "
                     "finishes the migration")
            job.store.save_report(job.id, job.report.model_dump(mode="json"))
            return
        except Exception as exc:  # the rollback's own failure is recorded, not raised
            job.report.cleanup_errors.append(f"rollback: {exc}")
        self._end("failed", "the controller was interrupted")

    async def _close_verifiers(self) -> None:
        for v in self.job.verifiers:
            try:
                await v.close(self.job)
            except Exception as exc:
                self.job.log.warning("closing verifier %s failed: %s", v.name, exc)

    def _end(self, status: str, error: str | None) -> None:
        job = self.job
        report = job.report
        report.status = status  # type: ignore[assignment]
        report.error = error
        report.phase = job.state.phase.value
        memory = report.memory.bytes if report.memory is not None else None
        if memory is not None or report.disks:  # everything that crossed the network
            report.bytes_transferred = (memory or 0) + sum(d.wire_bytes for d in report.disks)
        job.tolerant = True
        end = job.audit("end", {"status": status, "error": error,
                                "observed_downtime_ms": report.observed_downtime_ms,
                                "qemu_downtime_ms": report.memory.qemu_downtime_ms
                                if report.memory else None})
        if end is not None:  # the log's head after the job: kept with the job and reported
            report.audit_head = AuditHead(seq=end.seq, hash=end.line_hash, key=end.key)
        job.save()
        job.store.end_job(job.id, status, report=report.model_dump(mode="json"), error=error,
                          phase=job.state.phase.value)
        if end is not None:
            job.store.set_audit_head(job.id, end.seq, end.line_hash)
