"""The migration engine, every mode, through the fake hypervisor cluster.

No root, no QEMU, no network: the service, the engine, its strategies and its
generic verifiers run for real against :mod:`vmigrate.testing.fakehv`. The fault
table injects one fault (a refused command, a lost monitor connection, an
unreachable host, a cancel, a controller crash followed by ``job recover``) at
the first call of every phase of every mode, and in post-copy, and asserts the
end state on both fake hosts and in the store:

* before the point of no return: the source runs, the destination is clean
  (no VM process, no target image under its final name), the job is
  failed or cancelled and the VM unlocked;
* after it: the destination runs, the source is stopped, the job completed;
* or ``needs-operator`` with nothing destroyed and the VM still locked.

In every case no guest ran on both hosts at once and every write the guest
acknowledged is on the disk it uses.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmigrate.audit.log import AuditLog, read, verify
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import ConflictError, StoreError
from vmigrate.migration.job import Timing
from vmigrate.migration.report import MigrationReport
from vmigrate.qemu.spec import DiskSpec, NicSpec, VMSpec
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.store import Store
from vmigrate.testing.fakehv import ControllerCrash, FakeCluster, Fault
from vmigrate.transfer.mover import PARTIAL_SUFFIX

MiB = 1 << 20
VM = "vm1"
LOCAL = "/var/lib/vmigrate/images"
SHARED = "/srv/shared"
FAST = Timing(sample_s=0, poll_s=0, forward_retry_s=0, mirror_sample_s=0, round_pause_s=0,
              cancel_grace_s=0.05, cancel_wait_s=2, dest_run_wait_s=2, boot_wait_s=1,
              ping_wait_s=0.1, memcheck_wait_s=0.1, handover_timeout_s=5)
MODES = ("live", "online", "cold", "warm")
PHASES = ("begin", "prepare", "perform", "finish", "confirm")


def host(n: int) -> HostConfig:
    return HostConfig(name=f"h{n}", address=f"10.240.1.1{n}", data_dir=Path("/var/lib/vmigrate"),
                      migration_address=f"10.241.1.1{n}",
                      pools={"local": Path(LOCAL), "shared": Path(SHARED)})




@dataclass
class World:
    """Two fake hosts, a store, an audit log and the service, for one test."""

    tmp: Path
    mode: str
    dirty_rate: float = 0.0
    policy: str = "balanced"
    inventory: Inventory = field(init=False)
    cluster: FakeCluster = field(init=False)
    store: Store = field(init=False)
    audit: AuditLog = field(init=False)
    spec: VMSpec = field(init=False)

    def __post_init__(self) -> None:
        self.inventory = Inventory(hosts={"h1": host(1), "h2": host(2)})
        self.cluster = FakeCluster(self.inventory)
        self.store = Store(self.tmp / "vmigrate.db")
        self.audit = AuditLog(self.tmp / "audit.jsonl")
        disk = f"{SHARED}/{VM}.raw" if self.mode == "live" else f"{LOCAL}/{VM}.raw"
        self.spec = VMSpec(name=VM, memory_mib=256, disks=(DiskSpec(path=disk),),
                           nics=(NicSpec(bridge="br0", mac="52:54:00:12:34:56"),))
        self.store.add_vm(VM, "h1", self.spec.model_dump_json())
        self.cluster.add_vm("h1", self.spec, ram=256 * MiB, dirty_rate=self.dirty_rate)

    def service(self) -> MigrationService:
        return MigrationService(self.inventory, self.store, self.audit,
                                backend=self.cluster.backend(), timing=FAST)

    def request(self, **kw: Any) -> MigrationRequest:
        # the fake guest powers off within a few calls: no need to wait a minute for it
        kw.setdefault("shutdown_timeout", 0.5)
        return MigrationRequest(vm=VM, dest="h2", mode=self.mode, policy=self.policy, **kw)

    def job(self) -> Any:
        jobs = self.store.list_jobs(vm=VM)
        return jobs[-1] if jobs else None

    def phase(self) -> str | None:
        j = self.job()
        return j.phase if j is not None and j.active else None

    async def migrate(self, **kw: Any) -> MigrationReport:
        return await self.service().migrate(self.request(**kw))

    async def recover(self) -> list[Any]:
        self.cluster.restart_controller()
        svc = self.service()
        return await svc.recover(svc.recoverable())

    # -- what the hosts hold

    def runs_on(self, name: str) -> bool:
        vm = self.cluster.host(name).vms.get(VM)
        return vm is not None and vm.run_state == "running"

    def has_process(self, name: str) -> bool:
        return VM in self.cluster.host(name).vms

    def targets(self) -> list[str]:
        return [p for p in self.cluster.host("h2").files
                if p.startswith(f"{LOCAL}/{VM}-disk") and not p.endswith(PARTIAL_SUFFIX)
                and not p.endswith(".journal")]


def assert_consistent(w: World, *, allow_operator: bool = False) -> str:
    """The end state of the job is one of the three the engine promises (see the module
    doc); returns the job's status."""
    job = w.job()
    assert job is not None and not job.active, job
    status = job.status
    assert w.cluster.split_brain == []
    record = w.store.get_vm(VM)
    if status == "completed":
        assert record.host == "h2"
        assert w.runs_on("h2") and not w.has_process("h1"), (w.cluster.host("h1").vms,
                                                             w.cluster.host("h2").vms)
        assert not job.locks_vm
    elif status in ("failed", "cancelled"):
        assert record.host == "h1"
        assert w.runs_on("h1"), w.cluster.host("h1").vms
        assert not w.has_process("h2")
        assert w.targets() == [], w.targets()
        assert not job.locks_vm
    else:
        assert status == "needs-operator", status
        assert allow_operator, job.error
        assert job.locks_vm
        assert w.has_process("h1") or w.has_process("h2")
    assert w.cluster.lost_writes(VM) == [], w.cluster.lost_writes(VM)
    assert verify(w.audit.path).ok
    return status


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the store and the audit log fsync every
    write, which on a disk costs more than the whole fake migration."""
    root = Path("/dev/shm")
    if not root.is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="vmigrate-test-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- without faults ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_mode_completes(tmp_path: Path, mode: str) -> None:
    w = World(tmp_path, mode)
    report = await w.migrate()
    assert report.status == "completed", (report.error, report.cleanup_errors)
    assert assert_consistent(w) == "completed"
    assert report.memory_strategy == {"live": "precopy", "online": "precopy"}.get(
        mode, "offline")
    assert (report.memory is None) == (mode in ("cold", "warm"))
    assert bool(report.disks) == (mode != "live")
    assert report.verification.dest_running is True and report.announced
    # everything on the wire: the memory stream and every disk
    memory = report.memory.bytes if report.memory else 0
    assert report.bytes_transferred == memory + sum(d.wire_bytes for d in report.disks) > 0
    job = w.job()
    assert job.phase == "confirm" and job.report["v"] == 2


# -- the fault table -----------------------------------------------------------------------

KINDS = ("command", "connection", "unreachable", "cancel", "crash")


def _cases() -> list[tuple[str, str, str]]:
    out = []
    for mode in MODES:
        phases = PHASES + (("postcopy",) if mode in ("live", "online") else ())
        for phase in phases:
            if (mode, phase) == ("cold", "prepare"):
                continue  # cold allocates nothing on a host in prepare: no call to hit
            for kind in KINDS:
                out.append((mode, phase, kind))
    return out


def _pnr(w: World) -> bool:
    job = w.job()
    return bool(job is not None and job.state and '"pnr":true' in job.state)


def inject(w: World, kind: str, phase: str, *, skip: int = 0) -> Fault:
    if phase == "postcopy":
        def when() -> bool:
            return w.phase() == "perform" and _pnr(w)
    else:
        def when() -> bool:
            return w.phase() == phase

    def cancel() -> None:
        w.store.request_cancel(w.job().id)

    fault = Fault(kind, when=when, skip=skip,  # type: ignore[arg-type]
                  on_cancel=cancel if kind == "cancel" else None)
    w.cluster.inject(fault)
    return fault


async def run_with(w: World) -> tuple[bool, MigrationReport | None]:
    """Migrate; a controller crash is followed by ``job recover``. (crashed, report)"""
    try:
        return False, await w.migrate()
    except ControllerCrash:
        job = w.job()
        assert job is not None and job.active  # left behind, as a SIGKILL leaves it
        done = await w.recover()
        assert [r.job for r in done] == [job.id] and done[0].outcome != "skipped", done
        return True, None


def expected(mode: str, phase: str, kind: str) -> str:
    """The end state a fault at the first call of ``phase`` must lead to."""
    if phase in ("postcopy", "confirm"):
        return "completed"  # past the point of no return: finish forward
    if phase == "finish":
        if mode in ("live", "online"):
            return "completed"  # QEMU completed: the destination takes the guest
        # cold/warm: the destination has not started; a cancel asked at this very
        # moment is seen once it runs
        return "completed" if kind == "cancel" else "failed"
    return "cancelled" if kind == "cancel" else "failed"


@pytest.mark.parametrize(("mode", "phase", "kind"), _cases())
async def test_fault_table(shm: Path, mode: str, phase: str, kind: str) -> None:
    postcopy = phase == "postcopy"
    w = World(shm, mode, dirty_rate=200 * MiB if postcopy else 0.0,
              policy="postcopy" if postcopy else "balanced")
    fault = inject(w, kind, phase)
    crashed, report = await run_with(w)
    assert fault.fired == 1, "the fault never struck"
    assert crashed == (kind == "crash")
    assert assert_consistent(w) == expected(mode, phase, kind), w.job().error
    if postcopy:
        assert w.job().report["memory"]["postcopy"] is True
    if kind == "cancel" and expected(mode, phase, kind) == "completed" and phase != "confirm":
        assert report is not None and any("point of no return" in n for n in report.notes)


# -- every call, one fault ------------------------------------------------------------------

SCENARIOS = {  # name: (mode, dirty rate, policy)
    "live": ("live", 0.0, "balanced"),
    "live-postcopy": ("live", 200 * MiB, "postcopy"),
    "online": ("online", 0.0, "balanced"),
    "online-postcopy": ("online", 200 * MiB, "postcopy"),
    "cold": ("cold", 0.0, "balanced"),
    "warm": ("warm", 0.0, "balanced"),
}
SWEEP = {  # name: fault fields (an unreachable host raises what a lost connection does:
    # the table has it at every phase)
    "command": {"kind": "command"},
    "lost": {"kind": "connection"},
    "reply-lost": {"kind": "connection", "after": True},
    "reply-late": {"kind": "timeout", "after": True},
    "crash": {"kind": "crash"},
    "cancel": {"kind": "cancel"},
}


@pytest.mark.parametrize("fault_name", sorted(SWEEP))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_one_fault_at_every_call(shm: Path, scenario: str, fault_name: str) -> None:
    """The fault strikes the n-th call of the migration, for every n: whatever the call,
    the end state is one of the three the engine promises, and a single transient fault
    never leaves the job to an operator."""
    mode, dirty, policy = SCENARIOS[scenario]

    def world(name: str) -> World:
        (shm / name).mkdir()
        return World(shm / name, mode, dirty_rate=dirty, policy=policy)

    clean = world("clean")
    await clean.migrate()
    problems = []
    for n in range(len(clean.cluster.calls)):
        w = world(str(n))
        fault = Fault(skip=n, **SWEEP[fault_name])  # type: ignore[arg-type]
        if fault.kind == "cancel":
            fault.on_cancel = lambda w=w: w.store.request_cancel(w.job().id)
        w.cluster.inject(fault)
        try:
            await run_with(w)
            assert_consistent(w)
            assert fault.fired == 1, "the fault never struck"
        except AssertionError as exc:
            problems.append(f"call {n} ({clean.cluster.calls[n]}): {str(exc)[:300]}")
    assert not problems, "\n".join(problems)


# -- the audit log never wedges a job -------------------------------------------------------


class FlakyAudit(AuditLog):
    """An audit log whose n-th append fails as a full disk or a torn tail would."""

    def __init__(self, path: Path, fail_at: int) -> None:
        super().__init__(path)
        self.fail_at = fail_at
        self.appends = 0

    def append(self, event: str, data: Mapping[str, Any], *, job: str | None = None) -> Any:
        self.appends += 1
        if self.appends == self.fail_at:
            raise StoreError(f"cannot append to audit log {self.path}: injected")
        return super().append(event, data, job=job)


@pytest.mark.parametrize("mode", ["live", "cold"])
async def test_a_failed_audit_write_never_wedges_the_job(shm: Path, mode: str) -> None:
    """Whichever append fails: before the point of no return the job fails cleanly (rolled
    back, the VM unlocked); after it the migration finishes and says what was not
    written."""
    (shm / "clean").mkdir()
    clean = World(shm / "clean", mode)
    await clean.migrate()
    appends = len(read(clean.audit.path))
    for n in range(1, appends + 1):
        (shm / str(n)).mkdir()
        w = World(shm / str(n), mode)
        w.audit = FlakyAudit(w.audit.path, n)
        report = await w.migrate()
        status = assert_consistent(w)
        assert status in ("failed", "completed"), (n, status)
        if status == "completed":  # the report says what the audit log lacks
            said = report.cleanup_errors + report.notes
            assert any("injected" in e for e in said), (n, report)
        assert not w.job().locks_vm


async def test_job_recover_names_a_job_it_cannot_load_and_goes_on(shm: Path) -> None:
    w = World(shm, "live")
    w.cluster.inject(Fault("crash", call="migrate"))
    crashed, _ = await run_with_crash_only(w)
    assert crashed
    # two more abandoned jobs of other VMs: one of an older vmigrate (no saved state), one
    # whose state is unreadable
    w.store.create_job("old1", "vmold", "live", "h1", "h2", {}, pid=None)
    w.store.create_job("bad1", "vmbad", "live", "h1", "h2", {}, pid=None, state="{nope")
    done = {r.job: r for r in await w.recover()}
    assert done["old1"].outcome == done["bad1"].outcome == "skipped"
    assert "older vmigrate" in done["old1"].detail
    mine = w.job()
    assert done[mine.id].outcome == "failed"  # crashed before QEMU began: rolled back
    assert assert_consistent(w) == "failed"
    assert w.store.get_job("old1").active  # left as it was, for an operator


async def run_with_crash_only(w: World) -> tuple[bool, MigrationReport | None]:
    try:
        return False, await w.migrate()
    except ControllerCrash:
        return True, None


# -- an operator settles what vmigrate cannot -------------------------------------------


async def _needs_operator(w: World) -> Any:
    """A live migration whose destination guest is found paused after the switch."""
    def pause_it() -> None:
        w.cluster.host("h2").vms[VM].run_state = "paused"

    w.cluster.inject(Fault("cancel", host="h2", call="vm_state", on_cancel=pause_it,
                           when=lambda: w.phase() == "finish" and _pnr(w)))
    report = await w.migrate()
    assert report.status == "needs-operator", report.error
    job = w.job()
    assert job.locks_vm and w.has_process("h1") and w.has_process("h2")
    return job


@pytest.mark.parametrize("keep", ["destination", "source"])
async def test_an_operator_resolves_a_job_waiting_for_them(shm: Path, keep: str) -> None:
    w = World(shm, "live")
    job = await _needs_operator(w)
    with pytest.raises(ConflictError):  # the VM stays locked meanwhile
        await w.service().migrate(MigrationRequest(vm=VM, dest="h1", mode="live"))
    done = await w.service().resolve(w.store.get_job(job.id), keep)  # type: ignore[arg-type]
    job = w.store.get_job(job.id)
    assert not job.locks_vm and w.cluster.split_brain == []
    if keep == "destination":
        assert (done.outcome, w.store.get_vm(VM).host) == ("completed", "h2")
        assert w.has_process("h2") and not w.has_process("h1")
    else:
        assert (done.outcome, w.store.get_vm(VM).host) == ("failed", "h1")
        assert w.runs_on("h1") and not w.has_process("h2")
    with pytest.raises(ConflictError):  # only a job waiting for an operator
        await w.service().resolve(job, "destination")


# -- a full destination ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cold", "warm"])
async def test_a_full_destination_has_its_own_exit_status(tmp_path: Path, mode: str) -> None:
    """The copy runs out of space on the destination: the job fails and rolls back (the
    guest runs on at the source), and its report carries exit status 8, not 1."""
    w = World(tmp_path, mode)
    w.cluster.inject(Fault("full", call="copy", side="mover"))
    report = await w.migrate()
    assert report.status == "failed", report.error
    assert report.exit_status == 8
    assert "No space left" in (report.error or "")
    assert w.runs_on("h1") and not w.has_process("h2")
    assert assert_consistent(w) == "failed"
