"""Memory strategies: how the guest itself gets from the source to the destination.

* :class:`PreCopy` (live, online): QEMU copies the memory while the guest runs,
  under the convergence policy (downtime ladder, throttling, post-copy, pause),
  over TLS; the destination waits ``-incoming defer``; a post-copy whose link
  fails is paused and recovered. The point of no return is the switch: QEMU
  completing (the destination runs the guest), or the post-copy switch.
* :class:`Offline` (cold, warm): the guest powers off on the source (ACPI, then
  hard after the timeout unless ``force`` is off), the storage strategy copies
  what is left, the VM boots on the destination. The point of no return is the
  destination VM starting.

The engine (:mod:`vmigrate.migration.engine`) calls the hooks in the same order
for both; :meth:`MemoryStrategy.settle` answers, after a failure or a crash,
whether the point of no return has passed according to the hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from vmigrate import pki
from vmigrate.drivers.base import CANCELLABLE_STATES, POSTCOPY_STATES, Monitor
from vmigrate.errors import (
    ConflictError,
    EnvironmentError_,
    HostError,
    MigrationFailed,
    NeedsOperator,
    QmpConnectionError,
    QmpError,
    StateError,
    UserError,
)
from vmigrate.migration.job import Job, PointOfNoReturnPassed, undo_action
from vmigrate.migration.report import MemoryFigures, StepEntry
from vmigrate.migration.state import MemoryKind
from vmigrate.migration.storage import StorageStrategy, on_free_port
from vmigrate.plan.adaptive import AdaptiveController, make_controller
from vmigrate.plan.capabilities import MigrationOptions, MigrationSetup, plan_setup
from vmigrate.plan.convergence import (
    Abort,
    Action,
    Controller,
    PauseGuest,
    Sample,
    SetParameters,
    StartPostcopy,
)
from vmigrate.plan.policy import describe
from vmigrate.progress import Event
from vmigrate.qemu.cpu import (
    CpuCheck,
    check_cpu,
    check_machine,
    cpu_requests,
    effective_cpu,
    parse_cpu,
    unavailable,
)
from vmigrate.qemu.process import VmState

#: bytes/s assumed for the link until QEMU measures it (no assessment, no cap): 1 Gbit/s
UNKNOWN_LINK = 125_000_000
#: the source's events that wake the sampling loop before its period: a state change,
#: a pass end (the simulation the models use samples at the same moments)
_WAKE_ON = ("MIGRATION", "MIGRATION_PASS")


class MemoryStrategy(ABC):
    """How the guest moves (see the module doc)."""

    kind: ClassVar[MemoryKind]

    @abstractmethod
    async def begin(self, job: Job, storage: StorageStrategy) -> None:
        """Check the source VM and the destination; nothing is allocated."""

    async def prepare(self, job: Job, storage: StorageStrategy) -> None:  # noqa: B027
        """Make the destination ready to receive the guest."""

    @abstractmethod
    async def perform(self, job: Job, storage: StorageStrategy) -> None:
        """Move the guest until it no longer runs on the source."""

    @abstractmethod
    async def switch(self, job: Job, storage: StorageStrategy) -> None:
        """Let the guest run on the destination; passes the point of no return.
        Idempotent: a guest already running there is left alone."""

    async def complete(self, job: Job, storage: StorageStrategy) -> None:  # noqa: B027
        """After the point of no return: finish what is still in flight (a post-copy)."""

    @abstractmethod
    async def settle(self, job: Job) -> bool | None:
        """After a failure or a crash: True if the guest has run on the destination
        (finish forward), False if it never did (roll back), None if the hosts do not
        tell (an operator must look)."""

    @abstractmethod
    async def confirm(self, job: Job, storage: StorageStrategy) -> None:
        """The guest runs on the destination: stop and release the source."""


def migration_options(job: Job) -> MigrationOptions:
    return job.opts.memory_options()


async def check_hardware(job: Job, *, live: bool) -> None:
    """Begin: can the destination's QEMU give the guest its hardware
    (:mod:`vmigrate.qemu.cpu`)? Asks the source's QEMU (``live``: the process that runs
    the guest) and a probe of the destination's; allocates nothing.

    Live and online (``live``): the guest keeps its machine type and CPU across the
    move. A destination whose QEMU lacks the versioned machine type the source runs, or
    that cannot give every CPU feature the guest has (its QEMU, its CPU, the inventory's
    ``cpu_limit``), is refused with :class:`UserError` naming them; the spec's machine
    type is pinned to that versioned type (a VM defined with an alias before vmigrate
    pinned them). Cold and warm: the guest boots afresh there; a machine type the
    destination lacks is refused (QEMU would not start it, after the copy), CPU features
    it cannot give are a warning in the report (the guest boots without them)."""
    st = job.state
    src_cfg, dst_cfg = job.src.config, job.dst.config
    cpu = effective_cpu(st.spec.cpu, src_cfg.accel)
    limit = parse_cpu(dst_cfg.cpu_limit) if dst_cfg.cpu_limit else None
    there = await job.dst.qemu_offer(cpu_requests(cpu, limit))
    if live:
        mon = job.src_monitor()
        machine = await mon.machine_type()
        here = await mon.qemu_offer(cpu_requests(cpu))
    else:
        machine = there.resolve_machine(st.spec.machine) or st.spec.machine
    problem = check_machine(machine, there, job.dst.name)
    if problem is not None:
        raise UserError(problem)
    if live:
        verdict = check_cpu(cpu, here, there, dst_name=job.dst.name, dst_limit=limit,
                            identical=src_cfg.cpu_group is not None
                            and src_cfg.cpu_group == dst_cfg.cpu_group,
                            explicit=st.spec.cpu is not None)
        missing, problems = verdict.missing, verdict.problems
    else:
        missing, problems = unavailable(cpu, there, limit=limit), ()
    job.decision("hardware", machine=machine, cpu=cpu.describe(), missing=list(missing),
                 problems=list(problems))
    if live and (missing or problems):
        raise UserError(f"{job.dst.name} cannot take {job.vm} live: "
                        + CpuCheck(cpu.describe(), missing, problems).explain(
                            job.src.name, job.dst.name)
                        + " (a running guest keeps its CPU: choose another destination, or "
                        "migrate it cold to boot it there without them)")
    if missing:
        text = (f"warning: {job.dst.name} cannot give the guest's CPU ({cpu.describe()}) "
                f"these features: {', '.join(missing)}; it boots there without them, and "
                "software that needs them will fail")
        job.note(text)
        job.say(text)
    if st.spec.cpu is None:
        job.note(f"{job.vm} has no CPU model of its own (defined before vmigrate gave VMs "
                 f"one): it runs '{cpu.model}' on {job.src.name}")
    if live and machine != st.spec.machine:  # pinned from now on, as the source runs it
        st.spec = st.spec.model_copy(update={"machine": machine})
        st.dest_spec = st.dest_spec.model_copy(update={"machine": machine})
        job.save()


async def _wait_status(mon: Monitor, wanted: set[str], timeout: float, poll: float,
                       call_timeout: float | None = None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = (await mon.migration(timeout=call_timeout)).status
        if status in wanted or time.monotonic() > deadline:
            return status
        await asyncio.sleep(poll)


class PreCopy(MemoryStrategy):
    """Memory pre-copy under the convergence policy, with post-copy and its recovery."""

    kind = "precopy"

    def __init__(self) -> None:
        self.setup: MigrationSetup | None = None

    def _setup(self, job: Job) -> MigrationSetup:
        if self.setup is None:
            setup = plan_setup(migration_options(job), job.state.qemu_version)
            self.setup = MigrationSetup(capabilities=dict(job.state.capabilities),
                                        parameters=setup.parameters,
                                        dest_parameters=setup.dest_parameters,
                                        postcopy=setup.postcopy)
        return self.setup

    # -- begin

    async def begin(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        state = await job.src.vm_state(job.vm)
        if state not in (VmState.RUNNING, VmState.PAUSED):
            raise ConflictError(f"VM {job.vm} is {state.value} on {job.src.name}; live "
                                "migration needs it running")
        await job.dst.check_reachable()
        if await job.dst.vm_exists(job.vm):
            raise ConflictError(f"a QEMU for {job.vm} already runs on {job.dst.name}")
        if job.dst.config.migration_address is None:
            raise UserError(f"host {job.dst.name} has no migration_address in the inventory")
        await check_hardware(job, live=True)
        await self._begin_tls(job, storage)
        version = await job.src_monitor().version()
        setup = plan_setup(migration_options(job), version)
        st.qemu_version = version
        st.capabilities = {**setup.capabilities, **storage.capabilities}
        st.tls_id = f"vmigrate-tls-{job.id}"
        job.save()
        job.report.memory = MemoryFigures(policy=job.opts.policy.name,
                                          policy_description=describe(job.opts.policy))
        job.decision("setup", capabilities=st.capabilities, parameters=setup.parameters,
                     qemu=".".join(map(str, version)))

    @staticmethod
    async def _begin_tls(job: Job, storage: StorageStrategy) -> None:
        """TLS that authorises: both hosts' certificates must let the source, and only
        it, in (see :func:`vmigrate.pki.check_migration`); the source's client DN is
        what the destination's ``tls-authz`` will allow. Without TLS, only on purpose
        (``--insecure``), and the report says what was open."""
        st = job.state
        if not job.opts.tls:
            what = ("migration port and writable NBD export" if storage.holds_destination
                    else "migration port")
            if not job.opts.insecure:
                raise UserError(
                    f"a {job.state.mode} migration without TLS leaves the destination's {what} "
                    f"open to anyone on the migration network: pass --insecure to accept "
                    "that, or use TLS ('vmigrate certs issue "
                    f"{job.src.name} {job.dst.name}')")
            job.note(f"no TLS (--insecure): the destination's {what} on "
                     f"{job.dst.config.migration_address} accepted any client on the "
                     "migration network until the source connected; QEMU 7.2 can bind them "
                     "to the destination's migration address and limit the NBD server to "
                     "the source's connections, not restrict them to the source's address")
            return
        for drv in (job.src, job.dst):
            missing = await drv.tls_missing()
            if missing:
                raise EnvironmentError_(
                    f"no TLS credentials on host {drv.name} ({', '.join(missing)}): run "
                    f"'vmigrate certs issue {drv.name}', or pass --no-tls --insecure")
        src, dst = await job.src.tls_files(), await job.dst.tls_files()
        address = job.dst.config.migration_address
        assert address is not None
        problems = pki.check_migration(src, dst, address)
        if problems:
            raise UserError(f"the TLS credentials of {job.src.name} and {job.dst.name} do "
                            f"not allow this migration: {'; '.join(problems)}")
        st.tls_authz = pki.x509_dn(src.client)
        job.decision("tls", authz=st.tls_authz, dest_address=address,
                     server_not_after=pki.cert_info(dst.server).not_after.isoformat(),
                     client_not_after=pki.cert_info(src.client).not_after.isoformat())

    # -- prepare

    async def prepare(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        setup = self._setup(job)
        job.register("kill-incoming")
        st.dest_log_from = await job.dst.console_size(job.vm)
        job.save()
        await job.dst.start_vm(st.dest_spec, incoming=True, held=storage.holds_destination)
        mon = job.dst_monitor()
        if job.opts.tls:
            await mon.add_tls(st.tls_id, str(job.dst.config.tls_path), "server")
            # only the source's client certificate may connect (migration and NBD)
            await mon.add_authz(st.authz_id, st.tls_authz)
        await mon.set_capabilities(setup.capabilities)
        params = dict(setup.dest_parameters)
        if job.opts.tls:
            params["tls-creds"] = st.tls_id
            params["tls-authz"] = st.authz_id
        await mon.set_parameters(params)
        await storage.export(job)
        st.uri = await self._listen(job, mon, recover=False)
        job.save()

    async def _listen(self, job: Job, mon: Monitor, *, recover: bool) -> str:
        """The destination listens on a free port of its migration address."""
        addr = job.dst.config.migration_address

        async def listen(port: int) -> None:
            uri = f"tcp:{addr}:{port}"
            await (mon.listen_recover(uri) if recover else mon.listen(uri))

        return f"tcp:{addr}:{await on_free_port(listen)}"

    # -- perform

    @staticmethod
    def _controller(job: Job, setup: MigrationSetup) -> Controller:
        """The policy's controller: an adaptive one plans from the assessment the job
        started with (or, without one, from the first pass)."""
        o = job.opts
        ram = float(job.state.spec.memory_mib << 20)
        if o.postcopy_unneeded and o.assessed is not None:
            note = (f"post-copy not enabled: the assessment shows the guest dirtying "
                    f"{o.assessed.dirty_rate / 2**20:.1f} MiB/s of a "
                    f"{o.assessed.bandwidth / 2**20:.1f} MiB/s link, and QEMU switches "
                    "over faster without it")
            if note not in job.report.notes:
                job.report.notes.append(note)
        start = o.assessed.situation() if o.assessed is not None else None
        return make_controller(
            migration_options(job), setup, start=start,
            wss=start.wss if start is not None else ram,
            bandwidth=start.bandwidth if start is not None else float(
                o.bandwidth or UNKNOWN_LINK))

    @staticmethod
    def _audit_plan(job: Job, controller: Controller | None) -> None:
        """Every change of path an adaptive controller made: a decision, with its figures."""
        if isinstance(controller, AdaptiveController):
            for d in controller.take_decisions():
                job.decision("path", **d)

    async def perform(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        setup = self._setup(job)
        mon = job.src_monitor()
        controller = self._controller(job, setup)
        if job.opts.tls:
            job.register("remove-source-tls")
            await mon.add_tls(st.tls_id, str(job.src.config.tls_path), "client")
        # "events": MIGRATION events wake the sampling loop at each state change, and
        # MIGRATION_PASS ones at each pass end (where the policy decides)
        await mon.set_capabilities({**setup.capabilities, "events": True})
        params = dict(controller.initial_parameters())
        if job.opts.tls:
            params["tls-creds"] = st.tls_id
        await mon.set_parameters(params)
        await storage.start(job)
        for v in job.verifiers:
            await v.before_switch(job)
        assert st.uri is not None
        job.register("cancel-migration")
        st.migrating = True
        job.save()
        with mon.events(*_WAKE_ON) as events:
            await mon.migrate(st.uri)
            job.decision("migrate", uri=st.uri)
            self._audit_plan(job, controller)
            await self._drive(job, storage, controller, events)

    async def _drive(self, job: Job, storage: StorageStrategy,
                     controller: Controller | None, events: Any) -> None:
        """Sample the source until QEMU reports the migration completed, applying the
        policy, handing the disks over at the pre-switchover pause, passing the point
        of no return at the post-copy switch, recovering a post-copy whose link
        failed. Before the point of no return a failure raises; after it a failing
        sample is tried again until the policy's timeout, then the job needs an
        operator."""
        st, t = job.state, job.timing
        mon = job.src_monitor()
        assert job.report.memory is not None
        fig = job.report.memory
        t0 = time.monotonic()
        last_bytes, last_move = -1, t0
        postcopy_at: float | None = time.monotonic() if st.postcopy else None
        deadline_after_pnr: float | None = None
        sample = Sample(t=0, status="none", transferred=0, remaining=0, total=0, iteration=0,
                        dirty_rate=0)
        while True:
            await events.wait(t.sample_s)
            job.check_cancel()
            now = time.monotonic()
            try:
                sample = await mon.migration(
                    timeout=t.postcopy_stall_s if st.postcopy else t.qmp_timeout_s)
            except (QmpError, HostError) as exc:
                if not st.pnr:
                    raise
                # in post-copy a lost link can block the source's main loop, and with it
                # query-migrate: an unanswered monitor is a stalled link
                deadline_after_pnr = deadline_after_pnr or now + job.opts.policy.timeout_s
                if now > deadline_after_pnr:
                    raise NeedsOperator(f"post-copy: the source does not answer ({exc}); the "
                                        "guest's memory is split between the hosts") from exc
                unanswered = isinstance(exc, QmpConnectionError) and exc.timed_out
                if unanswered and st.postcopy:
                    await self._recover_postcopy(job, now - last_move)
                    last_move = time.monotonic()
                else:
                    await asyncio.sleep(t.forward_retry_s)
                continue
            deadline_after_pnr = None
            sample = dataclasses.replace(sample, t=now - t0)
            status = sample.status
            if status == "pre-switchover":  # the source is paused: hand over the disks
                await storage.switchover(job)
                await mon.continue_migration("pre-switchover")
                continue
            if not st.pnr:
                await storage.watch(job)
            fig.max_throttle_pct = max(fig.max_throttle_pct, sample.throttle_pct)
            if sample.transferred != last_bytes:
                last_bytes, last_move = sample.transferred, now
            if status in POSTCOPY_STATES and not st.pnr:
                job.pass_point_of_no_return(f"post-copy ({status})")
                await storage.moved(job)
                if storage.holds_destination:
                    await self.switch(job, storage)
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                if st.pnr:
                    raise NeedsOperator(f"QEMU reports the post-copy migration {status}: the "
                                        "guest's memory is split between the hosts")
                raise MigrationFailed(f"QEMU reports the migration {status}")
            if status == "postcopy-paused" or (
                    status == "postcopy-active" and now - last_move > t.postcopy_stall_s):
                await self._recover_postcopy(job, now - last_move)
                last_move = time.monotonic()
                continue
            if status == "active" and now - last_move > t.link_stall_s:
                raise MigrationFailed(
                    f"the migration link stalled: no bytes moved for {now - last_move:.0f}s "
                    f"(is the link between {job.src.name} and {job.dst.name} down?)")
            if controller is not None and not st.pnr:
                actions = controller.observe(sample)
                self._audit_plan(job, controller)  # the plan before what it does
                for action in actions:
                    await self._apply(job, action)
                    if isinstance(action, StartPostcopy):
                        postcopy_at = time.monotonic()
            step = controller.history[-1] if controller and controller.history else None
            job.progress(Event(
                phase=st.phase.value, step=f"{step.action}: {step.detail}" if step else None,
                done=sample.transferred, total=sample.transferred + sample.remaining,
                figures={"mbps": sample.mbps, "dirty_bytes_rate": sample.dirty_bytes_rate,
                         "iteration": sample.iteration, "remaining": sample.remaining,
                         "transferred": sample.transferred}))
        if controller is not None:
            job.report.steps = [StepEntry(t=round(s.t, 2), iteration=s.iteration,
                                          action=s.action, detail=s.detail, taken=s.taken)
                                for s in controller.history]
        fig.qemu_downtime_ms = sample.downtime_ms
        fig.bytes = sample.transferred
        fig.ram_bytes = sample.total
        fig.iterations = sample.iteration
        fig.postcopy = st.postcopy
        if postcopy_at is not None:
            fig.postcopy_time_s = round(time.monotonic() - postcopy_at, 3)
        job.decision("completed", downtime_ms=sample.downtime_ms, bytes=sample.transferred)

    async def _apply(self, job: Job, action: Action) -> None:
        mon = job.src_monitor()
        st = job.state
        if isinstance(action, SetParameters):
            await mon.set_parameters(dict(action.params))
            job.decision("set-parameters", params=dict(action.params), why=action.why)
        elif isinstance(action, StartPostcopy):
            job.decision("postcopy", why=action.why)  # audited before the side effect
            st.postcopy = True
            job.save()
            await mon.start_postcopy()
        elif isinstance(action, PauseGuest):
            job.decision("pause-guest", why=action.why)
            st.source_paused = True
            job.save()
            await mon.pause()
            assert job.report.memory is not None
            job.report.memory.paused_guest = True
        elif isinstance(action, Abort):
            job.decision("abort", why=action.why)
            raise MigrationFailed(f"policy {job.opts.policy.name}: {action.why}")
        else:
            raise TypeError(f"unknown action {action!r}")

    async def _recover_postcopy(self, job: Job, stalled_for: float) -> None:
        """The link failed during post-copy: pause both sides, wait for the link,
        resume. The job needs an operator when the policy's timeout is spent."""
        t = job.timing
        src, dst = job.src_monitor(), job.dst_monitor()
        job.decision("postcopy-pause", stalled_s=round(stalled_for, 1))
        job.say("post-copy link lost: pausing to recover")
        for mon in (src, dst):
            # out-of-band: the destination's main loop may be blocked on a missing page
            with contextlib.suppress(QmpError, HostError):
                await mon.pause_migration(timeout=t.qmp_timeout_s)
        with contextlib.suppress(QmpError, HostError):
            status = await _wait_status(src, {"postcopy-paused", "completed", "failed"},
                                        t.cancel_wait_s, t.poll_s)
            if status == "completed":  # the last pages went before the pause took
                return
        # the destination's main loop may stay blocked on a missing page until the
        # source resumes, so its (in-band) query-migrate is only asked, not awaited
        with contextlib.suppress(QmpError, HostError):
            await _wait_status(dst, {"postcopy-paused"}, 4, t.poll_s, call_timeout=2)
        deadline = time.monotonic() + job.opts.policy.timeout_s
        addr = job.dst.config.migration_address or ""
        while time.monotonic() < deadline:
            with contextlib.suppress(HostError):
                if await job.src.can_reach(addr):
                    try:
                        uri = await self._listen(job, dst, recover=True)
                        await src.migrate(uri, resume=True)
                    except (QmpError, HostError) as exc:
                        job.log.warning("post-copy resume failed, retrying: %s", exc)
                        await asyncio.sleep(t.forward_retry_s)
                        continue
                    assert job.report.memory is not None
                    job.report.memory.postcopy_recoveries += 1
                    job.decision("postcopy-recovered", uri=uri)
                    job.say("post-copy recovered")
                    return
            job.say("post-copy paused: waiting for the link")
            await asyncio.sleep(t.forward_retry_s)
        raise NeedsOperator(
            f"post-copy paused and the link did not come back within "
            f"{job.opts.policy.timeout_s:.0f}s: the guest's memory is split between "
            f"{job.src.name} and {job.dst.name}; restore the link and run "
            f"'vmigrate job recover {job.id}'")

    # -- the switch

    async def switch(self, job: Job, storage: StorageStrategy) -> None:
        mon = job.dst_monitor()
        t = job.timing

        async def settled() -> bool:
            return await mon.run_state() not in ("inmigrate", "finish-migrate")

        await job.wait_until(settled, t.dest_run_wait_s)
        status = await mon.run_state()
        if status in ("paused", "prelaunch", "postmigrate"):
            # we paused it to converge, or held it (-S) to hand over its disks: release
            await storage.release(job)
            await mon.resume()
            status = await mon.run_state()
        if status != "running":
            if job.state.pnr:
                raise NeedsOperator(f"the guest on {job.dst.name} is {status}, not running, "
                                    "after the point of no return")
            raise MigrationFailed(f"the migration completed but the guest on {job.dst.name} "
                                  f"is {status}, not running")
        job.report.verification.dest_running = True
        job.pass_point_of_no_return("the guest runs on the destination")

    async def complete(self, job: Job, storage: StorageStrategy) -> None:
        """A post-copy still in flight is supervised to the end (and recovered)."""
        st = job.state
        if not st.migrating or not await job.src.vm_exists(job.vm):
            return
        sample = await job.src_monitor().migration(timeout=job.timing.qmp_timeout_s)
        if sample.status == "completed" or sample.status not in POSTCOPY_STATES:
            return
        if job.report.memory is None:
            job.report.memory = MemoryFigures(policy=job.opts.policy.name,
                                              policy_description=describe(job.opts.policy))
        st.postcopy = True
        with job.src_monitor().events(*_WAKE_ON) as events:
            await self._drive(job, storage, None, events)

    async def settle(self, job: Job) -> bool | None:
        st = job.state
        if st.pnr:
            return True
        if not st.migrating:
            return False  # migrate was never sent: the guest never left the source
        try:
            if not await job.src.vm_exists(job.vm):
                # the source QEMU is gone: the guest lives on only if the destination runs
                return True if await job.dst.vm_state(job.vm) == VmState.RUNNING else None
            status = (await job.src_monitor().migration(
                timeout=job.timing.qmp_timeout_s)).status
        except (QmpError, HostError):
            return None
        if status in POSTCOPY_STATES:
            return True
        if status != "completed":
            return False  # never switched: migrate_cancel (an undo) keeps it on the source
        try:
            dest = await job.dst.vm_state(job.vm)
        except HostError:
            return None
        # QEMU completed: a destination that runs (or waits, paused or held, for us to
        # let it run) takes the guest; one that is gone leaves it to the source
        if dest == VmState.STOPPED:
            return False
        if dest == VmState.UNKNOWN:
            return None
        return True

    async def confirm(self, job: Job, storage: StorageStrategy) -> None:
        if await job.src.vm_exists(job.vm):
            await job.src_monitor().quit()
        await job.src.stop_vm(job.state.spec, force=True)
        await job.src.remove_vm_dir(job.vm)


class Offline(MemoryStrategy):
    """The guest powers off on the source and boots on the destination."""

    kind = "offline"

    async def begin(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        state = await job.src.vm_state(job.vm)
        if state == VmState.UNKNOWN:
            raise StateError(f"cannot tell the state of VM {job.vm} on {job.src.name}")
        st.source_was_running = state != VmState.STOPPED
        if storage.keeps_source and state != VmState.RUNNING:
            raise ConflictError(f"VM {job.vm} is {state.value}: warm migration copies a "
                                "running VM's disks (use --mode cold)")
        await job.dst.check_reachable()
        if await job.dst.vm_exists(job.vm):
            raise ConflictError(f"a QEMU for {job.vm} already runs on {job.dst.name}")
        await check_hardware(job, live=False)
        job.save()
        job.report.tls = False  # the transfer stream carries its own AEAD
        job.report.stream_security = job.opts.cipher
        job.decision("transfer", transport="tcp" if job.dst.config.migration_address
                     else "ssh", cipher=job.opts.cipher, compress=job.opts.compress_disks,
                     bandwidth=job.opts.bandwidth)

    async def perform(self, job: Job, storage: StorageStrategy) -> None:
        await storage.start(job)
        for v in job.verifiers:
            await v.before_switch(job)
        job.check_cancel()
        await self._stop_source(job, storage)
        await storage.final(job)

    async def _stop_source(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        if not st.source_was_running:
            st.stopped_at = time.time()
            job.save()
            return
        job.register("restart-source")
        st.source_stopped = True
        st.stopped_at = time.time()
        job.save()
        job.say("shutting the guest down (ACPI)")
        t0 = time.monotonic()
        hard = await (self._power_off_kept(job) if storage.keeps_source
                      else self._power_off(job))
        job.decision("source-stopped", how="hard" if hard else "acpi",
                     seconds=round(time.monotonic() - t0, 2))

    async def _power_off(self, job: Job) -> bool:
        """Power the guest off; True when it had to be stopped hard."""
        try:
            await job.src.stop_vm(job.state.spec, timeout=job.opts.shutdown_timeout)
            return False
        except StateError:
            if not job.opts.force:
                raise
        await job.src.stop_vm(job.state.spec, force=True)
        return True

    async def _power_off_kept(self, job: Job) -> bool:
        """Power off, keeping QEMU (paused, with its bitmaps and exports) for the last
        delta; a guest that does not power off in time is paused hard."""
        mon = job.src_monitor()
        job.state.shutdown_action_set = True
        job.save()
        await mon.set_shutdown_action("pause")
        await mon.powerdown()

        async def off() -> bool:
            return await mon.run_state() in ("shutdown", "paused")

        if await job.wait_until(off, job.opts.shutdown_timeout):
            return False
        if not job.opts.force:
            raise StateError(f"VM {job.vm} did not power off within "
                             f"{job.opts.shutdown_timeout:.0f}s")
        await mon.pause()
        return True

    async def switch(self, job: Job, storage: StorageStrategy) -> None:
        st = job.state
        if not st.source_was_running:  # it was stopped: it stays stopped, now there
            job.pass_point_of_no_return("the stopped VM now lives on the destination")
            return
        if st.dest_started:
            state = await job.dst.vm_state(job.vm)
            if state == VmState.RUNNING:
                job.pass_point_of_no_return("the VM runs on the destination")
                return
            if state == VmState.UNKNOWN:
                raise HostError(f"{job.dst.name} did not say what state {job.vm} is in")
            if st.pnr:
                # it ran there, from the copies: never started again, nor the source
                raise NeedsOperator(f"{job.vm} started on {job.dst.name} and is now "
                                    f"{state.value}; its disks there are kept")
        job.register("stop-dest-vm")
        st.dest_log_from = await job.dst.console_size(job.vm)
        st.dest_started = True
        job.save()
        await storage.release(job)
        await job.dst.start_vm(st.dest_spec)
        # QEMU returned: the guest runs there, from the copies
        job.report.verification.dest_running = True
        job.pass_point_of_no_return("the VM started on the destination")
        if st.stopped_at is not None:  # until a probe says when it answered
            job.report.observed_downtime_ms = round((time.time() - st.stopped_at) * 1000, 1)

    async def settle(self, job: Job) -> bool | None:
        st = job.state
        if st.pnr:
            return True
        if not st.dest_started:
            return False
        try:
            if not await job.dst.vm_exists(job.vm):
                # started and gone: if it printed anything it ran on the copies
                grew = await job.dst.console_size(job.vm) > st.dest_log_from
                return None if grew else False
            return True if await job.dst.vm_state(job.vm) == VmState.RUNNING else None
        except HostError:
            return None

    async def confirm(self, job: Job, storage: StorageStrategy) -> None:
        if job.state.source_kept or await job.src.vm_exists(job.vm):
            await job.src.stop_vm(job.state.spec, force=True)
        await job.src.remove_vm_dir(job.vm)


MEMORY: dict[MemoryKind, type[MemoryStrategy]] = {"precopy": PreCopy, "offline": Offline}


# -- undo actions ------------------------------------------------------------------------


@undo_action("kill-incoming")
async def _kill_incoming(job: Job, _args: Mapping[str, Any]) -> None:
    """The destination QEMU that waited for the guest goes, with its runtime files."""
    if await job.dst.vm_exists(job.vm):
        with contextlib.suppress(QmpError):
            await job.dst_monitor().quit()
    await job.dst.stop_vm(job.state.dest_spec, force=True)
    await job.dst.remove_vm_dir(job.vm)


@undo_action("remove-source-tls")
async def _remove_source_tls(job: Job, _args: Mapping[str, Any]) -> None:
    if await job.src.vm_exists(job.vm):
        with contextlib.suppress(QmpError):  # never added, or gone with a cancel
            await job.src_monitor().remove_object(job.state.tls_id)


@undo_action("cancel-migration")
async def _cancel_migration(job: Job, _args: Mapping[str, Any]) -> None:
    """The source keeps the guest: a migration in flight is cancelled; one QEMU
    completed while the destination never ran is taken back (``cont``); a guest the
    policy paused runs again."""
    if not await job.src.vm_exists(job.vm):
        raise MigrationFailed(f"the source QEMU of {job.vm} is gone from {job.src.name}")
    mon = job.src_monitor()
    t = job.timing
    status = (await mon.migration(timeout=t.qmp_timeout_s)).status
    if status in CANCELLABLE_STATES:
        await mon.cancel_migration()
        status = await _wait_status(mon, {"cancelled", "failed", "none", "completed",
                                          *POSTCOPY_STATES}, t.cancel_wait_s, t.poll_s)
    if status in POSTCOPY_STATES:
        raise PointOfNoReturnPassed(f"the migration is in {status}: the guest runs on "
                                    f"{job.dst.name}")
    if status == "completed":
        # QEMU finished while the job failed: a destination that is there has the guest
        # (running, or waiting for us to let it run); only without it does the source
        # take the guest back
        if await job.dst.vm_exists(job.vm):
            raise PointOfNoReturnPassed(f"QEMU completed the migration to {job.dst.name}")
    elif status not in {"cancelled", "failed", "none"}:
        raise MigrationFailed(f"migrate_cancel left the source in status {status}")
    # the source stopped the guest (completed, or the policy paused it): it runs on
    if (status == "completed" or job.state.source_paused) and (
            await mon.run_state() != "running"):
        await mon.resume()
    job.state.migrating = False
    job.save()


@undo_action("restart-source")
async def _restart_source(job: Job, _args: Mapping[str, Any]) -> None:
    """The guest powered off on the source runs there again: a kept QEMU (warm) is
    reset and resumed, otherwise the VM starts afresh."""
    st = job.state
    state = await job.src.vm_state(job.vm)
    if state == VmState.RUNNING and st.source_stopped:
        # the power button was pressed (the answer may have been lost): a guest that
        # honours it goes down within the shutdown timeout; restart it then
        async def down() -> bool:
            return await job.src.vm_state(job.vm) not in (VmState.RUNNING, VmState.UNKNOWN)

        pressed = st.stopped_at or time.time()
        await job.wait_until(down, max(0.0, pressed + job.opts.shutdown_timeout - time.time()))
        state = await job.src.vm_state(job.vm)
    if state == VmState.RUNNING:
        st.source_stopped = False
        job.save()
        return
    if st.source_kept and state != VmState.STOPPED:
        mon = job.src_monitor()
        await mon.set_shutdown_action("poweroff")
        st.shutdown_action_set = False
        job.save()
        await mon.reset()
        await mon.resume()
    else:
        await job.src.stop_vm(st.spec, force=True)
        await job.src.start_vm(st.spec)
    st.source_stopped = False
    job.save()


@undo_action("stop-dest-vm")
async def _stop_dest_vm(job: Job, _args: Mapping[str, Any]) -> None:
    await job.dst.stop_vm(job.state.dest_spec, force=True)
    await job.dst.remove_vm_dir(job.vm)
