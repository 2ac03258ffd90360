"""Live migration: memory pre-copy (and post-copy) for VMs on storage both hosts see.

The five phases of DESIGN.md, each written to the store before its first side
effect and to the audit log:

* begin (source): the VM runs, the destination answers, disks and kernel are
  visible from it, TLS credentials exist on both hosts, the capability set is
  possible for this QEMU; the job row locks the VM.
* prepare (destination): QEMU ``-incoming defer`` with the same spec, TLS
  server credentials, capabilities, ``migrate-incoming``.
* perform (source): capabilities and parameters, ``migrate``, then a sampling
  loop that feeds the convergence controller and applies its actions; stalls of
  the migration link are detected here (QEMU notices them late or never).
* finish (destination): the guest runs there (point of no return); the probe's
  observed downtime and, for lab guests, the memory check after switchover.
* confirm (source): stop the source QEMU and forget it; the VM now lives on the
  destination.

Before the point of no return, every failure runs the registered cleanups
(``migrate_cancel``, resume the source if we paused it, kill the incoming VM)
and leaves the source running and the destination clean. After it, the source
is never resumed: failures become ``needs-operator``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from vmigrate.audit.log import AuditLog
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import (
    EnvironmentError_,
    HostError,
    LabError,
    QmpError,
    StateError,
    UserError,
    VmigrateError,
)
from vmigrate.hosts import Host, open_host
from vmigrate.lab.image import parse_workloads
from vmigrate.lab.probe import DowntimeProbe
from vmigrate.migration.report import MigrationReport
from vmigrate.pki import QEMU_FILES
from vmigrate.plan.policy import (
    Abort,
    ConvergenceController,
    MigrationOptions,
    MigrationSetup,
    PauseGuest,
    Sample,
    SetParameters,
    StartPostcopy,
    describe,
    plan_setup,
)
from vmigrate.qemu import process
from vmigrate.qemu.qmp import QmpSession, qmp_session
from vmigrate.qemu.spec import VMSpec
from vmigrate.store import Store

SAMPLE_INTERVAL = 0.5
#: no byte moved for this long in pre-copy: the migration link is taken as broken
LINK_STALL_S = 6.0
#: in post-copy, no byte moved for this long while pages remain: pause and recover
POSTCOPY_STALL_S = 3.0
PORT_RANGE = (49152, 60999)
#: a monitor that does not answer within this long is taken as hung
QMP_TIMEOUT_S = 20.0
#: how long to wait for the lab guest's first memory-check verdict on the destination
MEMCHECK_WAIT_S = 60.0
#: how long the guest may stay silent to ping once it runs on the destination
PING_WAIT_S = 30.0


class MigrationFailed(VmigrateError):
    """The migration did not complete; the report says where it stopped and why."""


class Cancelled(VmigrateError):
    """The operator cancelled the job."""


class _Ambiguous(VmigrateError):
    """The outcome of the switchover cannot be known: an operator must look."""


@dataclass(frozen=True)
class Progress:
    """What the progress display shows after each sample."""

    phase: str
    sample: Sample | None = None
    step: str | None = None
    note: str | None = None
    #: online migration: disk bytes copied and to copy, all disks together
    disk: tuple[int, int] | None = None


ProgressFn = Callable[[Progress], None]


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def options_dict(opts: MigrationOptions) -> dict[str, Any]:
    return {
        "policy": opts.policy.name,
        "downtime_ms": opts.downtime_ms,
        "bandwidth": opts.bandwidth,
        "parallel": opts.parallel,
        "compress": opts.compress,
        "tls": opts.tls,
    }


class LiveMigration:
    """One live migration job. Create, then ``await run()``; it returns the report
    for every outcome and raises only for errors found before the job was created
    (a locked VM, an unknown host)."""

    mode = "live"

    def __init__(
        self,
        inventory: Inventory,
        store: Store,
        audit: AuditLog,
        vm: str,
        dest: str,
        opts: MigrationOptions,
        *,
        on_progress: ProgressFn | None = None,
        job_id: str | None = None,
    ) -> None:
        self.inventory = inventory
        self.store = store
        self.audit = audit
        self.vm = vm
        self.opts = opts
        self.on_progress = on_progress or (lambda p: None)
        record = store.get_vm(vm)
        self.spec = VMSpec.model_validate_json(record.spec_json)
        #: what the destination QEMU runs (online migration points its disks elsewhere)
        self.dest_spec: VMSpec = self.spec
        self.src_cfg: HostConfig = inventory.host(record.host)
        self.dst_cfg: HostConfig = inventory.host(dest)
        if record.host == dest:
            raise UserError(f"VM {vm} already runs on {dest}")
        # refuse impossible option sets before any job exists (checked again in begin
        # against the source's real QEMU version)
        plan_setup(opts)
        self.job_id = job_id or new_job_id()
        self.log = logging.getLogger(f"vmigrate.migration.{self.job_id}")
        self.report = MigrationReport(
            job=self.job_id, vm=vm, mode=self.mode, source=record.host, dest=dest,
            policy=opts.policy.name, policy_description=describe(opts.policy),
            options=options_dict(opts), tls=opts.tls,
        )
        self._cancel = asyncio.Event()
        self._cleanups: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._pnr = False  # point of no return passed: the destination guest runs
        self._paused_source = False
        self._migrating = False
        self._tls_id = f"vmigrate-tls-{self.job_id}"
        self.src: Host = open_host(self.src_cfg)
        self.dst: Host = open_host(self.dst_cfg)
        self.src_qmp: QmpSession | None = None
        self.dst_qmp: QmpSession | None = None
        self.setup: MigrationSetup | None = None
        self.uri = ""
        self.probe: DowntimeProbe | None = None
        #: where the destination's console log stood before its QEMU started
        self._dst_log_from = 0
        #: the lab guest's last memory-check pass seen on the source before migrating
        self._src_pass = 0

    # -- bookkeeping -------------------------------------------------------------------

    def _phase(self, phase: str) -> None:
        """Write-ahead: the phase is stored and audited before its side effects."""
        self.report.phase = phase
        self.store.set_phase(self.job_id, phase)
        self.audit.append("phase", {"phase": phase, "vm": self.vm}, job=self.job_id)
        self.log.info("phase %s", phase)
        self.on_progress(Progress(phase))

    def _decision(self, what: str, **data: Any) -> None:
        self.audit.append("decision", {"decision": what, **data}, job=self.job_id)
        self.log.info("decision %s %s", what, data)

    def cancel(self) -> None:
        """Ask the running job to cancel (from a signal handler or another task)."""
        self._cancel.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set() or self.store.get_job(self.job_id).cancel_requested:
            raise Cancelled("cancelled by the operator")

    # -- the job -----------------------------------------------------------------------

    async def run(self) -> MigrationReport:
        self.store.create_job(self.job_id, self.vm, self.mode, self.report.source,
                              self.report.dest, self.report.options, pid=os.getpid())
        self.report.started_at = time.time()
        t0 = time.monotonic()
        self.audit.append("job", {"vm": self.vm, "mode": self.mode,
                                  "source": self.report.source, "dest": self.report.dest,
                                  "options": self.report.options}, job=self.job_id)
        if self.report.prediction is not None:  # the plan this job started from
            self.audit.append("prediction", self.report.prediction, job=self.job_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.cancel)
        status, error = "completed", None
        try:
            async with AsyncExitStack() as stack:
                # sessions close after the rollback below, which still needs them
                stack.push_async_callback(self._close_hosts)
                try:
                    await self._run_phases(stack)
                except asyncio.CancelledError:
                    await self._rollback("the controller was interrupted")
                    self.report.total_time_s = round(time.monotonic() - t0, 3)
                    self._end("failed", "the controller was interrupted")
                    raise
                except _Ambiguous as exc:
                    status, error = "needs-operator", str(exc)
                except Exception as exc:
                    if not isinstance(exc, VmigrateError):
                        self.log.exception("unexpected error")
                    reason = str(exc) or type(exc).__name__
                    if self._pnr:
                        status, error = "needs-operator", f"after the switchover: {reason}"
                    else:
                        await self._rollback(reason)
                        status = "cancelled" if isinstance(exc, Cancelled) else "failed"
                        error = reason
                finally:
                    with contextlib.suppress(Exception):
                        await self._stop_probe()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        self.report.total_time_s = round(time.monotonic() - t0, 3)
        self._end(status, error)
        return self.report

    def _end(self, status: str, error: str | None) -> None:
        self.report.status = status  # type: ignore[assignment]
        self.report.error = error
        data = self.report.model_dump(mode="json")
        self.store.end_job(self.job_id, status, report=data, error=error)
        self.audit.append("end", {"status": status, "error": error,
                                  "observed_downtime_ms": self.report.observed_downtime_ms,
                                  "qemu_downtime_ms": self.report.qemu_downtime_ms},
                          job=self.job_id)

    async def _close_hosts(self) -> None:
        for host in (self.src, self.dst):
            with contextlib.suppress(Exception):
                await host.close()

    async def _run_phases(self, stack: AsyncExitStack) -> None:
        await self._begin()
        self._check_cancel()
        self.dst_qmp = await stack.enter_async_context(self._prepare())
        self._check_cancel()
        self.src_qmp = await stack.enter_async_context(
            qmp_session(self.src, process.vm_paths(self.src_cfg, self.vm).qmp, vm=self.vm))
        await self._perform()
        await self._finish()
        await self._confirm()

    # -- begin -------------------------------------------------------------------------

    async def _begin(self) -> None:
        self._phase("begin")
        state = await process.vm_state(self.src, self.src_cfg, self.vm)
        if state not in (process.VmState.RUNNING, process.VmState.PAUSED):
            raise StateError(f"VM {self.vm} is {state.value} on {self.src_cfg.name}; "
                             "live migration needs it running")
        await self.dst.run(["true"], timeout=20)  # reachable (raises HostUnreachableError)
        await self._check_dest_files()
        if await process.vm_pid(self.dst, process.vm_paths(self.dst_cfg, self.vm)):
            raise StateError(f"a QEMU for {self.vm} already runs on {self.dst_cfg.name}")
        if self.opts.tls:
            for host, cfg in ((self.src, self.src_cfg), (self.dst, self.dst_cfg)):
                missing = await host.missing([f"{cfg.tls_path}/{f}" for f in QEMU_FILES])
                if missing:
                    raise EnvironmentError_(
                        f"no TLS credentials on host {cfg.name} ({', '.join(missing)}): run "
                        f"'vmigrate certs issue {cfg.name}', or pass --no-tls"
                    )
        if self.dst_cfg.migration_address is None:
            raise UserError(f"host {self.dst_cfg.name} has no migration_address in the inventory")
        async with qmp_session(self.src, process.vm_paths(self.src_cfg, self.vm).qmp,
                               vm=self.vm) as qmp:
            ver = (await qmp.execute("query-version"))["qemu"]
        version = (int(ver["major"]), int(ver["minor"]), int(ver["micro"]))
        self.setup = plan_setup(self.opts, version)
        await self._begin_storage()
        self._decision("setup", capabilities=self.setup.capabilities,
                       parameters=self.setup.parameters, qemu=".".join(map(str, version)))

    # -- prepare -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _prepare(self) -> AsyncIterator[QmpSession]:
        assert self.setup is not None
        self._phase("prepare")
        self._cleanups.append(("remove the incoming VM on the destination", self._clean_dest))
        self._dst_log_from = await process.console_size(self.dst, self.dst_cfg, self.vm)
        await self._prepare_storage()
        await process.start_vm(self.dst, self.dst_cfg, self.dest_spec, incoming="defer",
                               paused=self._hold_dest)
        paths = process.vm_paths(self.dst_cfg, self.vm)
        async with qmp_session(self.dst, paths.qmp, vm=self.vm) as qmp:
            if self.opts.tls:
                await qmp.execute("object-add", {
                    "qom-type": "tls-creds-x509", "id": self._tls_id,
                    "dir": str(self.dst_cfg.tls_path), "endpoint": "server", "verify-peer": True,
                })
            await _set_caps(qmp, self.setup.capabilities)
            params = dict(self.setup.dest_parameters)
            if self.opts.tls:
                params["tls-creds"] = self._tls_id
            if params:
                await qmp.execute("migrate-set-parameters", params)
            await self._export_storage(qmp)
            self.uri = await self._listen(qmp, "migrate-incoming")
            yield qmp

    async def _listen(self, qmp: QmpSession, command: str, *, oob: bool = False) -> str:
        """Start the destination listening on a free port of its migration address."""
        addr = self.dst_cfg.migration_address

        async def listen(port: int) -> None:
            await qmp.execute(command, {"uri": f"tcp:{addr}:{port}"}, oob=oob,
                              timeout=QMP_TIMEOUT_S)

        return f"tcp:{addr}:{await on_free_port(listen)}"

    async def _clean_dest(self) -> None:
        # the monitor takes one client at a time: quit through our own session first
        await _quit(self.dst_qmp)
        self.dst_qmp = None
        await process.stop_vm(self.dst, self.dst_cfg, self.spec, force=True)
        await process.remove_vm_dir(self.dst, self.dst_cfg, self.vm)

    # -- perform -----------------------------------------------------------------------

    async def _perform(self) -> None:
        assert self.setup is not None and self.src_qmp is not None
        qmp = self.src_qmp
        self._phase("perform")
        controller = ConvergenceController(self.opts, self.setup)
        if self.opts.tls:
            self._cleanups.append(("remove TLS credentials object on the source",
                                   self._del_src_tls))
            await qmp.execute("object-add", {
                "qom-type": "tls-creds-x509", "id": self._tls_id,
                "dir": str(self.src_cfg.tls_path), "endpoint": "client", "verify-peer": True,
            })
        # "events": MIGRATION events wake the sampling loop at each state change
        await _set_caps(qmp, {**self.setup.capabilities, "events": True})
        params = dict(controller.initial_parameters())
        if self.opts.tls:
            params["tls-creds"] = self._tls_id
        await qmp.execute("migrate-set-parameters", params)
        if self._memtouch:
            self._src_pass = last_memcheck_pass(
                await process.read_console(self.src, self.src_cfg, self.vm, lines=200))
        await self._start_storage(qmp)
        self._start_probe()  # after the disk copy: the probe's deadline is the policy's
        self._cleanups.append(("cancel the migration on the source", self._cancel_source))
        self._migrating = True
        t0 = time.monotonic()
        with qmp.events("MIGRATION") as events:
            await qmp.execute("migrate", {"uri": self.uri})
            self._decision("migrate", uri=self.uri)
            last_bytes, last_move = -1, t0
            postcopy_at: float | None = None
            reply: dict[str, Any] = {}
            while True:
                # a state change (pre-switchover, completed) wakes the loop at once
                await events.wait(SAMPLE_INTERVAL)
                self._check_cancel()
                now = time.monotonic()
                try:
                    reply = await qmp.execute(
                        "query-migrate",
                        timeout=POSTCOPY_STALL_S if self.report.postcopy else QMP_TIMEOUT_S)
                except QmpError as exc:
                    # in post-copy a lost link can block the source's main loop, and with it
                    # query-migrate: an unanswered monitor is a stalled link
                    if self.report.postcopy and exc.error_class is None:
                        await self._recover_postcopy(time.monotonic() - last_move)
                        last_move = time.monotonic()
                        continue
                    raise
                sample = Sample.from_query_migrate(now - t0, reply)
                status = sample.status
                if status == "pre-switchover":  # the source is paused: hand over the disks
                    await self._switchover(qmp)
                    continue
                await self._watch_storage(qmp)
                self.report.max_throttle_pct = max(self.report.max_throttle_pct,
                                                   sample.throttle_pct)
                if sample.transferred != last_bytes:
                    last_bytes, last_move = sample.transferred, now
                if status.startswith("postcopy") and not self._pnr:
                    self._pnr = True  # the destination guest runs from here on
                    self._decision("point-of-no-return", status=status)
                    if self._hold_dest:
                        await self._release_dest()
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise MigrationFailed(f"QEMU reports the migration {status}: "
                                          f"{reply.get('error-desc', 'no reason given')}")
                if status == "postcopy-paused" or (
                    status == "postcopy-active" and now - last_move > POSTCOPY_STALL_S
                ):
                    await self._recover_postcopy(now - last_move)
                    last_move = time.monotonic()
                    continue
                if status == "active" and now - last_move > LINK_STALL_S:
                    raise MigrationFailed(
                        f"the migration link stalled: no bytes moved for {now - last_move:.0f}s "
                        f"(is the link between {self.src_cfg.name} and {self.dst_cfg.name} down?)")
                for action in controller.observe(sample):
                    await self._apply(action, qmp)
                    if isinstance(action, StartPostcopy):
                        postcopy_at = time.monotonic()
                self.on_progress(Progress("perform", sample, _last_step(controller)))
        self._migrating = False
        self.report.steps = [_step_dict(s) for s in controller.history]
        ram = reply.get("ram", {})
        self.report.qemu_downtime_ms = reply.get("downtime")
        self.report.qemu_total_time_ms = reply.get("total-time")
        self.report.bytes_transferred = ram.get("transferred")
        self.report.ram_bytes = ram.get("total")
        self.report.iterations = ram.get("dirty-sync-count")
        if postcopy_at is not None:
            self.report.postcopy_time_s = round(time.monotonic() - postcopy_at, 3)
        self._pnr = True
        self._decision("completed", downtime_ms=self.report.qemu_downtime_ms,
                       bytes=self.report.bytes_transferred)

    async def _apply(self, action: object, qmp: QmpSession) -> None:
        if isinstance(action, SetParameters):
            await qmp.execute("migrate-set-parameters", dict(action.params))
            self._decision("set-parameters", params=dict(action.params), why=action.why)
        elif isinstance(action, StartPostcopy):
            self._decision("postcopy", why=action.why)  # audited before the side effect
            await qmp.execute("migrate-start-postcopy")
            self.report.postcopy = True
        elif isinstance(action, PauseGuest):
            self._decision("pause-guest", why=action.why)
            await qmp.execute("stop")
            self._paused_source = True
            self.report.paused_guest = True
        elif isinstance(action, Abort):
            self._decision("abort", why=action.why)
            raise MigrationFailed(f"policy {self.opts.policy.name}: {action.why}")
        else:
            raise TypeError(f"unknown action {action!r}")

    async def _recover_postcopy(self, stalled_for: float) -> None:
        """The link failed during post-copy: pause both sides, wait for the link,
        resume. Gives up (needs-operator) when the policy's timeout is spent."""
        assert self.src_qmp is not None and self.dst_qmp is not None
        self._decision("postcopy-pause", stalled_s=round(stalled_for, 1))
        self.on_progress(Progress("perform", note="post-copy link lost: pausing to recover"))
        for qmp in (self.src_qmp, self.dst_qmp):
            # out-of-band: the destination's main loop may be blocked on a missing page
            with contextlib.suppress(QmpError):
                await qmp.execute("migrate-pause", oob=True, timeout=QMP_TIMEOUT_S)
        await self._wait_status(self.src_qmp, {"postcopy-paused"}, 30)
        # the destination's main loop may stay blocked on a missing page until the
        # source resumes, so its (in-band) query-migrate is only asked, not awaited
        with contextlib.suppress(QmpError):
            await self._wait_status(self.dst_qmp, {"postcopy-paused"}, 4, call_timeout=2)
        deadline = time.monotonic() + self.opts.policy.timeout_s
        addr = self.dst_cfg.migration_address or ""
        while time.monotonic() < deadline:
            ping = await self.src.run(["ping", "-n", "-c", "1", "-W", "1", addr], check=False)
            if ping.status == 0:
                try:
                    uri = await self._listen(self.dst_qmp, "migrate-recover", oob=True)
                    await self.src_qmp.execute("migrate", {"uri": uri, "resume": True},
                                               timeout=QMP_TIMEOUT_S)
                except QmpError as exc:
                    self.log.warning("post-copy resume failed, retrying: %s", exc)
                    await asyncio.sleep(1)
                    continue
                self.report.postcopy_recoveries += 1
                self._decision("postcopy-recovered", uri=uri)
                self.on_progress(Progress("perform", note="post-copy recovered"))
                return
            self.on_progress(Progress("perform", note="post-copy paused: waiting for the link"))
            await asyncio.sleep(1)
        raise _Ambiguous(
            f"post-copy paused and the link did not come back within "
            f"{self.opts.policy.timeout_s:.0f}s: the guest's memory is split between "
            f"{self.src_cfg.name} and {self.dst_cfg.name}; restore the link and run "
            f"'vmigrate job recover'")

    @staticmethod
    async def _wait_status(qmp: QmpSession, wanted: set[str], timeout: float,
                           call_timeout: float = QMP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = str((await qmp.execute("query-migrate", timeout=call_timeout)
                          ).get("status"))
            if status in wanted or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)

    def _start_probe(self) -> None:
        lab = self.inventory.lab
        if lab is None or not self.spec.ip:
            return
        self.probe = DowntimeProbe(lab.probe_netns, self.spec.ip,
                                   max_seconds=int(self.opts.policy.timeout_s) + 120)
        self.probe.start()
        self._cleanups.append(("stop the downtime probe", self._stop_probe))

    async def _await_ping(self) -> None:
        """Before the probe stops: wait for the guest to answer from the destination,
        so a silence that outlasts the switchover is measured, not cut short."""
        if self.probe is None:
            return
        try:
            await asyncio.to_thread(self.probe.wait_reply, PING_WAIT_S,
                                    self.probe.replies() + 1)
            self.report.verification.answers_ping = True
        except LabError as exc:
            self.report.verification.answers_ping = False
            self._decision("no-ping-reply", error=str(exc))

    async def _stop_probe(self) -> None:
        if self.probe is not None:
            result = await asyncio.to_thread(self.probe.stop)
            self.probe = None
            self.report.observed_downtime_ms = result.longest_gap_ms
            if self.report.verification.answers_ping is False and result.last_reply:
                # silent since its last reply: that silence is the downtime so far
                self.report.observed_downtime_ms = max(
                    result.longest_gap_ms, (time.time() - result.last_reply) * 1000.0)
            self.report.probe = {"sent": result.sent, "received": result.received,
                                 "duration_s": result.duration_s}

    async def _cancel_source(self) -> None:
        if not self._migrating or self.src_qmp is None:
            return
        await self.src_qmp.execute("migrate_cancel")
        status = await self._wait_status(self.src_qmp, {"cancelled", "failed", "none"}, 30)
        self._migrating = False
        if status not in {"cancelled", "failed", "none"}:
            raise MigrationFailed(f"migrate_cancel left the source in status {status}")

    async def _del_src_tls(self) -> None:
        if self.src_qmp is not None:
            await self.src_qmp.execute("object-del", {"id": self._tls_id})

    # -- finish and confirm --------------------------------------------------------------

    @property
    def _memtouch(self) -> bool:
        return self.spec.workload is not None and any(
            w.kind == "memtouch" for w in parse_workloads(self.spec.workload))

    async def _dest_console(self) -> str:
        """What the destination guest printed (its console from our QEMU's start)."""
        return await process.read_console(self.dst, self.dst_cfg, self.vm,
                                          offset=self._dst_log_from)

    async def _finish(self) -> None:
        assert self.dst_qmp is not None
        self._phase("finish")
        status = await self._wait_run_state(self.dst_qmp, 30)
        if status == "paused" and (self._paused_source or self._hold_dest):
            # we paused it to converge, or held it (-S) to hand over its disks: resume it
            await self._release_dest()
            status = await self._wait_run_state(self.dst_qmp, 10)
        if status != "running":
            raise _Ambiguous(f"the migration completed but the guest on {self.dst_cfg.name} "
                             f"is {status}, not running")
        await self._finish_storage()
        self.report.verification.dest_running = True
        t0 = time.monotonic()
        await self._await_ping()
        await self._stop_probe()
        if self._memtouch:  # a pass numbered above the source's last ran here
            await self._memcheck(after_pass=self._src_pass)
        else:
            self._check_crash(await self._dest_console())
        self.report.checks_s = round(time.monotonic() - t0, 3)

    @staticmethod
    async def _wait_run_state(qmp: QmpSession, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = await qmp.query_status()
            if status == "running" or time.monotonic() > deadline:
                return status
            if status == "paused":
                return status
            await asyncio.sleep(0.2)

    def _check_crash(self, text: str) -> bool:
        """A kernel crash or a fresh boot on the destination console means the guest
        did not survive the move (memory lost or corrupted): record it."""
        line = find_guest_crash(text)
        if line is None:
            return False
        self.report.verification.guest_crash = line
        self.report.verification.console_tail = text.splitlines()[-20:]
        self._decision("guest-crash", line=line)
        return True

    async def _memcheck(self, after_pass: int) -> None:
        """The lab guest's memory workload verifies every page on each pass: wait for
        the verdict of a pass that ran on the destination (numbered above
        ``after_pass``, the last pass the source printed before migrating). A crash or
        a reboot on the destination is a failed check: a rebooted guest starts
        counting again."""
        deadline = time.monotonic() + MEMCHECK_WAIT_S
        text = ""
        while time.monotonic() < deadline:
            text = await self._dest_console()
            if self._check_crash(text):
                self.report.verification.memcheck = "fail"
                self.report.verification.memcheck_line = self.report.verification.guest_crash
                return
            for match in _MEMCHECK.finditer(text):
                if match.group("pass") and int(match.group("pass")) <= after_pass:
                    continue
                verdict = {"ok": "ok", "FAIL": "fail"}.get(match.group("verdict") or "",
                                                            "exited")
                self.report.verification.memcheck = verdict
                self.report.verification.memcheck_line = match.group(0).strip()
                self._decision("memcheck", verdict=verdict)
                return
            await asyncio.sleep(1)
        self.report.verification.memcheck = "none"
        self.report.verification.console_tail = text.splitlines()[-20:]

    async def _confirm(self) -> None:
        self._phase("confirm")
        self._cleanups.clear()  # nothing to roll back any more
        await _quit(self.src_qmp)
        self.src_qmp = None
        await process.stop_vm(self.src, self.src_cfg, self.spec, force=True)
        await process.remove_vm_dir(self.src, self.src_cfg, self.vm)
        await self._confirm_storage()

    # -- storage hooks: live migration leaves disks where they are (shared storage) ----

    #: start the destination QEMU with -S: it runs only when :meth:`_release_dest` says
    _hold_dest = False

    async def _release_dest(self) -> None:
        """Let the destination guest run (it was paused, or held with -S)."""
        assert self.dst_qmp is not None
        await self.dst_qmp.execute("cont")

    async def _check_dest_files(self) -> None:
        """Begin: what the destination QEMU opens must be visible there."""
        await process.check_files(self.dst, self.dst_cfg, self.dest_spec)

    async def _begin_storage(self) -> None:
        """Begin: inspect the disks and plan where they go."""

    async def _prepare_storage(self) -> None:
        """Prepare, before the destination QEMU starts: allocate its disks."""

    async def _export_storage(self, qmp: QmpSession) -> None:
        """Prepare, destination QEMU started: open the disks to the source."""

    async def _start_storage(self, qmp: QmpSession) -> None:
        """Perform, before ``migrate``: start copying the disks."""

    async def _watch_storage(self, qmp: QmpSession) -> None:
        """Perform, every sample: raise if the disk copy failed."""

    async def _switchover(self, qmp: QmpSession) -> None:
        """Perform, source paused before the switchover (``pause-before-switchover``)."""
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def _finish_storage(self) -> None:
        """Finish, the guest runs on the destination: record that the VM lives there
        (with its disks, where they moved)."""
        self.store.set_vm_host(self.vm, self.dst_cfg.name)

    async def _confirm_storage(self) -> None:
        """Confirm, the source QEMU stopped: release the source's disks."""

    # -- rollback ----------------------------------------------------------------------

    async def _rollback(self, reason: str) -> None:
        """Run the cleanups, newest first, each guarded; then resume the source if we
        paused it and record the end state of both hosts."""
        self.audit.append("rollback", {"reason": reason}, job=self.job_id)
        for what, step in reversed(self._cleanups):
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.report.cleanup_errors.append(f"{what}: {exc}")
                self.log.warning("cleanup %r failed: %s", what, exc)
        self._cleanups.clear()
        if self._paused_source and self.src_qmp is not None:
            try:
                await self.src_qmp.execute("cont")
            except Exception as exc:
                self.report.cleanup_errors.append(f"resume the source: {exc}")
        try:
            if self.src_qmp is not None:
                src_status = await self.src_qmp.query_status()
            else:
                src_status = (await process.vm_state(self.src, self.src_cfg, self.vm)).value
            self.report.verification.source_running = src_status == "running"
            dest_pid = await process.vm_pid(self.dst, process.vm_paths(self.dst_cfg, self.vm))
            self.report.verification.dest_clean = dest_pid is None
        except (HostError, QmpError) as exc:
            self.report.cleanup_errors.append(f"checking end state: {exc}")


_MEMCHECK = re.compile(
    r"MEMCHECK pass=(?P<pass>\d+) (?P<verdict>ok|FAIL).*|VMIGRATE WORKLOAD EXIT kind=memtouch.*")


#: what a guest prints when it crashed, or when it booted afresh (a reset)
_CRASH = re.compile(
    r"Kernel panic - not syncing.*|kernel BUG at.*|BUG: .*|WARNING: CPU: .*"
    r"|Oops: .*|general protection fault.*|Linux version \S+.*|.*is not a head!")


async def on_free_port(start: Callable[[int], Awaitable[None]], tries: int = 5) -> int:
    """Call ``start(port)`` with random ports of :data:`PORT_RANGE` until one is not
    refused (taken); return that port, or raise the last refusal."""
    last: QmpError | None = None
    for _ in range(tries):
        port = random.randint(*PORT_RANGE)
        try:
            await start(port)
            return port
        except QmpError as exc:  # port taken: try another
            last = exc
    assert last is not None
    raise last


def find_guest_crash(text: str) -> str | None:
    """The first console line telling that the guest crashed or booted afresh."""
    match = _CRASH.search(text)
    return match.group(0).strip() if match else None


def last_memcheck_pass(text: str) -> int:
    """The highest memtouch pass number in a console log (0 if none)."""
    return max((int(m.group("pass")) for m in _MEMCHECK.finditer(text) if m.group("pass")),
               default=0)


async def _quit(qmp: QmpSession | None) -> None:
    """Ask QEMU to quit through an open session; a hang-up is the expected answer."""
    if qmp is not None:
        with contextlib.suppress(QmpError):
            await qmp.execute("quit")


async def _set_caps(qmp: QmpSession, caps: dict[str, bool]) -> None:
    if caps:
        await qmp.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k, "state": v} for k, v in caps.items()]})


def _step_dict(step: Any) -> dict[str, Any]:
    return {"t": round(step.t, 2), "iteration": step.iteration, "action": step.action,
            "detail": step.detail, "taken": step.taken}


def _last_step(controller: ConvergenceController) -> str | None:
    hist = controller.history
    return f"{hist[-1].action}: {hist[-1].detail}" if hist else None
