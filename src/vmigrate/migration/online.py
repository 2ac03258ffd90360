"""Online migration: a live migration that copies the disks too (no shared storage).

The five phases of :mod:`vmigrate.migration.live`, with the disks added the way
libvirt's ``--copy-storage-all`` does, over our own checks and cleanups:

* begin: read every source image (format, virtual and allocated size), pick the
  target pool on the destination, and refuse when it lacks room or a target
  image already exists. ``pause-before-switchover`` joins the capabilities.
* prepare: create thin target images (the source format, or ``--target-format``),
  start the destination QEMU on them, and export them writable over NBD on the
  migration address, with the same x509 credentials as the RAM stream.
* perform: one ``blockdev-mirror`` per disk into the NBD export, all at once;
  sparse-aware (unallocated and zero ranges are written as zeroes, which a thin
  target keeps unallocated). Once every mirror is ready, the RAM migration runs
  under the convergence policy while the mirrors keep the disks in sync. QEMU
  pauses the source before the switchover: the mirrors are completed there
  (``block-job-cancel`` on a ready mirror syncs the rest and leaves the target
  consistent), then ``migrate-continue``.
* finish: the destination owns the disks: the VM's spec in the store points at
  them; the NBD server stops.
* confirm: the source QEMU stops; its images stay unless ``--delete-source``.

Rollback before the point of no return cancels the mirrors (if their link is
gone, their TCP connections are cut so nothing waits on it), kills the incoming
VM and deletes the target images: nothing is left on the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from dataclasses import dataclass, field, replace
from typing import Any

from vmigrate.errors import EnvironmentError_, QmpError, StateError, UserError
from vmigrate.migration.live import (
    LINK_STALL_S,
    QMP_TIMEOUT_S,
    LiveMigration,
    MigrationFailed,
    Progress,
    on_free_port,
)
from vmigrate.qemu import images, process
from vmigrate.qemu.images import ImageFormat, ImageInfo
from vmigrate.qemu.qmp import QmpSession
from vmigrate.qemu.spec import VMSpec

#: how often the mirrors are sampled while they catch up
MIRROR_SAMPLE_S = 0.5
#: how long completing the ready mirrors at the switchover may take
HANDOVER_TIMEOUT_S = 120.0
#: after a forced cancel, how long to wait before cutting the mirrors' connections
CANCEL_GRACE_S = 3.0


@dataclass(frozen=True)
class OnlineOptions:
    """What online migration adds to the live options."""

    #: destination pool name (inventory ``[hosts.X.pools]``); None: ``local``
    target_storage: str | None = None
    #: None: keep each disk's format
    target_format: ImageFormat | None = None
    #: remove the source images at confirm
    delete_source: bool = False


@dataclass
class DiskPlan:
    """One disk: where it is, where it goes, what its copy did."""

    index: int
    source: str
    info: ImageInfo
    target: str
    target_format: ImageFormat
    created: bool = False
    started: float = 0.0
    ready_s: float | None = None
    copied: int = 0
    handover_s: float | None = None

    @property
    def node(self) -> str:
        return f"disk{self.index}"

    @property
    def job(self) -> str:
        return f"mirror-{self.node}"

    @property
    def nbd_node(self) -> str:
        return f"nbd-{self.node}"


@dataclass
class _Jobs:
    """One ``query-block-jobs`` sample of our mirrors."""

    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return sum(int(j.get("offset", 0)) for j in self.by_id.values())

    @property
    def total(self) -> int:
        return sum(int(j.get("len", 0)) for j in self.by_id.values())


class OnlineMigration(LiveMigration):
    """Live migration plus the disks: see the module doc."""

    mode = "online"
    # the NBD exports hold the target disks writable: the destination QEMU may only
    # activate them (at "cont") once they are gone, so it is started with -S
    _hold_dest = True

    def __init__(self, *args: Any, online: OnlineOptions | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.online = online or OnlineOptions()
        self.report.options.update(
            target_storage=self.online.target_storage,
            target_format=self.online.target_format,
            delete_source=self.online.delete_source,
        )
        self.plans: list[DiskPlan] = []
        self._nbd_port = 0
        self._mirroring = False

    # -- begin -------------------------------------------------------------------------

    async def _check_dest_files(self) -> None:
        # the disks are created there in prepare; only a kernel must already be visible
        await process.check_files(self.dst, self.dst_cfg,
                                  self.spec.model_copy(update={"disks": ()}))

    async def _begin_storage(self) -> None:
        assert self.setup is not None
        if not self.spec.disks:
            raise UserError(f"VM {self.vm} has no disks to copy: use --mode live")
        pool_name = self.online.target_storage or "local"
        pool = self.dst_cfg.pools.get(pool_name)
        if pool is None:
            known = ", ".join(sorted(self.dst_cfg.pools)) or "none"
            raise UserError(f"host {self.dst_cfg.name} has no storage pool {pool_name!r} "
                            f"(its pools: {known})")
        plans = []
        for i, disk in enumerate(self.spec.disks):
            info = await images.image_info(self.src, disk.path)
            fmt = self.online.target_format or info.format
            if fmt not in ("raw", "qcow2"):
                raise UserError(f"disk {disk.path} is {info.format}: pass --target-format "
                                f"raw or qcow2")
            target = images.target_path(str(pool), self.vm, i, fmt)  # type: ignore[arg-type]
            if target == disk.path:
                raise UserError(f"disk {disk.path} is already in pool {pool_name!r} of "
                                f"{self.dst_cfg.name}: use --mode live (shared storage)")
            plans.append(DiskPlan(i, disk.path, info, target, fmt))  # type: ignore[arg-type]
        existing = await self.dst.run(["ls", "-d", "--", *[p.target for p in plans]],
                                      check=False)
        if existing.stdout.strip():
            raise StateError(f"target image already on {self.dst_cfg.name}: "
                             f"{', '.join(existing.stdout.split())} (remove it, or choose "
                             f"another pool with --target-storage)")
        need = sum(images.required_bytes(p.info, p.target_format) for p in plans)
        free = await images.free_bytes(self.dst, str(pool))
        if need > free:
            raise EnvironmentError_(
                f"pool {pool_name!r} on {self.dst_cfg.name} ({pool}) has {_gib(free)} free; "
                f"the disks need {_gib(need)}")
        self.plans = plans
        self.dest_spec = moved_spec(self.spec, [(p.target, p.target_format) for p in plans])
        self.setup = replace(self.setup, capabilities={
            **self.setup.capabilities, "pause-before-switchover": True,
            "late-block-activate": True})
        self._decision("storage-plan", pool=pool_name, need=need, free=free, disks=[
            {"source": p.source, "format": p.info.format, "virtual_size": p.info.virtual_size,
             "allocated": p.info.actual_size, "target": p.target,
             "target_format": p.target_format} for p in plans])

    # -- prepare -----------------------------------------------------------------------

    async def _prepare_storage(self) -> None:
        # runs after the incoming VM is killed (cleanups run newest first)
        self._cleanups.insert(len(self._cleanups) - 1,
                              ("delete the target images on the destination",
                               self._remove_targets))
        for p in self.plans:
            await images.create_image(self.dst, p.target, p.target_format,
                                      p.info.virtual_size)
            p.created = True

    async def _remove_targets(self) -> None:
        for p in self.plans:
            if p.created:
                await images.remove_image(self.dst, p.target)
                p.created = False

    async def _export_storage(self, qmp: QmpSession) -> None:
        addr = self.dst_cfg.migration_address
        args: dict[str, Any] = {}
        if self.opts.tls:
            args["tls-creds"] = self._tls_id

        async def start(port: int) -> None:
            await qmp.execute("nbd-server-start", {
                "addr": {"type": "inet", "data": {"host": addr, "port": str(port)}}, **args})

        self._nbd_port = await on_free_port(start)
        for p in self.plans:
            await qmp.execute("block-export-add", {
                "type": "nbd", "id": f"export-{p.node}", "node-name": p.node,
                "name": p.node, "writable": True})
        self._decision("nbd-export", address=addr, port=self._nbd_port,
                       exports=[p.node for p in self.plans], tls=self.opts.tls)

    # -- perform -----------------------------------------------------------------------

    async def _start_storage(self, qmp: QmpSession) -> None:
        self._cleanups.append(("stop the disk mirrors on the source", self._cancel_mirrors))
        server = {"type": "inet", "host": self.dst_cfg.migration_address,
                  "port": str(self._nbd_port)}
        for p in self.plans:
            # discard=unmap: the mirror writes holes as zeroes that may unmap
            node: dict[str, Any] = {"driver": "nbd", "node-name": p.nbd_node,
                                    "server": server, "export": p.node, "discard": "unmap"}
            if self.opts.tls:
                node["tls-creds"] = self._tls_id
            await qmp.execute("blockdev-add", node)
        self._mirroring = True
        t0 = time.monotonic()
        for p in self.plans:
            await qmp.execute("blockdev-mirror", {
                "job-id": p.job, "device": p.node, "target": p.nbd_node, "sync": "full",
                "auto-dismiss": False})
            p.started = time.monotonic()
        self._decision("mirror", jobs=[p.job for p in self.plans])
        last_done, last_move = -1, t0
        while True:
            self._check_cancel()
            jobs = await self._jobs(qmp)
            now = time.monotonic()
            for p in self.plans:
                job = jobs.by_id[p.job]
                p.copied = int(job.get("offset", 0))
                if job.get("ready") and p.ready_s is None:
                    p.ready_s = round(now - p.started, 3)
            self.on_progress(Progress("perform", disk=(jobs.done, jobs.total),
                                      step="copying disks"))
            if all(p.ready_s is not None for p in self.plans):
                break
            if jobs.done != last_done:
                last_done, last_move = jobs.done, now
            elif now - last_move > LINK_STALL_S:
                raise MigrationFailed(
                    f"the disk copy stalled: no byte moved for {now - last_move:.0f}s (is the "
                    f"link between {self.src_cfg.name} and {self.dst_cfg.name} down?)")
            await asyncio.sleep(MIRROR_SAMPLE_S)
        self._decision("mirrors-ready", disks=[
            {"job": p.job, "bytes": p.copied, "ready_s": p.ready_s} for p in self.plans])

    async def _jobs(self, qmp: QmpSession) -> _Jobs:
        """Our mirrors now; :class:`MigrationFailed` when one has ended on its own."""
        reply = await qmp.execute("query-block-jobs", timeout=QMP_TIMEOUT_S)
        jobs = _Jobs({j["device"]: j for j in reply if isinstance(j, dict) and "device" in j})
        for p in self.plans:
            job = jobs.by_id.get(p.job)
            if job is None:
                raise MigrationFailed(f"the copy of disk {p.source} ended unexpectedly")
            if job.get("status") in ("concluded", "null", "aborting") or job.get("error"):
                reason = job.get("error") or f"job {job.get('status')}"
                raise MigrationFailed(f"the copy of disk {p.source} to {self.dst_cfg.name} "
                                      f"failed: {reason}")
        return jobs

    async def _watch_storage(self, qmp: QmpSession) -> None:
        if self._mirroring:
            await self._jobs(qmp)

    async def _switchover(self, qmp: QmpSession) -> None:
        """The source is paused before the switchover: complete every ready mirror
        (the rest is synced; the target stays consistent), then let QEMU switch."""
        t0 = time.monotonic()
        for p in self.plans:
            await qmp.execute("block-job-cancel", {"device": p.job})
        deadline = t0 + HANDOVER_TIMEOUT_S
        pending = {p.job: p for p in self.plans}
        while pending:
            reply = await qmp.execute("query-block-jobs", timeout=QMP_TIMEOUT_S)
            for job in reply:
                plan = pending.get(job.get("device", ""))
                if plan is None or job.get("status") != "concluded":
                    continue
                if job.get("error"):
                    raise MigrationFailed(f"completing the copy of disk {plan.source} "
                                          f"failed: {job['error']}")
                plan.copied = int(job.get("offset", plan.copied))
                plan.handover_s = round(time.monotonic() - t0, 3)
                await qmp.execute("job-dismiss", {"id": plan.job})
                del pending[plan.job]
            if pending and time.monotonic() > deadline:
                raise MigrationFailed(f"the disk mirrors did not complete within "
                                      f"{HANDOVER_TIMEOUT_S:.0f}s at the switchover")
            if pending:  # the guest is paused: every millisecond here is downtime
                await asyncio.sleep(0.01)
        self._mirroring = False
        for p in self.plans:
            with contextlib.suppress(QmpError):
                await qmp.execute("blockdev-del", {"node-name": p.nbd_node})
        self._decision("disks-handed-over", handover_ms=round((time.monotonic() - t0) * 1000))
        await qmp.execute("migrate-continue", {"state": "pre-switchover"})

    async def _cancel_mirrors(self) -> None:
        """Rollback on the source: stop the mirrors without waiting on a dead link,
        then remove the NBD client nodes. The source disks are never touched."""
        qmp = self.src_qmp
        if qmp is None:
            return
        ours = {p.job for p in self.plans}
        for job in ours:
            with contextlib.suppress(QmpError):
                await qmp.execute("block-job-cancel", {"device": job, "force": True})
        if not await self._wait_jobs_gone(qmp, ours, CANCEL_GRACE_S):
            # in-flight NBD requests wait on a link that is gone: cut the connections
            await self.src.sh(
                f"ss -K dst {shlex.quote(str(self.dst_cfg.migration_address))} "
                f"dport = :{int(self._nbd_port)} >/dev/null", check=False)
            if not await self._wait_jobs_gone(qmp, ours, 30):
                raise MigrationFailed("the disk mirrors did not stop on the source")
        self._mirroring = False
        for p in self.plans:
            with contextlib.suppress(QmpError):
                await qmp.execute("blockdev-del", {"node-name": p.nbd_node})

    @staticmethod
    async def _wait_jobs_gone(qmp: QmpSession, ids: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            reply = await qmp.execute("query-block-jobs", timeout=QMP_TIMEOUT_S)
            left = [j for j in reply if j.get("device") in ids]
            for job in left:
                if job.get("status") == "concluded":
                    with contextlib.suppress(QmpError):
                        await qmp.execute("job-dismiss", {"id": job["device"]})
            if not [j for j in left if j.get("status") != "concluded"]:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)

    # -- finish and confirm --------------------------------------------------------------

    async def _finish_storage(self) -> None:
        self.store.move_vm(self.vm, self.dst_cfg.name, self.dest_spec.model_dump_json())
        for p in self.plans:
            p.created = False  # the VM's disks now: never deleted by a cleanup
        self.report.disks = [_disk_entry(p) for p in self.plans]

    async def _release_dest(self) -> None:
        """Close the exports, then let the guest run: "cont" activates its disks."""
        assert self.dst_qmp is not None
        if self._nbd_port:
            await self.dst_qmp.execute("nbd-server-stop")
            self._nbd_port = 0
        await super()._release_dest()

    async def _confirm_storage(self) -> None:
        for entry, p in zip(self.report.disks, self.plans, strict=True):
            if self.online.delete_source:
                await images.remove_image(self.src, p.source)
                entry["source_deleted"] = True
            else:
                entry["source_deleted"] = False
        if self.online.delete_source:
            self._decision("source-images-deleted", paths=[p.source for p in self.plans])


def moved_spec(spec: VMSpec, targets: list[tuple[str, str]]) -> VMSpec:
    """``spec`` with its disks at ``targets`` (path, format), in order."""
    return spec.model_copy(update={"disks": tuple(
        d.model_copy(update={"path": path, "format": fmt})
        for d, (path, fmt) in zip(spec.disks, targets, strict=True))})


def _disk_entry(p: DiskPlan) -> dict[str, Any]:
    # the mirror's byte count includes the holes it skipped: the throughput is that of
    # the data (what the source had allocated), which is what crossed the link
    mbps = None
    if p.ready_s:
        mbps = round(min(p.copied, p.info.actual_size) * 8 / p.ready_s / 1e6, 1)
    # on the wire: the data, plus what the guest rewrote during the copy (the mirror's
    # count beyond one pass over the disk); holes travel as zero-write requests
    wire = p.info.actual_size + max(0, p.copied - p.info.virtual_size)
    return {
        "source": p.source, "format": p.info.format, "virtual_size": p.info.virtual_size,
        "source_allocated": p.info.actual_size, "target": p.target,
        "target_format": p.target_format, "bytes": p.copied, "wire_bytes": wire,
        "ready_s": p.ready_s,
        "handover_s": p.handover_s, "mirror_mbps": mbps,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
