"""The wave orchestrator (``vmigrate.fleet``) runs real MigrationService jobs on the fake
hypervisor cluster: a 3-host evacuation to its end within the schedule's rules, a
move that keeps failing, and a controller that dies mid-wave and is resumed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from vmigrate.audit.log import AuditLog, read
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import ConflictError
from vmigrate.fleet import WaveRunner, move_cap, store_wave
from vmigrate.migration.job import Timing
from vmigrate.plan.fleet import Fleet, Host, Link, Vm, check_schedule, plan_evacuation, schedule
from vmigrate.progress import ProgressFn, quiet
from vmigrate.qemu.spec import DiskSpec, VMSpec
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.store import Store
from vmigrate.testing.fakefleet import LinearEstimator
from vmigrate.testing.fakehv import ControllerCrash, FakeCluster, Fault

MiB = 1 << 20
GiB = 1 << 30
HOSTS = ("h1", "h2", "h3")
VMS = tuple(f"vm{i}" for i in range(5))
FAST = Timing(sample_s=0, poll_s=0, forward_retry_s=0, mirror_sample_s=0, round_pause_s=0,
              cancel_grace_s=0.05, cancel_wait_s=2, dest_run_wait_s=2, boot_wait_s=1,
              ping_wait_s=0.1, memcheck_wait_s=0.1, handover_timeout_s=5)
EST = LinearEstimator()


def the_fleet() -> Fleet:
    """h1 is emptied into h2 and h3; 24 GiB each takes three of the five 8 GiB VMs at
    most, two migrations in and out of a host at a time, links of 100 MB/s usable."""
    hosts = [Host("h1", 64 * GiB, 16, state="draining"), Host("h2", 24 * GiB, 16),
             Host("h3", 24 * GiB, 16)]
    links = [Link(f"{h}-{d}", 125e6, 0.8) for h in HOSTS for d in ("up", "down")]
    vms = [Vm(name, "h1", 8 * GiB, 2, dirty_rate=i * 3e6, anti_affinity=(
        "web" if name in ("vm0", "vm1") else None)) for i, name in enumerate(VMS)]
    return Fleet(hosts, links, vms)


class World:
    """The fake cluster, an inventory, a store and an audit log; a runner on them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.inventory = Inventory(hosts={h: HostConfig(
            name=h, address=f"10.240.1.1{i}", data_dir=Path("/var/lib/vmigrate"),
            migration_address=f"10.241.1.1{i}", pools={"shared": Path("/srv/shared")})
            for i, h in enumerate(HOSTS, start=1)})
        self.cluster = FakeCluster(self.inventory)
        self.store = Store(home / "vmigrate.db")
        self.audit = AuditLog(home / "audit.jsonl")
        for name in VMS:
            spec = VMSpec(name=name, memory_mib=256,
                          disks=(DiskSpec(path=f"/srv/shared/{name}.raw"),))
            self.cluster.add_vm("h1", spec, ram=256 * MiB, dirty_rate=1e6)
            self.store.add_vm(name, "h1", spec.model_dump_json())
        self.fleet = the_fleet()
        placement = plan_evacuation(self.fleet, "h1", EST)
        assert placement.unplaceable == []
        self.schedule = schedule(self.fleet, placement.moves, EST)
        assert check_schedule(self.schedule, self.fleet) == []
        self.wave = store_wave(self.store, self.schedule, kind="evacuate", host="h1",
                               options={"policy": "balanced"}).id
        self.events: list[dict[str, Any]] = []
        self.delays: list[float] = []

    def services(self, progress: ProgressFn) -> MigrationService:
        return MigrationService(self.inventory, self.store, self.audit,
                                backend=self.cluster.backend(), timing=FAST,
                                progress=progress)

    async def nap(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)

    def runner(self, **kw: Any) -> WaveRunner:
        kw.setdefault("on_event", self.events.append)
        return WaveRunner(self.store, self.audit, self.services, sleep=self.nap, **kw)

    def reopen(self) -> None:
        """A new controller process: its own store connection and audit log object."""
        self.store.close()
        self.store = Store(self.home / "vmigrate.db")
        self.audit = AuditLog(self.home / "audit.jsonl")
        self.cluster.restart_controller()

    def completed_jobs(self) -> Counter[str]:
        return Counter(j.vm for j in self.store.list_jobs() if j.status == "completed")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def check_in_flight(w: World, events: list[dict[str, Any]]) -> int:
    """Replay the migrations the runner started and ended against the fleet's rules
    (at every start: slots in and out, link allowances with the caps, destination
    memory with in-flight reservations, anti-affinity); the most in flight at once."""
    fleet = w.fleet
    caps = {e.vm: move_cap(e) for e in w.schedule.entries}
    where = {v.name: v.host for v in fleet.vms}
    flying: dict[str, tuple[str, str]] = {}
    most = 0
    for ev in events:
        if ev["event"] != "move":
            continue
        vm, state = ev["vm"], ev["state"]
        if state == "running":
            flying[vm] = (ev["src"], ev["dst"])
            most = max(most, len(flying))
            for h in fleet.hosts:
                assert sum(s == h.name for s, _ in flying.values()) <= h.max_out
                assert sum(d == h.name for _, d in flying.values()) <= h.max_in
                held = sum(fleet.vm(v).memory for v, host in where.items() if host == h.name)
                held += sum(fleet.vm(v).memory for v, (s, d) in flying.items()
                            if d == h.name and where[v] != h.name)
                assert held <= h.capacity, (h.name, flying)
            use: defaultdict[str, float] = defaultdict(float)
            for v, (s, d) in flying.items():
                for link in fleet.links_of(s, d):
                    use[link] += caps[v]
            for link, total in use.items():
                assert total <= fleet.link(link).allowance * (1 + 1e-9), (link, flying)
            for v, (_, d) in flying.items():
                key = fleet.vm(v).anti_affinity
                if key is None:
                    continue
                for other, host in where.items():
                    if other != v and fleet.vm(other).anti_affinity == key:
                        assert d not in {host, flying.get(other, ("", ""))[1]}
        elif state in ("done", "failed", "retry", "pending") and vm in flying:
            _src, dst = flying.pop(vm)
            if state == "done":
                where[vm] = dst
    return most


# -- a wave to its end ---------------------------------------------------------------------


async def test_evacuation_runs_to_done_within_the_rules(world: World) -> None:
    report = await world.runner().run(world.wave)
    assert report["state"] == "done", report
    assert world.store.get_wave(world.wave).state == "done"
    dests = {e.vm: e.dst for e in world.schedule.entries}
    for vm in VMS:
        assert world.store.get_vm(vm).host == dests[vm]
        assert [p.host for p in world.cluster.running(vm)] == [dests[vm]]
        assert world.cluster.lost_writes(vm) == []
    assert world.cluster.split_brain == []
    assert world.completed_jobs() == Counter(VMS)
    most = check_in_flight(world, world.events)
    planned = max(sum(e.start_s <= t < e.end_s for e in world.schedule.entries)
                  for t in (e.start_s for e in world.schedule.entries))
    assert most >= min(2, planned)
    # every migration ran with its cap, measured figures beside the predicted ones
    for row in report["moves"]:
        job = world.store.get_job(row["job"])
        assert job.options["bandwidth"] == row["bandwidth"]
        assert row["measured"]["time_s"] is not None and row["measured"]["bytes"]
        assert row["predicted"]["time_s"] > 0
    # the stored wave keeps the report; the audit log has the wave's records
    assert world.store.get_wave(world.wave).report is not None
    kinds = [r.event for r in read(world.audit.path) if r.event.startswith("wave-")]
    assert kinds[0] == "wave-start" and kinds[-1] == "wave-end"
    assert kinds.count("wave-move") == 3 * len(VMS)  # claimed, its job, its end
    assert any(e["event"] == "progress" and e["bytes"] for e in world.events)
    assert world.events[-1]["event"] == "wave" and world.events[-1]["state"] == "done"
    with pytest.raises(ConflictError):  # a wave runs once; resume goes on with one
        await world.runner().run(world.wave)


async def test_a_failing_move_is_retried_then_named_and_the_others_finish(
        world: World) -> None:
    bad = world.schedule.entries[-1].vm
    fault = world.cluster.inject(Fault("command", call="migrate", vm=bad, side="monitor",
                                       times=10))
    report = await world.runner().run(world.wave)
    assert fault.fired == 3  # the first attempt and two retries
    assert world.delays == [5.0, 20.0]
    assert report["state"] == "failed" and report["failed"] == [bad]
    assert world.store.get_wave(world.wave).state == "failed"
    move = world.store.wave_move(world.wave, bad)
    assert move.state == "failed" and move.attempts == 3 and move.error
    assert world.store.get_vm(bad).host == "h1"
    assert [p.host for p in world.cluster.running(bad)] == ["h1"]
    assert world.completed_jobs() == Counter(v for v in VMS if v != bad)
    assert world.cluster.split_brain == []
    check_in_flight(world, world.events)


async def test_the_vm_lock_refuses_a_second_migration_and_the_move_fails(
        world: World) -> None:
    first = world.schedule.entries[0]
    held = world.store.create_job("other", first.vm, "live", "h1", first.dst, {})
    report = await world.runner(retries=1).run(world.wave)
    assert report["failed"] == [first.vm]
    assert "refused" in (world.store.wave_move(world.wave, first.vm).error or "")
    assert world.store.get_job(held.id).status == "running"  # untouched
    assert world.completed_jobs() == Counter(v for v in VMS if v != first.vm)


# -- a controller that dies ------------------------------------------------------------------


async def test_killed_between_the_write_ahead_and_the_migration_resumes_once(
        world: World) -> None:
    def die(ev: dict[str, Any]) -> None:
        world.events.append(ev)
        if ev["event"] == "move" and ev["state"] == "running":
            raise ControllerCrash  # right after the claim, before migrate()

    with pytest.raises(ControllerCrash):
        await world.runner(on_event=die).run(world.wave)
    first = world.schedule.entries[0].vm
    move = world.store.wave_move(world.wave, first)
    assert move.state == "running" and move.job is None
    assert world.store.list_jobs() == []
    world.reopen()
    report = await world.runner().resume(world.wave)
    assert report["state"] == "done", report
    assert world.completed_jobs() == Counter(VMS)
    assert len(world.store.list_jobs()) == len(VMS)  # no job but the one per VM
    dests = {e.vm: e.dst for e in world.schedule.entries}
    for vm in VMS:
        assert [p.host for p in world.cluster.running(vm)] == [dests[vm]]
    assert world.cluster.split_brain == []


async def test_killed_mid_migration_resumes_and_moves_every_vm_once(world: World) -> None:
    first = world.schedule.entries[0].vm
    # the controller dies right after QEMU began the first migration
    world.cluster.inject(Fault("crash", call="migrate", vm=first, side="monitor", after=True))
    task = asyncio.create_task(world.runner().run(world.wave))
    with pytest.raises(ControllerCrash):
        await task
    move = world.store.wave_move(world.wave, first)
    assert move.state == "running" and move.job is not None
    assert world.store.get_job(move.job).status == "running"
    world.reopen()
    events: list[dict[str, Any]] = []
    report = await world.runner(on_event=events.append).resume(world.wave)
    assert report["state"] == "done", report
    assert world.completed_jobs() == Counter(VMS)
    dests = {e.vm: e.dst for e in world.schedule.entries}
    for vm in VMS:
        assert world.store.get_vm(vm).host == dests[vm]
        assert [p.host for p in world.cluster.running(vm)] == [dests[vm]]
        assert world.cluster.lost_writes(vm) == []
    assert world.cluster.split_brain == []
    # a move done before the crash was not started again
    started = Counter(e["vm"] for e in events if e["event"] == "move"
                      and e["state"] == "started")
    assert all(n <= 1 for n in started.values())


async def test_cancelled_runner_resumes_from_a_new_runner(world: World) -> None:
    seen: list[dict[str, Any]] = []
    started = asyncio.Event()

    def watch(ev: dict[str, Any]) -> None:
        seen.append(ev)
        if ev["event"] == "progress":
            started.set()

    task = asyncio.create_task(world.runner(on_event=watch).run(world.wave))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.store.get_wave(world.wave).state == "running"
    world.reopen()
    report = await world.runner().resume(world.wave)
    assert report["state"] == "done", report
    assert world.completed_jobs() == Counter(VMS)
    assert world.cluster.split_brain == []


async def test_resume_takes_a_vm_already_on_its_destination_as_done(world: World) -> None:
    entry = world.schedule.entries[0]
    world.store.claim_move(world.wave, entry.vm)  # the write-ahead of a first run
    # its migration completed, then the job's record was lost: the VM's record decides
    await world.services(quiet).migrate(MigrationRequest(vm=entry.vm, dest=entry.dst))
    db = sqlite3.connect(world.home / "vmigrate.db")
    db.execute("DELETE FROM jobs")
    db.commit()
    db.close()
    report = await world.runner().resume(world.wave)
    assert report["state"] == "done"
    assert world.store.wave_move(world.wave, entry.vm).state == "done"
    assert world.completed_jobs() == Counter(v for v in VMS if v != entry.vm)


async def test_a_cancelled_wave_starts_nothing_more(world: World) -> None:
    other = Store(world.home / "vmigrate.db")  # the operator's command, another process

    def cancel(ev: dict[str, Any]) -> None:
        world.events.append(ev)
        if ev["event"] == "move" and ev["state"] == "started":
            other.set_wave_state(world.wave, "cancelled")

    report = await world.runner(on_event=cancel).run(world.wave)
    assert report["state"] == "cancelled"
    first = [e.vm for e in world.schedule.entries if e.start_s == 0.0]
    assert sorted(report["done"]) == sorted(first)  # the batch already started finished
    assert all(world.store.wave_move(world.wave, e.vm).state == "pending"
               for e in world.schedule.entries if e.vm not in first)
    with pytest.raises(ConflictError):
        await world.runner().resume(world.wave)
    other.close()
