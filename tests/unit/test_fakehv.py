"""The in-memory hypervisor cluster (vmigrate.testing.fakehv) behaves like QEMU 7.2."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmigrate.config import HostConfig, Inventory
from vmigrate.drivers.base import NbdAddress, Sample, VmState
from vmigrate.errors import (
    CommandError,
    ConflictError,
    HostUnreachableError,
    QmpCommandError,
    QmpConnectionError,
    SpecError,
    StateError,
    TransferError,
    VmStartError,
)
from vmigrate.progress import Event
from vmigrate.qemu.spec import DiskSpec, VMSpec
from vmigrate.testing.fakehv import (
    ControllerCrash,
    FakeCluster,
    FakeMonitor,
    FakeVm,
    Fault,
    guest_record,
)
from vmigrate.transfer.mover import PARTIAL_SUFFIX, ExportEnd, ImageEnd, SendOptions

MiB = 1 << 20
SHARED = "/srv/shared/vm1.raw"
LOCAL = "/var/lib/vmigrate/images/vm1.raw"
TARGET = "/var/lib/vmigrate/images/vm1-copy.raw"
URI = "tcp:10.241.1.12:49152"


def host(n: int) -> HostConfig:
    return HostConfig(name=f"h{n}", address=f"10.240.1.1{n}",
                      data_dir=Path("/var/lib/vmigrate"),
                      migration_address=f"10.241.1.1{n}",
                      pools={"local": Path("/var/lib/vmigrate/images"),
                             "shared": Path("/srv/shared")})


def vmspec(disk: str | None = SHARED, **kw: object) -> VMSpec:
    disks = (DiskSpec(path=disk),) if disk else ()
    return VMSpec.model_validate({"name": "vm1", "memory_mib": 256, "disks": disks, **kw})


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster([host(1), host(2)])


def mons(cluster: FakeCluster) -> tuple[FakeMonitor, FakeMonitor]:
    return cluster.driver("h1").monitor("vm1"), cluster.driver("h2").monitor("vm1")


async def incoming(cluster: FakeCluster, spec: VMSpec, *, held: bool = False,
                   caps: dict[str, bool] | None = None, uri: str = URI) -> FakeMonitor:
    """Start the destination QEMU (-incoming defer) on h2 and make it listen."""
    await cluster.driver("h2").start_vm(spec, incoming=True, held=held)
    dst = cluster.driver("h2").monitor(spec.name)
    if caps:
        await dst.set_capabilities(caps)
    await dst.listen(uri)
    return dst


async def poll(mon: FakeMonitor, until: set[str], limit: int = 400) -> Sample:
    for _ in range(limit):
        sample = await mon.migration()
        if sample.status in until:
            return sample
    raise AssertionError(f"still {sample.status} after {limit} samples")


def vm(cluster: FakeCluster, name: str) -> FakeVm:
    found = cluster.find("vm1", name)
    assert found is not None, f"no vm1 process on {name}"
    return found


async def live(cluster: FakeCluster, *, dirty_rate: float = 0.0, held: bool = False,
               caps: dict[str, bool] | None = None, disk: str | None = SHARED
               ) -> tuple[FakeMonitor, FakeMonitor]:
    spec = vmspec(disk)
    cluster.add_vm("h1", spec, dirty_rate=dirty_rate)
    dst = await incoming(cluster, spec, held=held, caps=caps)
    src = cluster.driver("h1").monitor("vm1")
    if caps:
        await src.set_capabilities(caps)
    await src.migrate(URI)
    return src, dst


# -- memory migration ------------------------------------------------------------------


async def test_precopy_completes_and_destination_runs_with_the_source_memory(
        cluster: FakeCluster) -> None:
    src, dst = await live(cluster)
    assert (await src.migration()).status == "active"
    assert await dst.run_state() == "inmigrate"
    done = await poll(src, {"completed"})
    assert done.transferred >= 256 * MiB and done.downtime_ms is not None
    assert (await dst.migration()).status == "completed"
    source, dest = vm(cluster, "h1"), vm(cluster, "h2")
    assert source.run_state == "postmigrate" and dest.run_state == "running"
    assert dest.memory_at_start == source.memory_at_switch and dest.origin == "migration"
    assert "Linux version" not in await cluster.driver("h2").console("vm1")  # no reboot
    memory = dest.memory
    cluster.advance(5)
    assert dest.memory == memory + 5
    assert source.memory == source.memory_at_switch  # stopped at the switch
    assert cluster.split_brain == [] and cluster.lost_writes("vm1") == []
    assert cluster.hosts["h2"].ports == {}  # the listener closed


async def test_postcopy_switches_and_completes_when_precopy_cannot(
        cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, dst = await live(cluster, dirty_rate=200e6, caps={"postcopy-ram": True})
    for _ in range(10):
        assert (await src.migration()).status == "active"  # never converges
    source, dest = vm(cluster, "h1"), vm(cluster, "h2")
    assert source.run_state == "running"
    await src.start_postcopy()
    assert (await src.migration()).status == "postcopy-active"
    assert source.run_state == "finish-migrate" and dest.run_state == "running"
    assert dest.memory_at_start == source.memory_at_switch
    assert (await dst.migration()).status == "postcopy-active"
    with pytest.raises(QmpCommandError):
        await src.resume()  # "Migration is not finalized yet"
    await poll(src, {"completed"})
    assert source.run_state == "postmigrate" and dest.run_state == "running"
    assert cluster.split_brain == [] and cluster.lost_writes("vm1") == []


async def test_postcopy_needs_the_capability_on_both_ends(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_vm("h1", spec)
    await incoming(cluster, spec)  # destination without postcopy-ram
    src = cluster.driver("h1").monitor("vm1")
    with pytest.raises(QmpCommandError):
        await src.start_postcopy()  # not on the source either
    await src.set_capabilities({"postcopy-ram": True})
    await src.migrate(URI)
    with pytest.raises(QmpCommandError):
        await src.start_postcopy()
    assert (await src.migration()).status == "active"


async def test_link_down_in_postcopy_stalls_then_pause_and_recover_complete(
        cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, dst = await live(cluster, dirty_rate=200e6, caps={"postcopy-ram": True})
    await src.migration()
    await src.start_postcopy()
    before = await src.migration()
    cluster.link_down("h1", "h2")
    dest = vm(cluster, "h2")
    memory = dest.memory
    for _ in range(5):
        stalled = await src.migration()
        assert stalled.status == "postcopy-active"  # QEMU raises no error
        assert stalled.transferred == (await src.migration()).transferred
    assert stalled.transferred > before.transferred or stalled.remaining > 0
    assert dest.memory == memory  # the guest waits on pages
    assert not await cluster.driver("h1").can_reach("10.241.1.12")
    with pytest.raises(QmpCommandError):
        await dst.listen_recover("tcp:10.241.1.12:49153")  # not paused yet
    await src.pause_migration()
    await dst.pause_migration()
    assert (await src.migration()).status == "postcopy-paused"
    assert (await dst.migration()).status == "postcopy-paused"
    cluster.link_up("h1", "h2")
    uri = "tcp:10.241.1.12:49153"
    await src.migrate("tcp:10.241.1.12:49999", resume=True)  # nobody listens: stays paused
    assert (await src.migration()).status == "postcopy-paused"
    await dst.listen_recover(uri)
    await src.migrate(uri, resume=True)
    assert (await src.migration()).status in ("postcopy-active", "completed")
    await poll(src, {"completed"})
    assert dest.run_state == "running" and dest.memory > memory
    assert cluster.split_brain == [] and cluster.lost_writes("vm1") == []


async def test_pause_on_one_side_reaches_the_other_over_a_working_link(
        cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, dst = await live(cluster, dirty_rate=200e6, caps={"postcopy-ram": True})
    await src.start_postcopy()
    await src.pause_migration()
    assert (await dst.migration()).status == "postcopy-paused"
    with pytest.raises(QmpCommandError):
        await src.pause_migration()


async def test_cancel_before_the_switch_keeps_the_source_and_ends_the_destination(
        cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, dirty_rate=500e6)
    await src.migration()
    await src.cancel_migration()
    assert (await src.migration()).status == "cancelled"
    assert vm(cluster, "h1").run_state == "running"
    assert cluster.hosts["h2"].vms == {} and cluster.hosts["h2"].ports == {}
    assert await cluster.driver("h2").vm_state("vm1") == VmState.STOPPED
    await src.cancel_migration()  # nothing to cancel: no error


async def test_cancel_after_the_switch_is_refused(cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, _dst = await live(cluster, dirty_rate=200e6, caps={"postcopy-ram": True})
    await src.start_postcopy()
    with pytest.raises(QmpCommandError):
        await src.cancel_migration()
    assert (await src.migration()).status == "postcopy-active"
    assert vm(cluster, "h2").run_state == "running"


async def test_a_source_paused_before_completion_leaves_the_destination_paused(
        cluster: FakeCluster) -> None:
    src, dst = await live(cluster, dirty_rate=500e6)
    await src.migration()
    await src.pause()
    await poll(src, {"completed"})
    assert await dst.run_state() == "paused"
    await dst.resume()
    assert await dst.run_state() == "running"


async def test_held_destination_stays_paused_until_resume(cluster: FakeCluster) -> None:
    src, dst = await live(cluster, held=True)
    await poll(src, {"completed"})
    dest = vm(cluster, "h2")
    assert dest.run_state == "paused" and dest.held
    memory = dest.memory
    cluster.advance(3)
    assert dest.memory == memory
    await dst.resume()
    assert dest.run_state == "running" and not dest.held
    assert cluster.split_brain == []


async def test_resume_of_an_incoming_vm_lifts_the_hold(cluster: FakeCluster) -> None:
    src, dst = await live(cluster, held=True)
    await dst.resume()  # still inmigrate: QEMU's autostart is set
    assert await dst.run_state() == "inmigrate"
    await poll(src, {"completed"})
    assert await dst.run_state() == "running"


async def test_pause_before_switchover_waits_for_continue(cluster: FakeCluster) -> None:
    src, dst = await live(cluster, caps={"pause-before-switchover": True})
    await poll(src, {"pre-switchover"})
    source = vm(cluster, "h1")
    assert source.run_state == "finish-migrate"
    for _ in range(3):
        assert (await src.migration()).status == "pre-switchover"
    assert await dst.run_state() == "inmigrate"
    with pytest.raises(QmpCommandError):
        await src.continue_migration("active")
    with pytest.raises(QmpCommandError):
        await src.resume()
    await src.continue_migration("pre-switchover")
    await poll(src, {"completed"})
    assert await dst.run_state() == "running" and source.run_state == "postmigrate"


async def test_cancel_at_pre_switchover_resumes_the_source(cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, caps={"pause-before-switchover": True})
    await poll(src, {"pre-switchover"})
    await src.cancel_migration()
    assert vm(cluster, "h1").run_state == "running"
    assert cluster.hosts["h2"].vms == {}


async def test_auto_converge_throttles_a_busy_guest(cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, _dst = await live(cluster, dirty_rate=45e6, caps={"auto-converge": True})
    throttle = 0
    for _ in range(200):
        sample = await src.migration()
        throttle = max(throttle, sample.throttle_pct)
        if sample.status == "completed":
            break
    assert throttle >= 20 and sample.iteration > 2


async def test_multifd_with_postcopy_kills_the_destination(cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, _dst = await live(cluster, dirty_rate=200e6,
                           caps={"multifd": True, "postcopy-ram": True})
    await src.start_postcopy()
    assert (await src.migration()).status == "failed"
    assert cluster.hosts["h2"].vms == {} and vm(cluster, "h1").run_state == "running"


async def test_migrate_to_nobody_fails_like_qemu(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_vm("h1", spec)
    src = cluster.driver("h1").monitor("vm1")
    await src.migrate(URI)  # accepted ...
    failed = await src.migration()
    assert failed.status == "failed"  # ... then the connection is refused
    assert vm(cluster, "h1").run_state == "running"
    with pytest.raises(QmpCommandError):
        await src.migrate("exec:cat")


async def test_handshake_failures_end_the_incoming_qemu(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_vm("h1", spec)
    await incoming(cluster, spec, caps={"multifd": True})
    src = cluster.driver("h1").monitor("vm1")
    await src.migrate(URI)
    assert (await src.migration()).status == "failed"
    assert cluster.hosts["h2"].vms == {} and vm(cluster, "h1").run_state == "running"
    # TLS on the source only
    dst = await incoming(cluster, spec)
    await src.add_tls("tls0", "/var/lib/vmigrate/tls", "client")
    await src.set_parameters({"tls-creds": "tls0"})
    await src.migrate(URI)
    assert (await src.migration()).status == "failed"
    assert cluster.hosts["h2"].vms == {}
    # both ends with credentials: it goes
    dst = await incoming(cluster, spec)
    await dst.add_tls("tls0", "/var/lib/vmigrate/tls", "server")
    await dst.set_parameters({"tls-creds": "tls0"})
    await src.migrate(URI)
    await poll(src, {"completed"})
    with pytest.raises(QmpCommandError):
        await dst.add_tls("tls0", "/var/lib/vmigrate/tls", "server")


async def test_listen_rules(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_vm("h1", spec)
    with pytest.raises(QmpCommandError):
        await cluster.driver("h1").monitor("vm1").listen(URI)  # not started incoming
    cluster.occupy_port("h2", 49152)
    await cluster.driver("h2").start_vm(spec, incoming=True)
    dst = cluster.driver("h2").monitor("vm1")
    with pytest.raises(QmpCommandError):
        await dst.listen(URI)  # taken port
    with pytest.raises(QmpCommandError):
        await dst.listen("tcp:10.241.1.11:49153")  # not an address of h2
    await dst.listen("tcp:10.241.1.12:49153")  # a retry on another port works
    with pytest.raises(QmpCommandError):
        await dst.listen("tcp:10.241.1.12:49154")  # already listening
    assert (await dst.migration()).status == "setup"


async def test_capabilities_and_parameters_are_checked(cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, dirty_rate=500e6)
    with pytest.raises(QmpCommandError):
        await src.set_capabilities({"auto-converge": True})  # migration running
    source = vm(cluster, "h1")
    with pytest.raises(QmpCommandError):
        await src.set_parameters({"downtime-limit": -1})
    with pytest.raises(QmpCommandError):
        await src.set_parameters({"cpu-throttle-initial": 0})
    assert source.params["downtime-limit"] == 300
    await src.set_parameters({"downtime-limit": 5000})  # also while migrating
    assert dict(source.params)["downtime-limit"] == 5000
    assert source.outgoing is not None and source.outgoing.sim.params["downtime-limit"] == 5000
    await src.cancel_migration()
    with pytest.raises(QmpCommandError):
        await src.set_capabilities({"no-such-cap": True})
    with pytest.raises(QmpCommandError):
        await src.set_capabilities({"postcopy-ram": True, "compress": True})
    await src.set_capabilities({"auto-converge": True, "events": True})
    assert source.capabilities["auto-converge"]


async def test_events_are_collected_and_lost_with_the_connection(
        cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, caps={"events": True}, disk=None)
    with src.events("MIGRATION") as events:
        await poll(src, {"completed"})
        got = []
        while (event := await events.wait(0.5)) is not None:
            got.append(event["data"]["status"])
        assert got[-1] == "completed"
    with src.events() as events:
        await src.resume()  # RESUME event
        cluster.inject(Fault("connection", call="run_state"))
        with pytest.raises(QmpConnectionError):
            await src.run_state()
        assert await events.wait(0.1) is None  # lost with the connection


# -- the guest and the driver -------------------------------------------------------------


async def test_start_vm_refusals_and_states(cluster: FakeCluster) -> None:
    d1 = cluster.driver("h1")
    assert cluster.driver("h1") is d1 and d1.monitor("vm1") is d1.monitor("vm1")
    spec = vmspec(LOCAL)
    with pytest.raises(SpecError):
        await d1.start_vm(spec)  # no disk
    cluster.add_image("h1", LOCAL, "raw", 4 * MiB)
    await d1.start_vm(spec, held=True)
    with pytest.raises(ConflictError):
        await d1.start_vm(spec)
    mon = d1.monitor("vm1")
    assert await mon.run_state() == "prelaunch"
    assert await d1.vm_state("vm1") == VmState.PAUSED
    assert await d1.console("vm1") == ""
    await mon.resume()
    assert "Linux version" in await d1.console("vm1")
    assert await d1.vm_state("vm1") == VmState.RUNNING
    other = cluster.driver("h2")
    cluster.add_image("h2", LOCAL, "raw", 4 * MiB)
    with pytest.raises(VmStartError):
        await other.start_vm(spec.model_copy(update={"disks": (
            DiskSpec(path=LOCAL, format="qcow2"),)}))


async def test_a_shared_image_cannot_be_booted_twice(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_vm("h1", spec)
    assert cluster.hosts["h2"].files[SHARED] is cluster.hosts["h1"].files[SHARED]
    with pytest.raises(VmStartError):
        await cluster.driver("h2").start_vm(spec)  # the write lock
    assert cluster.hosts["h2"].vms == {}


async def test_stop_vm_acpi_and_force(cluster: FakeCluster) -> None:
    d1 = cluster.driver("h1")
    spec = vmspec()
    assert not await d1.stop_vm(spec)
    cluster.add_vm("h1", spec)
    assert await d1.stop_vm(spec)
    assert await d1.vm_state("vm1") == VmState.STOPPED
    cluster.add_vm("h1", spec, acpi=False)
    with pytest.raises(StateError):
        await d1.stop_vm(spec, timeout=5)
    assert vm(cluster, "h1").run_state == "running"
    assert await d1.stop_vm(spec, force=True)
    assert cluster.hosts["h1"].vms == {}
    assert cluster.hosts["h1"].files[SHARED].writers == set()


async def test_shutdown_action_pause_keeps_qemu_and_reset_boots_again(
        cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(workload="diskwrite", ip="10.0.0.5"))
    mon = cluster.driver("h1").monitor("vm1")
    await mon.set_shutdown_action("pause")
    await mon.powerdown()
    for _ in range(5):
        if await mon.run_state() == "shutdown":
            break
    assert await mon.run_state() == "shutdown"
    with pytest.raises(QmpCommandError):
        await mon.resume()  # a reset is required
    await mon.reset()
    assert await mon.run_state() == "prelaunch"
    await mon.resume()
    console = await cluster.driver("h1").console("vm1")
    assert console.count("Linux version") == 2 and "VMIGRATE READY ip=10.0.0.5" in console
    assert vm(cluster, "h1").memory_at_start == 0


async def test_powerdown_of_a_paused_guest_is_handled_when_it_resumes(
        cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(), running=False)
    mon = cluster.driver("h1").monitor("vm1")
    with pytest.raises(StateError):
        await cluster.driver("h1").stop_vm(vmspec())
    await mon.resume()
    cluster.advance(3)
    assert cluster.hosts["h1"].vms == {}


async def test_monitor_of_a_vm_without_a_process(cluster: FakeCluster) -> None:
    mon = cluster.driver("h1").monitor("vm1")
    with pytest.raises(QmpConnectionError):
        await mon.run_state()
    cluster.add_vm("h1", vmspec())
    assert await mon.run_state() == "running"  # connects on next use
    await mon.quit()
    assert not mon.connected and cluster.hosts["h1"].vms == {}


async def test_remove_vm_dir_of_a_running_vm_leaves_an_orphan(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(disk=None))
    await cluster.driver("h1").remove_vm_dir("vm1")
    assert not await cluster.driver("h1").vm_exists("vm1")
    assert [p.name for p in cluster.hosts["h1"].orphans] == ["vm1"]
    assert cluster.running("vm1")  # still runs: an engine bug the tests can see


async def test_images_on_a_host(cluster: FakeCluster) -> None:
    d2 = cluster.driver("h2")
    await d2.create_image(TARGET, "qcow2", 8 * MiB)
    with pytest.raises(ConflictError):
        await d2.create_image(TARGET, "raw", 8 * MiB)
    info = await d2.image_info(TARGET)
    assert info.format == "qcow2" and info.virtual_size == 8 * MiB
    free = await d2.free_bytes("/var/lib/vmigrate/images")
    await d2.remove_image(TARGET)
    assert await d2.free_bytes("/var/lib/vmigrate/images") == free + info.actual_size
    await d2.create_image(TARGET, "qcow2", 8 * MiB)
    assert await d2.missing([TARGET, "/nope"]) == ["/nope"]
    assert await d2.tls_missing() == []
    cluster.add_image("h1", LOCAL, data=b"boot sector")
    assert await cluster.driver("h1").read_head(LOCAL, 4) == b"boot"
    await d2.remove_image(TARGET)
    await d2.remove_image(TARGET)  # absent: nothing to do
    with pytest.raises(SpecError):
        await d2.image_info(TARGET)
    with pytest.raises(CommandError):
        await d2.read_head(TARGET, 1)


def test_cluster_from_an_inventory() -> None:
    inv = Inventory(hosts={"h1": host(1), "h2": host(2)})
    cluster = FakeCluster(inv, shared=())
    cluster.add_image("h1", SHARED)
    assert SHARED not in cluster.hosts["h2"].files  # nothing shared


# -- block: mirrors, exports, bitmaps -----------------------------------------------------


async def online_setup(cluster: FakeCluster) -> tuple[FakeMonitor, FakeMonitor]:
    """Source on a local disk, a held destination exporting its target disk."""
    cluster.add_image("h1", LOCAL, data={5: b"data before", 200: b"more"})
    cluster.add_vm("h1", vmspec(LOCAL))
    await cluster.driver("h2").create_image(TARGET, "raw", 16 * MiB)
    await cluster.driver("h2").start_vm(vmspec(TARGET), incoming=True, held=True)
    src, dst = mons(cluster)
    address = NbdAddress(host="10.241.1.12", port=10809)
    await dst.nbd_server_start(address)
    await dst.export_add("export-disk0", "disk0", "disk0", writable=True)
    await src.nbd_client_add("nbd-disk0", address, "disk0")
    return src, dst


async def test_mirror_reaches_ready_and_completes_identical(cluster: FakeCluster) -> None:
    src, _dst = await online_setup(cluster)
    with pytest.raises(QmpCommandError):
        await src.export_add("x", "disk0", "x", writable=True)  # no server on the source
    await src.mirror("mirror-disk0", "disk0", "nbd-disk0")
    with pytest.raises(QmpCommandError):
        await src.node_del("nbd-disk0")  # in use by the job
    first = (await src.block_jobs())[0]
    assert first.status == "running" and not first.ready and first.offset > 0
    for _ in range(100):
        job = (await src.block_jobs())[0]
        if job.ready:
            break
    assert job.status == "ready" and job.length > 16 * MiB  # the guest wrote meanwhile
    cluster.advance(10)  # more guest writes, mirrored from now on
    await src.pause()  # the switchover: the guest stops
    await src.cancel_block_job("mirror-disk0")
    job = (await src.block_jobs())[0]
    assert job.status == "concluded" and job.error is None
    source, target = cluster.hosts["h1"].files[LOCAL], cluster.hosts["h2"].files[TARGET]
    assert target.same_content(source)
    await src.dismiss_job("mirror-disk0")
    await src.node_del("nbd-disk0")
    assert cluster.lost_writes("vm1", host="h2", path=TARGET) == []


async def test_mirror_force_cancel_leaves_the_target_incomplete(
        cluster: FakeCluster) -> None:
    src, _dst = await online_setup(cluster)
    await src.mirror("m", "disk0", "nbd-disk0")
    await src.block_jobs()
    await src.cancel_block_job("m", force=True)
    job = (await src.block_jobs())[0]
    assert job.status == "concluded" and job.error is None
    source, target = cluster.hosts["h1"].files[LOCAL], cluster.hosts["h2"].files[TARGET]
    assert not target.same_content(source)
    with pytest.raises(QmpCommandError):
        await src.cancel_block_job("m")  # concluded


async def test_mirror_over_a_cut_link(cluster: FakeCluster) -> None:
    src, _dst = await online_setup(cluster)
    await src.mirror("m", "disk0", "nbd-disk0")
    await src.block_jobs()
    cluster.link_down("h1", "h2")
    stuck = (await src.block_jobs())[0]
    assert (await src.block_jobs())[0].offset == stuck.offset  # no progress, no error
    await src.cancel_block_job("m", force=True)
    assert (await src.block_jobs())[0].status == "aborting"  # in-flight I/O waits
    await cluster.driver("h1").cut_connections("10.241.1.12", 10809)
    job = (await src.block_jobs())[0]
    assert job.status == "concluded"


async def test_nbd_client_rules(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(LOCAL))
    cluster.add_vm("h2", vmspec(TARGET).model_copy(update={"name": "vm2"}))
    src = cluster.driver("h1").monitor("vm1")
    dst = cluster.driver("h2").monitor("vm2")
    address = NbdAddress(host="10.241.1.12", port=10809)
    with pytest.raises(QmpCommandError):
        await src.nbd_client_add("n", address, "disk0")  # nobody listens
    await dst.add_tls("tls0", "/var/lib/vmigrate/tls", "server")
    await dst.nbd_server_start(address, tls_id="tls0")
    with pytest.raises(QmpCommandError):
        await dst.nbd_server_start(NbdAddress(host="10.241.1.12", port=10810))  # one server
    with pytest.raises(QmpCommandError):
        await dst.export_add("e", "disk0", "disk0", writable=True)  # the guest holds disk0
    await dst.export_add("e", "disk0", "disk0", writable=False)
    with pytest.raises(QmpCommandError):
        await src.nbd_client_add("n", address, "disk0")  # TLS required
    await src.add_tls("tls0", "/var/lib/vmigrate/tls", "client")
    with pytest.raises(QmpCommandError):
        await src.nbd_client_add("n", address, "disk0", tls_id="tls0")  # read-only export
    assert "n" not in vm(cluster, "h1").nodes
    assert await cluster.driver("h1").can_reach("10.241.1.12")
    assert not await cluster.driver("h1").can_reach("192.0.2.1")


async def test_mirror_job_fails_when_its_connection_is_cut(cluster: FakeCluster) -> None:
    src, _dst = await online_setup(cluster)
    await src.mirror("m", "disk0", "nbd-disk0")
    await cluster.driver("h1").cut_connections("10.241.1.12", 10809)
    job = (await src.block_jobs())[0]
    assert job.status == "concluded" and job.error is not None


async def test_destination_cannot_take_its_disks_while_exported(
        cluster: FakeCluster) -> None:
    src, dst = await online_setup(cluster)
    await src.mirror("m", "disk0", "nbd-disk0")
    for _ in range(100):
        if (await src.block_jobs())[0].ready:
            break
    assert (await src.block_jobs())[0].ready
    await dst.set_capabilities({"late-block-activate": True})
    await src.pause()
    await src.cancel_block_job("m")
    await src.block_jobs()
    await src.dismiss_job("m")
    with pytest.raises(QmpCommandError):
        await dst.export_del("export-disk0")  # the source's client is still connected
    await src.node_del("nbd-disk0")
    # the destination is still incoming: start the RAM migration into it now
    await dst.listen(URI)
    await src.migrate(URI)
    await poll(src, {"completed"})
    assert await dst.run_state() == "paused"  # held
    with pytest.raises(QmpCommandError):
        await dst.resume()  # the writable export holds disk0
    await dst.nbd_server_stop()
    await dst.resume()
    assert await dst.run_state() == "running"
    assert cluster.lost_writes("vm1") == [] and cluster.split_brain == []


async def test_bitmaps_and_delta_copies_move_only_dirtied_blocks(
        cluster: FakeCluster) -> None:
    cluster.add_image("h1", LOCAL, data={100: b"old data"})
    cluster.add_vm("h1", vmspec(LOCAL))
    src = cluster.driver("h1").monitor("vm1")
    sock = "/var/lib/vmigrate/vms/vm1/xfer.nbd"
    await src.nbd_server_start(NbdAddress(unix=sock))
    await src.bitmaps_transaction([("disk0", "b1")])
    await src.export_add("e0", "disk0", "disk0-r0", writable=False)
    mover = cluster.mover
    base = await mover.copy(ExportEnd("h1", f"unix:{sock}", "disk0-r0"),
                            ImageEnd("h2", TARGET), SendOptions(final=False),
                            manifest="/var/lib/vmigrate/vms/vm1/m0")
    assert base.verified is None and base.data_bytes > 0
    h2 = cluster.hosts["h2"]
    assert TARGET + PARTIAL_SUFFIX in h2.files and TARGET not in h2.files
    await src.export_del("e0")
    with pytest.raises(QmpCommandError):
        await src.export_add("e1", "disk0", "disk0-r1", writable=False, bitmaps=["b1"])
    await src.bitmaps_transaction([("disk0", "b2")], disable=[("disk0", "b1")])
    dirtied = set(vm(cluster, "h1").bitmaps[("disk0", "b1")].blocks)
    assert dirtied and 100 not in dirtied
    await src.export_add("e1", "disk0", "disk0-r1", writable=False, bitmaps=["b1"])
    with pytest.raises(QmpCommandError):
        await src.remove_bitmap("disk0", "b1")  # busy: exported
    delta = await mover.copy(ExportEnd("h1", f"unix:{sock}", "disk0-r1", bitmap="b1",
                                       delta=True),
                             ImageEnd("h2", TARGET), SendOptions(final=False))
    assert delta.data_bytes == len(dirtied) * cluster.block_size
    assert delta.zero_bytes == delta.skipped_bytes == 0
    await src.export_del("e1")
    await src.remove_bitmap("disk0", "b1")
    # cutover: the guest powers off, QEMU stays with its bitmap
    await src.set_shutdown_action("pause")
    await src.powerdown()
    for _ in range(10):
        if await src.run_state() == "shutdown":
            break
    assert await src.run_state() == "shutdown"
    await src.disable_bitmap("disk0", "b2")
    await src.export_add("e2", "disk0", "disk0-r2", writable=False, bitmaps=["b2"])
    last = await mover.copy(ExportEnd("h1", f"unix:{sock}", "disk0-r2", bitmap="b2",
                                      delta=True),
                            ImageEnd("h2", TARGET), SendOptions(final=True))
    assert last.verified == "full"
    assert TARGET in h2.files and TARGET + PARTIAL_SUFFIX not in h2.files
    assert h2.files[TARGET].same_content(cluster.hosts["h1"].files[LOCAL])
    assert cluster.lost_writes("vm1", host="h2", path=TARGET) == []


async def test_bitmap_transaction_is_all_or_nothing(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(LOCAL))
    src = cluster.driver("h1").monitor("vm1")
    with pytest.raises(QmpCommandError):
        await src.bitmaps_transaction([("disk0", "a")], disable=[("disk0", "missing")])
    assert vm(cluster, "h1").bitmaps == {}
    with pytest.raises(QmpCommandError):
        await src.bitmaps_transaction([("nope", "a")])


async def test_cold_copy_partial_final_overwrite(cluster: FakeCluster) -> None:
    cluster.add_image("h1", LOCAL, size=2 * MiB, data={0: b"head", 3: b"x"})
    mover = cluster.mover
    events: list[Event] = []
    round1 = await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET),
                              SendOptions(final=False), progress=events.append)
    h2 = cluster.hosts["h2"]
    assert TARGET not in h2.files and TARGET + PARTIAL_SUFFIX in h2.files
    assert round1.data_bytes == 2 * cluster.block_size
    assert round1.zero_bytes == 2 * MiB - round1.data_bytes
    assert events[-1].done == events[-1].total == 2 * MiB
    final = await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    assert final.skipped_bytes == 2 * MiB and final.verified == "full"  # resumed: all there
    assert TARGET in h2.files and TARGET + PARTIAL_SUFFIX not in h2.files
    with pytest.raises(ConflictError):
        await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET),
                     SendOptions(overwrite=True, target_format="qcow2"))
    assert h2.files[TARGET].format == "qcow2"
    with pytest.raises(TransferError):
        await mover.copy(ImageEnd("h1", "/nope"), ImageEnd("h2", "/x"), SendOptions())
    cluster.link_down("h1", "h2")
    with pytest.raises(TransferError):
        await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", "/y"), SendOptions())
    assert "/y" + PARTIAL_SUFFIX not in h2.files


async def test_a_copy_taken_before_the_stop_misses_writes(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(LOCAL))
    await cluster.mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    cluster.advance(3)  # the guest writes on after the copy: a cold-migration bug
    await cluster.driver("h1").stop_vm(vmspec(LOCAL))
    lost = cluster.lost_writes("vm1", host="h2", path=TARGET)
    assert lost and all(w.found is None or w.found < w.seq for w in lost)
    assert cluster.lost_writes("vm1") == []  # the source image holds them all


# -- faults ---------------------------------------------------------------------------------


async def test_command_fault_changes_nothing_and_is_spent(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec())
    mon = cluster.driver("h1").monitor("vm1")
    fault = cluster.inject(Fault("command", host="h1", call="set_capabilities"))
    with pytest.raises(QmpCommandError):
        await mon.set_capabilities({"postcopy-ram": True})
    assert fault.fired == 1 and fault.spent
    assert not vm(cluster, "h1").capabilities["postcopy-ram"]
    await mon.set_capabilities({"postcopy-ram": True})
    assert vm(cluster, "h1").capabilities["postcopy-ram"]
    assert cluster.calls[-1] == ("h1", "vm1", "set_capabilities")


async def test_skip_times_and_when(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec())
    mon = cluster.driver("h1").monitor("vm1")
    armed = False
    cluster.inject(Fault("command", call="version", skip=1, times=2))
    cluster.inject(Fault("command", call="run_state", when=lambda: armed))
    results = []
    for _ in range(4):
        try:
            await mon.version()
            results.append("ok")
        except QmpCommandError:
            results.append("err")
    assert results == ["ok", "err", "err", "ok"]
    assert await mon.run_state() == "running"
    armed = True
    with pytest.raises(QmpCommandError):
        await mon.run_state()


async def test_connection_fault_before_and_after_the_effect(cluster: FakeCluster) -> None:
    spec = vmspec()
    cluster.add_image("h2", SHARED)
    await cluster.driver("h2").start_vm(spec, incoming=True)
    dst = cluster.driver("h2").monitor("vm1")
    cluster.inject(Fault("connection", call="listen"))
    with pytest.raises(QmpConnectionError):
        await dst.listen(URI)
    assert not dst.connected and vm(cluster, "h2").listen_uri is None
    cluster.inject(Fault("connection", call="listen", after=True))
    with pytest.raises(QmpConnectionError):
        await dst.listen(URI)  # it listens, but the reply was lost
    assert vm(cluster, "h2").listen_uri == URI
    with pytest.raises(QmpCommandError):
        await dst.listen(URI)  # so a retry is refused, as QEMU refuses it


async def test_driver_faults(cluster: FakeCluster) -> None:
    d2 = cluster.driver("h2")
    spec = vmspec()
    cluster.add_image("h1", SHARED)
    cluster.inject(Fault("command", host="h2", call="start_vm"))
    with pytest.raises(CommandError):
        await d2.start_vm(spec, incoming=True)
    assert cluster.hosts["h2"].vms == {}
    cluster.inject(Fault("unreachable", host="h2"))
    with pytest.raises(HostUnreachableError):
        await d2.check_reachable()
    cluster.inject(Fault("connection", host="h2", call="start_vm", after=True))
    with pytest.raises(HostUnreachableError):
        await d2.start_vm(spec, incoming=True)
    assert "vm1" in cluster.hosts["h2"].vms  # the ssh session dropped after the start
    cluster.inject(Fault("unreachable", host="h2", call="vm_state"))
    assert await d2.vm_state("vm1") == VmState.UNKNOWN
    assert await d2.vm_state("vm1") == VmState.INMIGRATE
    cluster.inject(Fault("unreachable", host="h2", side="monitor"))
    with pytest.raises(QmpConnectionError):
        await d2.monitor("vm1").run_state()
    cluster.set_reachable("h2", False)
    with pytest.raises(HostUnreachableError):
        await d2.vm_exists("vm1")
    with pytest.raises(QmpConnectionError):
        await d2.monitor("vm1").run_state()
    assert await d2.vm_state("vm1") == VmState.UNKNOWN
    cluster.set_reachable("h2", True)
    assert await d2.vm_exists("vm1")


async def test_crash_and_cancel_faults(cluster: FakeCluster) -> None:
    d2 = cluster.driver("h2")
    spec = vmspec()
    cluster.add_image("h2", SHARED)
    cluster.inject(Fault("crash", call="start_vm"))
    with pytest.raises(ControllerCrash):
        await d2.start_vm(spec, incoming=True)
    assert not issubclass(ControllerCrash, Exception)
    assert cluster.hosts["h2"].vms == {}
    cluster.inject(Fault("crash", call="start_vm", after=True))
    with pytest.raises(ControllerCrash):
        await d2.start_vm(spec, incoming=True)
    assert "vm1" in cluster.hosts["h2"].vms
    asked: list[str] = []
    cluster.inject(Fault("cancel", call="listen", on_cancel=lambda: asked.append("cancel")))
    await d2.monitor("vm1").listen(URI)  # goes on
    assert asked == ["cancel"] and vm(cluster, "h2").listen_uri == URI
    cluster.restart_controller()
    assert not d2.monitor("vm1").connected
    assert await d2.monitor("vm1").run_state() == "inmigrate"


async def test_mover_faults_and_resume(cluster: FakeCluster) -> None:
    cluster.add_image("h1", LOCAL, size=4 * MiB,
                      data={i: b"%d" % i for i in range(64)})
    mover = cluster.mover
    cluster.inject(Fault("command", call="copy"))
    with pytest.raises(TransferError):
        await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    assert TARGET + PARTIAL_SUFFIX not in cluster.hosts["h2"].files
    cluster.inject(Fault("connection", host="h2", call="copy", after=True))
    with pytest.raises(TransferError):
        await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    partial = cluster.hosts["h2"].files[TARGET + PARTIAL_SUFFIX]
    assert 0 < len(partial.blocks) < 64
    again = await mover.copy(ImageEnd("h1", LOCAL), ImageEnd("h2", TARGET), SendOptions())
    assert again.skipped_bytes > 0 and again.data_bytes < 64 * cluster.block_size
    assert cluster.hosts["h2"].files[TARGET].same_content(cluster.hosts["h1"].files[LOCAL])
    assert [c.result is not None for c in mover.copies] == [False, True]


async def test_a_lost_connection_to_the_destination_fails_the_precopy(
        cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, dirty_rate=500e6)
    await src.migration()
    await cluster.driver("h1").cut_connections("10.241.1.12", 49152)
    assert (await src.migration()).status == "failed"
    assert vm(cluster, "h1").run_state == "running" and cluster.hosts["h2"].vms == {}


async def test_killing_the_destination_after_the_switch_pauses_the_source(
        cluster: FakeCluster) -> None:
    cluster.set_link_rate("h1", "h2", 50e6)
    src, _dst = await live(cluster, dirty_rate=200e6, caps={"postcopy-ram": True})
    await src.start_postcopy()
    await cluster.driver("h2").stop_vm(vmspec(), force=True)
    assert (await src.migration()).status == "postcopy-paused"
    assert vm(cluster, "h1").run_state == "finish-migrate"  # never resumed by QEMU


# -- invariants -------------------------------------------------------------------------------


async def test_split_brain_is_detected(cluster: FakeCluster) -> None:
    src, _dst = await live(cluster, disk=None)
    await poll(src, {"completed"})
    assert cluster.split_brain == []
    await src.resume()  # QEMU lets the source run again after a completed migration
    assert [(s.vm, s.hosts) for s in cluster.split_brain] == [("vm1", ("h1", "h2"))]


async def test_resuming_the_source_on_shared_storage_is_refused(
        cluster: FakeCluster) -> None:
    src, _dst = await live(cluster)
    await poll(src, {"completed"})
    with pytest.raises(QmpCommandError):
        await src.resume()  # the destination holds the image's write lock
    assert vm(cluster, "h1").run_state == "postmigrate" and cluster.split_brain == []


async def test_guest_memory_and_time(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(disk=None, workload="memtouch"))
    await cluster.sleep(10)
    cluster.advance(9)
    source = vm(cluster, "h1")
    assert source.memory == source.acked == 10 and cluster.clock() >= 10
    assert "MEMCHECK pass=1 ok" in await cluster.driver("h1").console("vm1", lines=1)
    assert cluster.acked_writes("vm1") == {}  # no disk to write to


async def test_lost_writes_reports_a_missing_write(cluster: FakeCluster) -> None:
    cluster.add_vm("h1", vmspec(LOCAL))
    cluster.advance(20)
    acked = cluster.acked_writes("vm1")
    assert len(acked) == cluster.guest_blocks and cluster.lost_writes("vm1") == []
    image = cluster.hosts["h1"].files[LOCAL]
    block, seq = max(acked.items(), key=lambda kv: kv[1])
    image.write_block(block, guest_record("vm1", seq - cluster.guest_blocks))
    lost = cluster.lost_writes("vm1")
    assert [(w.block, w.seq, w.found) for w in lost] == [
        (block, seq, seq - cluster.guest_blocks)]
