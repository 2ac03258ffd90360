"""VM locks that hold: the store's job lock on VM commands, the lock file on the hosts,
the controller's id, and the operator's decision checked against what runs where.

The lock files are real: the hosts are local-transport inventory hosts whose data
directories live under the test's temporary directory (no root, no SSH). The
migrations run through the fake hypervisor cluster, as in ``test_engine``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from vmigrate.audit.log import AuditLog
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import ConflictError, NotFoundError, StoreError, UserError
from vmigrate.hosts import HostPool
from vmigrate.migration.job import Timing
from vmigrate.qemu.spec import DiskSpec, VMSpec
from vmigrate.service.hostlock import (
    HostLocks,
    LockInfo,
    VmLockedError,
    controller_id,
    lock_path,
    parse_lock,
)
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.vms import CreateRequest, VmService
from vmigrate.store import Store
from vmigrate.testing.fakehv import FakeCluster, Fault

MiB = 1 << 20
VM = "vm1"
FAST = Timing(sample_s=0, poll_s=0, forward_retry_s=0, mirror_sample_s=0, round_pause_s=0,
              cancel_grace_s=0.05, cancel_wait_s=2, dest_run_wait_s=2, boot_wait_s=1,
              ping_wait_s=0.1, memcheck_wait_s=0.1, handover_timeout_s=5)




def inventory(root: Path) -> Inventory:
    shared = root / "shared"
    return Inventory(hosts={
        n: HostConfig(name=n, transport="local", data_dir=root / n,
                      migration_address=f"10.241.1.1{i}", pools={"shared": shared})
        for i, n in ((1, "h1"), (2, "h2"))})


class Controller:
    """One controller: its own home (store, audit log, controller id) over a shared
    inventory, cluster and lock files."""

    def __init__(self, home: Path, inv: Inventory, cluster: FakeCluster) -> None:
        self.home = home
        self.inv = inv
        self.cluster = cluster
        self.store = Store(home / "vmigrate.db")
        self.audit = AuditLog(home / "audit.jsonl")
        self.id = controller_id(home)
        self.pool = HostPool(inv)
        self.locks = HostLocks(self.store, self.id, self.pool)

    def service(self) -> MigrationService:
        return MigrationService(self.inv, self.store, self.audit,
                                backend=self.cluster.backend(), timing=FAST,
                                locks=self.locks)

    def vms(self) -> VmService:
        return VmService(self.inv, self.store, locks=self.locks)

    def request(self, **kw: Any) -> MigrationRequest:
        return MigrationRequest(vm=VM, dest="h2", mode="live", policy="balanced", **kw)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Controller, Controller, FakeCluster]:
    inv = inventory(tmp_path / "hosts")
    cluster = FakeCluster(inv)
    spec = VMSpec(name=VM, memory_mib=256,
                  disks=(DiskSpec(path=f"{tmp_path / 'hosts' / 'shared'}/{VM}.raw"),))
    cluster.add_vm("h1", spec, ram=256 * MiB)
    a = Controller(tmp_path / "a", inv, cluster)
    b = Controller(tmp_path / "b", inv, cluster)
    for c in (a, b):  # two stores that both believe they manage the VM
        c.store.add_vm(VM, "h1", spec.model_dump_json())
    return a, b, cluster


#: every VM command that changes the VM's state
CHANGES: tuple[Callable[[VmService], Awaitable[object]], ...] = (
    lambda s: s.destroy(VM), lambda s: s.stop(VM, force=True), lambda s: s.start(VM),
    lambda s: s.qmp(VM, {"execute": "quit"}))


def lock_file(c: Controller, host: str) -> Path:
    return Path(lock_path(c.inv.host(host), VM))


def holder(c: Controller, host: str) -> LockInfo | None:
    path = lock_file(c, host)
    return parse_lock(path.read_text()) if path.exists() else None


# -- the controller's id ----------------------------------------------------------------------


def test_controller_id_is_created_once_private(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    first = controller_id(home)
    assert controller_id(home) == first and len(first) == 32
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "controller-id").stat().st_mode) == 0o600
    assert controller_id(tmp_path / "other") != first


def test_a_mangled_controller_id_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "controller-id").write_text("not an id\n")
    with pytest.raises(StoreError):
        controller_id(tmp_path)
    assert (tmp_path / "controller-id").read_text() == "not an id\n"


# -- the lock file's format -------------------------------------------------------------------


def test_lock_format_round_trips_and_refuses_anything_else() -> None:
    info = LockInfo(job="3f2a9c0d11e4", controller="ab" * 16, host="ctl-a", pid=42,
                    since=1796677200.0, vm="g1")
    assert parse_lock(info.render()) == info
    for bad in ("", "vmigrate-vm-lock 2\njob a\ncontroller b\n", info.render() + "job x\n",
                "vmigrate-vm-lock 1\njob a\n", "vmigrate-vm-lock 1\njob a b\ncontroller c\n",
                "vmigrate-vm-lock 1\njob $(touch x)\ncontroller c\n",
                "vmigrate-vm-lock 1\njob a\ncontroller c\npid x\n"):
        with pytest.raises(ValueError):
            parse_lock(bad)


# -- lock files on the hosts ------------------------------------------------------------------


async def test_a_lock_is_taken_once_and_names_its_holder(world: Any) -> None:
    a, b, _ = world
    await a.locks.acquire("job1", VM, ["h1", "h2"])
    held = holder(a, "h1")
    assert held is not None and (held.job, held.controller, held.vm) == ("job1", a.id, VM)
    assert stat.S_IMODE(lock_file(a, "h1").stat().st_mode) == 0o600
    await a.locks.acquire("job1", VM, ["h1", "h2"])  # the same job again: already its own
    with pytest.raises(VmLockedError) as info:
        await b.locks.acquire("job2", VM, ["h1", "h2"])
    assert info.value.holder == held and info.value.host == "h1"
    # nothing of b's is left anywhere, and a's locks are untouched
    assert holder(a, "h1") == held and holder(a, "h2") is not None
    assert [p.name for p in lock_file(a, "h1").parent.iterdir()] == ["vmigrate.lock"]
    assert await b.locks.release("job1", VM, ["h1", "h2"]) == []  # not b's to release
    assert holder(a, "h1") == held
    assert await a.locks.release("job1", VM, ["h1", "h2"]) == []
    assert holder(a, "h1") is None and not lock_file(a, "h1").parent.exists()


async def test_a_refusal_on_the_second_host_gives_back_the_first(world: Any) -> None:
    a, b, _ = world
    await a.locks.acquire("job1", VM, ["h2"])
    with pytest.raises(VmLockedError) as info:
        await b.locks.acquire("job2", VM, ["h1", "h2"])
    assert info.value.host == "h2"
    assert holder(b, "h1") is None and holder(a, "h2").job == "job1"  # type: ignore[union-attr]


async def test_release_keeps_the_vm_directory_when_it_holds_files(world: Any) -> None:
    a, _, _ = world
    run_dir = lock_file(a, "h1").parent
    run_dir.mkdir(parents=True)
    (run_dir / "console.log").write_text("boot\n")
    await a.locks.acquire("job1", VM, ["h1"])
    await a.locks.release("job1", VM, ["h1"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["console.log"]


async def test_stale_locks_of_ours_are_cleaned_others_never(world: Any) -> None:
    a, b, _ = world
    a.store.create_job("old1", VM, "live", "h1", "h2", {})
    await a.locks.acquire("old1", VM, ["h1"])
    with pytest.raises(VmLockedError):  # our own job still runs: held
        await a.locks.check(VM, ["h1"])
    a.store.end_job("old1", "failed", error="x")
    await a.locks.check(VM, ["h1"])  # ended: stale, and removed
    assert holder(a, "h1") is None
    await a.locks.acquire("never-stored", VM, ["h1"])  # a job our store does not know
    await a.locks.acquire("new1", VM, ["h1"])  # is stale too: taken over
    assert holder(a, "h1").job == "new1"  # type: ignore[union-attr]
    # another controller's lock is never stale for us, whatever our store says
    with pytest.raises(VmLockedError):
        await b.locks.acquire("new1", VM, ["h1"])
    with pytest.raises(VmLockedError):
        await b.locks.check(VM, ["h1"])
    assert holder(a, "h1").job == "new1"  # type: ignore[union-attr]


@pytest.mark.parametrize("what", ["garbage", "directory", "dangling-link"])
async def test_an_unreadable_lock_refuses(world: Any, what: str) -> None:
    a, _, _ = world
    path = lock_file(a, "h1")
    path.parent.mkdir(parents=True)
    if what == "garbage":
        path.write_text("someone else's\n")
    elif what == "directory":
        path.mkdir()
    else:
        path.symlink_to(path.parent / "nowhere")
    with pytest.raises(VmLockedError) as info:
        await a.locks.acquire("job1", VM, ["h1"])
    assert info.value.holder is None
    with pytest.raises(VmLockedError):
        await a.locks.check(VM, ["h1"])
    assert path.is_dir() if what == "directory" else path.is_symlink() or path.is_file()


async def test_hostile_ids_never_reach_a_host(world: Any) -> None:
    a, _, _ = world
    for job, vm in (("$(touch x)", VM), ("j1", "a b"), ("-rf", VM), ("", VM)):
        with pytest.raises(ConflictError):
            await a.locks.acquire(job, vm, ["h1"])
    assert not lock_file(a, "h1").parent.exists()


# -- migrations take and release them ---------------------------------------------------------


async def test_a_migration_holds_both_locks_until_its_end(world: Any) -> None:
    a, _, cluster = world
    seen: list[tuple[str | None, str | None]] = []

    def look() -> bool:
        job = a.store.list_jobs(vm=VM)
        if job and job[-1].phase == "perform" and not seen:
            seen.append(((holder(a, "h1") or LockInfo("-", "-")).job,
                         (holder(a, "h2") or LockInfo("-", "-")).job))
        return False

    cluster.inject(Fault("command", when=look))
    report = await a.service().migrate(a.request())
    assert report.status == "completed", report.error
    assert seen == [(report.job, report.job)]
    assert holder(a, "h1") is None and holder(a, "h2") is None
    assert a.store.get_vm(VM).host == "h2"


async def test_a_second_controller_is_refused_before_anything_starts(world: Any) -> None:
    a, b, cluster = world
    a.store.create_job("busy12345678", VM, "live", "h1", "h2", {})
    await a.locks.acquire("busy12345678", VM, ["h1", "h2"])
    calls = len(cluster.calls)
    with pytest.raises(VmLockedError) as info:
        await b.service().migrate(b.request())
    assert info.value.holder is not None and info.value.holder.job == "busy12345678"
    assert info.value.holder.controller == a.id
    assert b.store.list_jobs() == [] and b.store.locking_job(VM) is None
    assert not b.audit.path.exists() or b.audit.path.read_text() == ""
    assert len(cluster.calls) == calls  # no host was asked anything
    assert cluster.running(VM)[0].host == "h1"
    # b's VM commands are refused too, and a's locks stay
    for act in CHANGES:
        async with b.vms() as svc:
            with pytest.raises(VmLockedError):
                await act(svc)
    assert b.store.get_vm(VM).host == "h1"
    assert holder(a, "h1").job == holder(a, "h2").job == "busy12345678"  # type: ignore
    # nor may b define and start a VM of that name on the host
    b.store.remove_vm(VM)
    async with b.vms() as svc:
        with pytest.raises(VmLockedError):
            await svc.create(CreateRequest(name=VM, host="h1", kernel="/bin/true", nic=False))
    assert b.store.list_vms() == []


async def test_vm_commands_honour_a_job_of_our_store(world: Any) -> None:
    a, _, _ = world
    a.store.create_job("run1", VM, "live", "h1", "h2", {})
    for act in CHANGES:
        async with a.vms() as svc:
            with pytest.raises(ConflictError) as info:
                await act(svc)
        assert not isinstance(info.value, VmLockedError)  # refused by the store first
    assert a.store.get_vm(VM).host == "h1"
    with pytest.raises(ConflictError):  # and a migration, before any check of the request
        a.service().options(a.request())


async def _needs_operator(c: Controller, cluster: FakeCluster, *, pause: bool = True) -> str:
    """A live migration whose destination guest is found paused after the switch."""

    def pnr() -> bool:
        jobs = c.store.list_jobs(vm=VM)
        return bool(jobs and jobs[-1].active and jobs[-1].phase == "finish"
                    and jobs[-1].state and '"pnr":true' in jobs[-1].state)

    def pause_it() -> None:
        cluster.host("h2").vms[VM].run_state = "paused"

    cluster.inject(Fault("cancel", host="h2", call="vm_state", on_cancel=pause_it, when=pnr))
    report = await c.service().migrate(c.request())
    assert report.status == "needs-operator", report.error
    cluster.clear_faults()
    return report.job


async def test_needs_operator_keeps_every_lock_until_resolved(world: Any) -> None:
    a, b, cluster = world
    job = await _needs_operator(a, cluster)
    assert a.store.get_job(job).locks_vm
    assert holder(a, "h1").job == holder(a, "h2").job == job  # type: ignore[union-attr]
    async with a.vms() as svc:
        with pytest.raises(ConflictError):
            await svc.destroy(VM)
    with pytest.raises(VmLockedError):
        await b.service().migrate(b.request())
    done = await a.service().resolve(a.store.get_job(job), "destination")
    assert done.outcome == "completed" and "h2: paused" in done.detail
    assert not a.store.get_job(job).locks_vm
    assert holder(a, "h1") is None and holder(a, "h2") is None


async def test_recover_settles_a_job_waiting_for_an_operator_and_unlocks(world: Any) -> None:
    a, _, cluster = world
    job = await _needs_operator(a, cluster)
    cluster.host("h2").vms[VM].run_state = "running"
    svc = a.service()
    [done] = await svc.recover(svc.recoverable())
    assert done.job == job and done.outcome == "completed", done
    assert holder(a, "h1") is None and holder(a, "h2") is None


async def test_resolve_checks_what_runs_where_before_it_acts(world: Any) -> None:
    a, _, cluster = world
    job = await _needs_operator(a, cluster)
    dest = cluster.host("h2").vms.pop(VM)  # the destination's QEMU is gone
    with pytest.raises(ConflictError):
        await a.service().resolve(a.store.get_job(job), "destination")
    # refused: nothing changed, the job still waits and keeps its locks
    record = a.store.get_job(job)
    assert record.status == "needs-operator" and a.store.get_vm(VM).host == "h2"
    assert VM in cluster.host("h1").vms
    assert holder(a, "h1").job == holder(a, "h2").job == job  # type: ignore[union-attr]
    cluster.host("h2").vms[VM] = dest
    # the source cannot take the guest back without its QEMU and its disk
    src = cluster.host("h1").vms.pop(VM)
    disk = src.spec.disks[0].path
    files = {h: cluster.host(h).files.pop(disk) for h in ("h1", "h2")
             if disk in cluster.host(h).files}
    with pytest.raises(ConflictError):
        await a.service().resolve(a.store.get_job(job), "source")
    assert a.store.get_job(job).status == "needs-operator"
    assert cluster.host("h2").vms[VM] is dest  # the destination was not stopped
    for h, image in files.items():
        cluster.host(h).files[disk] = image
    done = await a.service().resolve(a.store.get_job(job), "source")
    assert done.outcome == "failed" and a.store.get_vm(VM).host == "h1"
    assert cluster.running(VM)[0].host == "h1"
    assert holder(a, "h1") is None and holder(a, "h2") is None


# -- the store ---------------------------------------------------------------------------------


def test_job_id_prefixes_match_literally(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    for jid, vm in (("ab%x", "v1"), ("ab_y", "v2"), ("abcz", "v3")):
        store.create_job(jid, vm, "live", "h1", "h2", {})
    assert store.get_job("ab%").id == "ab%x"
    assert store.get_job("ab_").id == "ab_y"
    assert store.get_job("abc").id == "abcz"
    with pytest.raises(NotFoundError):
        store.get_job("a%z")
    with pytest.raises(NotFoundError):
        store.get_job("%")
    with pytest.raises(UserError) as info:  # ambiguous: a wrong request, not "not found"
        store.get_job("ab")
    assert not isinstance(info.value, NotFoundError)
    assert {"ab%x", "ab_y", "abcz"} <= set(str(info.value).replace(",", " ")
                                           .replace("(", " ").replace(")", " ").split())


def test_an_exact_id_wins_over_longer_ids_it_prefixes(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.create_job("ab", "v1", "live", "h1", "h2", {})
    store.create_job("abc", "v2", "live", "h1", "h2", {})
    assert store.get_job("ab").vm == "v1"
    with pytest.raises(UserError):
        store.get_job("")


def test_the_store_and_its_files_are_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = os.umask(0o022)
    try:
        store = Store(home / "vmigrate.db")
        store.add_vm("a", "h1", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in home.iterdir()}
    assert {"vmigrate.db", "vmigrate.db-wal", "vmigrate.db-shm"} <= set(files)
    assert set(files.values()) == {0o600}, files
    store.close()


def test_a_world_readable_store_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "existing"
    home.mkdir()
    home.chmod(0o755)
    Store(home / "db").close()
    (home / "db").chmod(0o644)
    Store(home / "db").close()
    assert stat.S_IMODE((home / "db").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # not created by us: left alone


def test_discard_forgets_only_a_job_that_never_started(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.create_job("j1", "v", "live", "h1", "h2", {})
    store.discard_job("j1")
    assert store.find_job("j1") is None and store.locking_job("v") is None
    store.create_job("j2", "v", "live", "h1", "h2", {})
    store.set_phase("j2", "perform")
    store.discard_job("j2")
    assert store.locking_job("v") is not None and store.locking_job("v").id == "j2"  # type: ignore[union-attr]
