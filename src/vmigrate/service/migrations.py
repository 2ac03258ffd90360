"""Migrations as a service: one entry that turns a request into a job and runs it.

:class:`MigrationService` is what the CLI, the demo and the benchmarks call:

* :meth:`~MigrationService.options` validates every field of a
  :class:`MigrationRequest` before anything starts (a wrong request raises a
  :class:`~vmigrate.errors.UserError` and changes nothing);
* :meth:`~MigrationService.choose` settles ``--mode auto`` (assess, predict,
  decide) and attaches the prediction the report keeps;
* :meth:`~MigrationService.migrate` creates the job (which locks the VM), builds
  its two strategies and its verifiers (the lab guest's come from
  :mod:`vmigrate.lab.verifiers`, chosen from the VM), runs the engine and
  returns the report, stored with the job;
* :meth:`~MigrationService.recover` settles jobs whose controller died, or that
  wait for an operator.

Hypervisors are reached through a :class:`Backend` (QEMU over SSH by default;
the unit tests pass the fakes of :mod:`vmigrate.testing.fakehv`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from vmigrate.audit.log import AuditLog, check_appendable
from vmigrate.config import HostConfig, Inventory
from vmigrate.drivers.base import POSTCOPY_STATES, Driver
from vmigrate.drivers.qemu import QemuDriver
from vmigrate.errors import (
    ConflictError,
    HostError,
    StoreError,
    UserError,
    VmigrateError,
)
from vmigrate.hosts import HostPool, open_host
from vmigrate.lab.verifiers import lab_verifiers
from vmigrate.migration.engine import Engine
from vmigrate.migration.job import Job, Timing
from vmigrate.migration.memory import MEMORY
from vmigrate.migration.report import MigrationReport, load_report
from vmigrate.migration.state import MODES, Assessed, JobOptions, JobState, Mode
from vmigrate.migration.storage import STORAGE
from vmigrate.migration.verify import (
    ConsoleCrash,
    CopiesVerified,
    DestinationRuns,
    Verifier,
)
from vmigrate.plan.adaptive import (
    AdaptiveController,
    make_controller,
    postcopy_worth_enabling,
)
from vmigrate.plan.capabilities import MigrationSetup, plan_setup
from vmigrate.plan.decide import tier_for
from vmigrate.plan.policy import DEFAULT_POLICY, load_policies, resolve_policy
from vmigrate.plan.predict import live_start
from vmigrate.progress import ProgressFn
from vmigrate.qemu.process import VmState
from vmigrate.qemu.spec import VMSpec
from vmigrate.service.assess import AssessOptions
from vmigrate.service.hostlock import HostLocks, VmLocks, controller_id, job_lock_error
from vmigrate.service.planning import (
    DEFAULT_MAX_AGE_S,
    VmPlan,
    latest_assessment,
    make_plan,
    planning_config,
    plans_for,
    prediction_record,
)
from vmigrate.service.witness import HostOpener, write_witnesses
from vmigrate.store import JobRecord, Store
from vmigrate.store.db import NEEDS_OPERATOR, RUNNING
from vmigrate.transfer.mover import EngineMover, Mover
from vmigrate.units import parse_rate

MODE_CHOICES = ("auto", "live", "online", "cold", "warm")


class Backend(Protocol):
    """How the service reaches hosts: a driver per host, a mover between them."""

    def driver(self, cfg: HostConfig) -> Driver: ...

    def mover(self, drivers: Mapping[str, Driver]) -> Mover: ...


class QemuBackend:
    """vmigrate's own QEMU processes, over SSH (or locally), and its transfer engine."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    def driver(self, cfg: HostConfig) -> Driver:
        return QemuDriver(cfg)

    def mover(self, drivers: Mapping[str, Driver]) -> Mover:
        hosts = {n: d.host for n, d in drivers.items() if isinstance(d, QemuDriver)}
        return EngineMover(self.inventory, hosts)


@dataclass
class MigrationRequest:
    """What ``vmigrate migrate`` was asked for, before validation."""

    vm: str
    dest: str
    mode: str = "live"
    policy: str = DEFAULT_POLICY
    downtime_ms: int | None = None
    #: bytes/s (100M) or bits (800mbit); also each disk's cap in cold/warm
    bandwidth: str | None = None
    parallel: int | None = None
    compress: str | None = None
    #: seconds before the policy's timeout action
    timeout: float | None = None
    tls: bool = True
    #: live/online without TLS: the operator accepts an open migration port and NBD export
    insecure: bool = False
    target_storage: str | None = None
    target_format: str | None = None
    delete_source: bool = False
    shutdown_timeout: float = 60.0
    force: bool = True
    #: warm: HH:MM (today, local time), +SECONDS, or epoch seconds
    cutover: str | None = None


@dataclass(frozen=True)
class Recovery:
    """What ``job recover`` did for one job."""

    job: str
    vm: str
    phase: str
    outcome: str  # completed | failed | cancelled | needs-operator | skipped
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"job": self.job, "vm": self.vm, "phase": self.phase, "outcome": self.outcome,
                "detail": self.detail}


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def parse_cutover(text: str, *, now: float | None = None) -> float:
    """``HH:MM`` (today, local time), ``+SECONDS`` or epoch seconds -> epoch seconds.
    Raises :class:`UserError` for anything else, or a time that is not finite."""
    t = text.strip()
    now = time.time() if now is None else now
    bad = UserError(f"invalid --cutover {text!r}: use HH:MM, +SECONDS or an epoch time")
    try:
        if t.startswith("+"):
            value = now + float(t[1:])
        elif ":" in t:
            hh, mm = t.split(":", 1)
            if not (hh.isdigit() and mm.isdigit() and int(hh) < 24 and int(mm) < 60):
                raise bad
            when = dt.datetime.fromtimestamp(now).replace(hour=int(hh), minute=int(mm),
                                                          second=0, microsecond=0)
            value = when.timestamp()
        else:
            value = float(t)
    except ValueError:
        raise bad from None
    if not math.isfinite(value) or value < 0 or value > now + 366 * 86400:
        raise bad
    return value


def controller_alive(job: JobRecord) -> bool:
    """Whether the process that ran the job still runs (and is a vmigrate process)."""
    if not job.controller_pid:
        return False
    try:
        with open(f"/proc/{job.controller_pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return False
    return b"vmigrate" in cmdline and job.controller_pid != os.getpid()


class MigrationService:
    """Builds migration jobs from requests and runs them (see the module doc)."""

    def __init__(self, inventory: Inventory, store: Store, audit: AuditLog, *,
                 backend: Backend | None = None, timing: Timing | None = None,
                 progress: ProgressFn | None = None, locks: VmLocks | None = None,
                 witness_hosts: HostOpener | None = None) -> None:
        """``locks``: the VM locks on the hosts a job takes besides the store's. By
        default, with the QEMU backend, the lock files on the inventory's hosts for
        the controller whose id is kept next to ``store``; a service given another
        backend (the fakes) takes host locks only when ``locks`` is given."""
        self.inventory = inventory
        self.store = store
        self.audit = audit
        self.backend: Backend = backend or QemuBackend(inventory)
        self.timing = timing
        self.progress = progress
        self._default_locks = locks is None and backend is None
        #: how the hosts of a job are reached to keep their audit witness: by default,
        #: with the QEMU backend, the inventory's transport; with another backend (the
        #: fakes) only when given
        self._witness_hosts = witness_hosts if witness_hosts is not None else (
            open_host if backend is None else None)
        self._locks = locks

    def locks(self) -> VmLocks | None:
        """The host locks (see ``__init__``), opened on first use."""
        if self._locks is None and self._default_locks:
            self._locks = HostLocks(self.store, controller_id(self.store.path.parent),
                                    HostPool(self.inventory), own_pool=True)
        return self._locks

    async def aclose(self) -> None:
        """Close the host sessions the locks opened (each public call closes them
        before it returns; they open again on the next)."""
        if self._locks is not None:
            await self._locks.aclose()

    # -- locks -----------------------------------------------------------------------

    def check_unlocked(self, vm: str) -> None:
        """:class:`ConflictError` naming the job if one of ours locks ``vm``."""
        job = self.store.locking_job(vm)
        if job is not None:
            raise job_lock_error(vm, job)

    async def _take_locks(self, job: str, vm: str, hosts: list[str]) -> None:
        locks = self.locks()
        if locks is None:
            return
        try:
            await locks.acquire(job, vm, hosts)
        except BaseException:
            await self.aclose()
            raise

    async def _release_locks(self, state: JobState, report: MigrationReport) -> None:
        """Release the host locks of a job that ended (a job still running or waiting
        for an operator keeps them); what cannot be released is noted in the stored
        report."""
        locks = self.locks()
        if locks is None:
            return
        job = self.store.find_job(state.job)
        if job is not None and job.locks_vm:
            return
        failed = await locks.release(state.job, state.vm, [state.source, state.dest])
        if failed and job is not None:
            report.cleanup_errors.extend(failed)
            self.store.save_report(job.id, report.model_dump(mode="json"))

    # -- validation ------------------------------------------------------------------

    def options(self, req: MigrationRequest, mode: str | None = None) -> JobOptions:
        """Every field of ``req`` checked (``mode`` overrides ``req.mode``, e.g. the
        mode ``auto`` chose). Raises :class:`UserError` naming the field; reads the
        inventory and the store only."""
        mode = mode or req.mode
        if mode not in MODE_CHOICES:
            raise UserError(f"unknown --mode {mode!r}: use {', '.join(MODE_CHOICES)}")
        if mode == "live" and (req.target_storage or req.target_format or req.delete_source):
            raise UserError("--target-storage, --target-format and --delete-source need "
                            "--mode online, cold or warm")
        if req.cutover is not None and mode not in ("warm", "auto"):
            raise UserError("--cutover needs --mode warm (or auto, if it picks warm)")
        if mode in ("cold", "warm") and (req.parallel is not None or req.compress):
            raise UserError("--parallel and --compress shape the memory stream of live and "
                            "online migration; cold and warm copy disks on their own engine")
        if req.target_format not in (None, "raw", "qcow2"):
            raise UserError(f"unknown --target-format {req.target_format!r}: use raw or qcow2")
        if req.compress not in (None, "zstd", "xbzrle"):
            raise UserError(f"unknown --compress {req.compress!r}: use zstd or xbzrle")
        if not math.isfinite(req.shutdown_timeout) or req.shutdown_timeout <= 0:
            raise UserError(f"--shutdown-timeout {req.shutdown_timeout}: must be a positive "
                            "number of seconds")
        policy = resolve_policy(req.policy, load_policies(self.inventory.policies))
        if req.timeout is not None:
            if not math.isfinite(req.timeout) or req.timeout <= 0:
                raise UserError(f"--timeout {req.timeout}: must be a positive number of seconds")
            policy = policy.model_copy(update={"timeout_s": req.timeout})
        bandwidth = parse_rate(req.bandwidth, what="--bandwidth") if req.bandwidth else None
        cutover = parse_cutover(req.cutover) if req.cutover is not None else None
        record = self.store.get_vm(req.vm)
        self.inventory.host(req.dest)
        self.check_unlocked(req.vm)
        if record.host == req.dest:
            raise UserError(f"VM {req.vm} already runs on {req.dest}")
        try:
            opts = JobOptions(
                mode="live" if mode == "auto" else mode,  # type: ignore[arg-type]
                policy=policy, downtime_ms=req.downtime_ms, bandwidth=bandwidth,
                parallel=req.parallel, compress=req.compress,  # type: ignore[arg-type]
                tls=req.tls, insecure=req.insecure, target_storage=req.target_storage,
                target_format=req.target_format,  # type: ignore[arg-type]
                delete_source=req.delete_source, shutdown_timeout=req.shutdown_timeout,
                force=req.force, cutover_at=cutover)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise UserError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
                            ) from exc
        if mode in ("live", "online", "auto"):
            tier = tier_for(req.vm, planning_config(self.inventory))
            if tier is not None:
                opts = opts.model_copy(update={
                    "tier": tier.name, "tier_max_downtime_ms": tier.max_downtime_ms,
                    "postcopy_allowed": tier.postcopy})
            # refuse what QEMU cannot do before any job exists (checked again in begin
            # against the source's real QEMU version)
            setup = plan_setup(opts.memory_options())
            if self.inventory.host(req.dest).migration_address is None:
                raise UserError(f"host {req.dest} has no migration_address in the inventory")
            if opts.policy.adaptive and mode != "auto":
                opts = self._assessed(req, opts, setup)
        return opts

    def _assessed(self, req: MigrationRequest, opts: JobOptions,
                  setup: MigrationSetup) -> JobOptions:
        """An adaptive policy's starting point from the latest assessment of the route;
        :class:`ConflictError` when the models find no path within the limits (the
        downtime limit, the tier's rules) for what it measured."""
        a = latest_assessment(self.store, req.vm, req.dest, max_age=DEFAULT_MAX_AGE_S)
        start = live_start(a) if a is not None else None
        if a is None or start is None:
            return opts
        controller = make_controller(opts.memory_options(), setup, start=start,
                                     wss=start.wss, bandwidth=start.bandwidth)
        assert isinstance(controller, AdaptiveController)
        refusal = controller.refusal
        if refusal is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.at))
            tier = f" (tier {opts.tier})" if opts.tier else ""
            raise ConflictError(
                f"policy {opts.policy.name}{tier} refuses to migrate {req.vm}: {refusal}, "
                f"for what the assessment of {when} measured (dirty rate "
                f"{a.dirty_rate / 2**20:.1f} MiB/s, link {start.bandwidth / 2**20:.1f} "
                "MiB/s). Reassess if the guest changed, or choose a fixed policy "
                "(--policy) or a tier that allows more")
        update: dict[str, Any] = {"assessed": Assessed(
            first_pass=start.remaining, dirty_rate=start.dirty_rate, wss=start.wss,
            bandwidth=start.bandwidth, at=a.at, link=start.link)}
        if opts.postcopy_allowed and not postcopy_worth_enabling(start, controller.path):
            update.update(postcopy_allowed=False, postcopy_unneeded=True)
        return opts.model_copy(update=update)

    # -- the mode and its prediction -------------------------------------------------

    async def choose(self, req: MigrationRequest, *, max_age: float = DEFAULT_MAX_AGE_S,
                     assess: AssessOptions | None = None
                     ) -> tuple[Mode, dict[str, Any] | None, VmPlan | None]:
        """The mode to run and the prediction the report keeps. ``auto`` assesses (or
        reuses an assessment younger than ``max_age``) and takes the decision
        matrix's choice (:class:`ConflictError` when no mode is usable); an explicit
        mode is predicted only from an assessment already stored (no delay)."""
        opts = self.options(req)  # a wrong request fails before any measuring
        mopts = opts.memory_options()
        if req.mode == "auto":
            locks = self.locks()
            if locks is not None:  # refuse before measuring a VM another job moves
                try:
                    await locks.check(req.vm, [self.store.get_vm(req.vm).host, req.dest])
                finally:
                    await self.aclose()
            vp = (await plans_for(self.inventory, self.store, [req.vm], req.dest, mopts,
                                  max_age, assess or AssessOptions(), opts.shutdown_timeout,
                                  progress=self.progress))[0]
            chosen = vp.decision.chosen
            if chosen is None:
                raise ConflictError(f"no usable migration mode for {req.vm}: "
                                    + " ".join(vp.decision.explanation))
            self.options(req, chosen)  # the options hold for the mode it chose
            return chosen, prediction_record(vp, chosen, chosen_by="auto"), vp
        mode: Mode = req.mode  # type: ignore[assignment]
        a = latest_assessment(self.store, req.vm, req.dest, max_age=max_age)
        if a is None:
            return mode, None, None
        vp = make_plan(self.inventory, self.store, a, mopts,
                       shutdown_timeout=opts.shutdown_timeout)
        if not vp.predictions[mode].feasible:
            return mode, None, vp
        return mode, prediction_record(vp, mode, chosen_by="operator"), vp

    # -- one migration ---------------------------------------------------------------

    def verifiers(self, spec: VMSpec) -> list[Verifier]:
        """The verifiers a migration of ``spec`` runs, in order."""
        return [CopiesVerified(), DestinationRuns(), *lab_verifiers(self.inventory, spec),
                ConsoleCrash()]

    async def migrate(self, req: MigrationRequest, *, mode: Mode | None = None,
                      prediction: dict[str, Any] | None = None,
                      on_job: Callable[[str], None] | None = None) -> MigrationReport:
        """Validate, create the job (the VM is locked from here on), run it; return the
        report (stored with the job) for every outcome. Raises before the job exists
        for a wrong request (:class:`UserError`), a VM locked by another job
        (:class:`ConflictError`) or an audit log that cannot be appended to
        (:class:`StoreError`). ``on_job(job_id)`` is called once the job exists."""
        opts = self.options(req, mode)
        record = self.store.get_vm(req.vm)
        spec = VMSpec.model_validate_json(record.spec_json)
        check_appendable(self.audit.path)  # never start a job on a log it cannot write
        job_id = new_job_id()
        memory, storage = MODES[opts.mode]
        state = JobState(job=job_id, vm=req.vm, mode=opts.mode, memory=memory,
                         storage=storage, source=record.host, dest=req.dest, options=opts,
                         spec=spec, dest_spec=spec)
        report = MigrationReport(
            job=job_id, vm=req.vm, mode=opts.mode, memory_strategy=memory,
            storage_strategy=storage, source=record.host, dest=req.dest,
            options=_options_dict(opts), tls=opts.tls and memory == "precopy",
            stream_security=("tls" if opts.tls else "none") if memory == "precopy"
            else opts.cipher, prediction=prediction)
        self.store.create_job(job_id, req.vm, opts.mode, record.host, req.dest,
                              report.options, pid=os.getpid(), state=state.model_dump_json())
        # the hosts' locks, before the first side effect: another controller's job on
        # the VM refuses this one here, and it is forgotten as if never asked for
        refused: HostError | None = None
        try:
            await self._take_locks(job_id, req.vm, [record.host, req.dest])
        except HostError as exc:
            # a host that cannot be reached (or whose key changed) to lock the VM there:
            # the job fails in begin like any unreachable host, with its report and
            # audit records, and nothing started (the locks taken were given back)
            refused = exc
        except BaseException:
            self.store.discard_job(job_id)
            raise
        if on_job is not None:
            on_job(job_id)
        return await self._run(state, report, lambda engine: engine.run(refused=refused))

    async def _witness(self, state: JobState, report: MigrationReport) -> None:
        """Give the job's hosts the witness of the audit log's head after it (see
        :mod:`vmigrate.service.witness`); where they keep it, and any host that could
        not, go into the stored report. Never raises for a host (the job's outcome
        stands)."""
        head = report.audit_head
        if self._witness_hosts is None or head is None or head.key is None:
            return
        written, failed = await write_witnesses(
            self.inventory, [state.source, state.dest], job=state.job, seq=head.seq,
            hash=head.hash, key=head.key, records=self.audit.job_records(state.job),
            opener=self._witness_hosts)
        report.audit_witnesses = sorted(set(report.audit_witnesses) | set(written))
        report.cleanup_errors.extend(f for f in failed if f not in report.cleanup_errors)
        with contextlib.suppress(StoreError):  # the report stored at the job's end stands
            self.store.save_report(state.job, report.model_dump(mode="json"))

    async def _run(self, state: JobState, report: MigrationReport,
                   go: Callable[[Engine], Awaitable[MigrationReport]]) -> MigrationReport:
        src_cfg = self.inventory.host(state.source)
        dst_cfg = self.inventory.host(state.dest)
        drivers = {src_cfg.name: self.backend.driver(src_cfg),
                   dst_cfg.name: self.backend.driver(dst_cfg)}
        mover = self.backend.mover(drivers)
        try:
            job = Job(state=state, report=report, store=self.store, audit=self.audit,
                      src=drivers[src_cfg.name], dst=drivers[dst_cfg.name], mover=mover,
                      verifiers=self.verifiers(state.spec), timing=self.timing,
                      progress=self.progress)
            engine = Engine(job, MEMORY[state.memory](), STORAGE[state.storage]())
            out = await go(engine)
            await self._witness(state, out)
            return out
        finally:
            with contextlib.suppress(Exception):
                await mover.close()
            for d in drivers.values():
                with contextlib.suppress(Exception):
                    await d.close()
            with contextlib.suppress(Exception):
                await self._release_locks(state, report)
            with contextlib.suppress(Exception):
                await self.aclose()

    # -- recovery --------------------------------------------------------------------

    def recoverable(self) -> list[JobRecord]:
        """Jobs ``job recover`` settles by default: running with a dead controller, or
        waiting for an operator."""
        return [j for j in self.store.list_jobs()
                if (j.status == RUNNING and not controller_alive(j))
                or j.status == NEEDS_OPERATOR]

    async def recover(self, jobs: list[JobRecord], *, force: bool = False) -> list[Recovery]:
        """Settle each job; a job that cannot be loaded or settled is named in the
        result (``skipped``) and the others go on."""
        done = []
        for j in jobs:
            try:
                done.append(await self._recover_one(j, force=force))
            except ConflictError as exc:
                done.append(Recovery(j.id, j.vm, j.phase, "skipped", str(exc)))
            except (StoreError, ValidationError, ValueError) as exc:
                done.append(Recovery(j.id, j.vm, j.phase, "skipped",
                                     f"cannot load the job's state: {exc}"))
            except VmigrateError as exc:
                done.append(Recovery(j.id, j.vm, j.phase, "skipped", str(exc)))
        return done

    async def _recover_one(self, j: JobRecord, *, force: bool) -> Recovery:
        if not j.locks_vm:
            raise ConflictError(f"job {j.id} is {j.status}: nothing to recover")
        if j.status == RUNNING and controller_alive(j) and not force:
            raise ConflictError(f"job {j.id} is still run by process {j.controller_pid}; "
                                "cancel it with 'vmigrate job cancel' instead")
        if j.state is None:
            raise StoreError(f"job {j.id} was started by an older vmigrate and has no saved "
                             "state; look at both hosts and settle it by hand")
        state = JobState.model_validate_json(j.state)
        report = load_report(j.report) if j.report else MigrationReport(
            job=j.id, vm=j.vm, mode=j.mode, memory_strategy=state.memory,
            storage_strategy=state.storage, source=j.source, dest=j.dest,
            options=_options_dict(state.options))
        why = ("the controller died" if j.status == RUNNING else
               "an operator asked to settle it")
        phase = state.phase.value
        # the job holds the hosts' locks: taken again where they are missing (a
        # rollback removed a runtime directory); held by another controller: skipped
        await self._take_locks(j.id, j.vm, [j.source, j.dest])
        if j.status == NEEDS_OPERATOR:
            self.store.reopen_job(j.id, os.getpid())
        else:
            self.store.set_controller(j.id, os.getpid())
        out = await self._run(state, report, lambda engine: engine.recover(why))
        return Recovery(j.id, j.vm, phase, out.status,
                        out.error or "; ".join(out.notes) or "settled")


    async def resolve(self, j: JobRecord, keep: Literal["destination", "source"]
                      ) -> Recovery:
        """An operator's decision for a job waiting for one (see
        :meth:`~vmigrate.migration.engine.Engine.resolve`). First it asks both hosts
        what runs where (:func:`check_resolvable`): a decision that would lose the
        guest, or that cannot be checked, raises :class:`ConflictError` and changes
        nothing (the job still waits, the VM stays locked)."""
        if j.status != NEEDS_OPERATOR:
            raise ConflictError(f"job {j.id} is {j.status}: only a job waiting for an operator "
                                "is resolved by hand ('job cancel' a running one, 'job "
                                "recover' one whose controller died)")
        if j.state is None:
            raise StoreError(f"job {j.id} has no saved state; settle it by hand")
        state = JobState.model_validate_json(j.state)
        report = load_report(j.report) if j.report else MigrationReport(
            job=j.id, vm=j.vm, mode=j.mode, source=j.source, dest=j.dest)
        await self._take_locks(j.id, j.vm, [j.source, j.dest])
        found = ""

        async def go(engine: Engine) -> MigrationReport:
            nonlocal found
            found = await check_resolvable(engine.job, keep)
            self.store.reopen_job(j.id, os.getpid())
            return await engine.resolve(keep)

        out = await self._run(state, report, go)
        return Recovery(j.id, j.vm, state.phase.value, out.status,
                        "; ".join([f"found {found}", *out.notes]))


async def check_resolvable(job: Job, keep: Literal["destination", "source"]) -> str:
    """What runs where, before an operator's decision acts; :class:`ConflictError`
    (nothing changed) when the decision would lose the guest or cannot be checked:

    * either host does not answer (its VM's state is unknown);
    * ``destination``: no QEMU of the guest there, or one still waiting for the
      incoming migration; or a post-copy not finished (the source still holds
      pages the guest needs: ``job recover`` finishes it);
    * ``source``: no QEMU of the guest there and one of its disks missing (it could
      not boot again once the destination is stopped).

    Returns what it found, for the report."""
    st = job.state
    src = await job.src.vm_state(job.vm)
    dst = await job.dst.vm_state(job.vm)
    found = f"{job.src.name}: {src.value}, {job.dst.name}: {dst.value}"
    refuse = f"refused to keep the guest on the {keep} ({found}): "
    if VmState.UNKNOWN in (src, dst):
        raise ConflictError(refuse + "a host or a monitor does not answer, so what runs "
                            "where cannot be checked; try again once both answer")
    if keep == "destination":
        if dst in (VmState.STOPPED, VmState.INMIGRATE):
            raise ConflictError(refuse + f"{job.dst.name} has no complete guest to keep"
                                + ("" if dst == VmState.STOPPED else
                                   " (its QEMU still waits for the migration)"))
        if st.memory == "precopy" and src != VmState.STOPPED:
            try:
                status = (await job.src_monitor().migration()).status
            except VmigrateError as exc:
                raise ConflictError(refuse + f"{job.src.name} does not tell whether a "
                                    f"post-copy still needs it ({exc})") from exc
            if status in POSTCOPY_STATES:
                raise ConflictError(refuse + f"post-copy has not finished ({status}): "
                                    f"{job.src.name} still holds pages the guest needs; "
                                    f"'vmigrate job recover {job.id}' finishes it")
    elif src == VmState.STOPPED:
        missing = await job.src.missing([d.path for d in st.spec.disks])
        if missing:
            raise ConflictError(refuse + f"no QEMU of the guest runs on {job.src.name} and "
                                f"its disks are missing there ({', '.join(missing)}): it "
                                "could not boot again")
    return found


def _options_dict(opts: JobOptions) -> dict[str, Any]:
    data = opts.model_dump(mode="json", exclude={"policy"})
    data["policy"] = opts.policy.name
    return data
