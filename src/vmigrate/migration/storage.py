"""Storage strategies: what happens to a VM's disks while it moves.

=========  ==========================================================  =============
strategy   the disks                                                   modes
=========  ==========================================================  =============
shared     stay where they are: both hosts see the same files          live
mirror     copied by the source QEMU into NBD exports of the            online
           destination QEMU while the guest runs (``blockdev-mirror``),
           completed while the source is paused before the switchover
copy       copied by the transfer engine after the guest stopped        cold
rounds     a base copy and incremental rounds from dirty bitmaps while  warm
           the guest runs, the last delta after it stopped
=========  ==========================================================  =============

What couples a storage strategy to the memory strategy is data on the strategy,
not overrides: :attr:`~StorageStrategy.capabilities` (the mirror needs QEMU to
pause before the switchover, and the destination to activate its disks late),
:attr:`~StorageStrategy.holds_destination` (the mirror's exports hold the target
disks writable: the destination QEMU starts with ``-S`` and runs only after
:meth:`~StorageStrategy.release`), :attr:`~StorageStrategy.keeps_source` (rounds
read the last delta through the source QEMU after the guest powered off).

Each hook is idempotent where it can run again after a crash (``moved``,
``release``, ``confirm``); what a hook allocates it registers first as an undo
(``job.register``), released by the undo actions at the end of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

from vmigrate.drivers.base import BlockJob, NbdAddress
from vmigrate.errors import (
    ConflictError,
    EnvironmentError_,
    MigrationFailed,
    QmpCommandError,
    QmpError,
    UserError,
    VmigrateError,
)
from vmigrate.migration.job import Job, undo_action
from vmigrate.migration.report import DiskFigures, StepEntry
from vmigrate.migration.state import DiskState, StorageKind
from vmigrate.progress import Event
from vmigrate.qemu import images
from vmigrate.qemu.images import ImageFormat
from vmigrate.qemu.spec import VMSpec
from vmigrate.transfer.mover import (
    PARTIAL_SUFFIX,
    CopyResult,
    ExportEnd,
    ImageEnd,
    SendOptions,
)

#: warm: cut over once a round sent at most this many bytes ...
SMALL_DELTA = 32 << 20
#: ... or after this many rounds
MAX_ROUNDS = 8


def moved_spec(spec: VMSpec, targets: list[tuple[str, str]]) -> VMSpec:
    """``spec`` with its disks at ``targets`` (path, format), in order."""
    return spec.model_copy(update={"disks": tuple(
        d.model_copy(update={"path": path, "format": fmt})
        for d, (path, fmt) in zip(spec.disks, targets, strict=True))})


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _figures(d: DiskState) -> DiskFigures:
    return DiskFigures(source=d.source, format=d.format, virtual_size=d.virtual_size,
                       source_allocated=d.allocated, target=d.target,
                       target_format=d.target_format)


class StorageStrategy:
    """What happens to the disks (see the module doc). Hooks do nothing by default."""

    kind: ClassVar[StorageKind]
    #: the destination QEMU starts held (-S) and runs only after :meth:`release`
    holds_destination: ClassVar[bool] = False
    #: migration capabilities the memory migration needs on both sides
    capabilities: ClassVar[Mapping[str, bool]] = {}
    #: offline: the source QEMU stays after the guest powered off, until confirm
    keeps_source: ClassVar[bool] = False

    async def begin(self, job: Job) -> None:
        """Inspect the disks and plan where they go (nothing is allocated)."""

    async def prepare(self, job: Job) -> None:
        """Allocate on the destination (and the source) what the copy needs."""

    async def export(self, job: Job) -> None:
        """Pre-copy, the destination QEMU started: open its disks to the source."""

    async def start(self, job: Job) -> None:
        """Perform, while the guest still runs on the source: copy what can be."""

    async def watch(self, job: Job) -> None:
        """Pre-copy, every sample: raise if the disk copy failed."""

    async def switchover(self, job: Job) -> None:
        """Pre-copy, the source paused before the switchover: hand the disks over."""

    async def final(self, job: Job) -> None:
        """Offline, the guest stopped on the source: copy what is left."""

    async def release(self, job: Job) -> None:
        """Before the destination guest may run: let go of its disks."""

    async def moved(self, job: Job) -> None:
        """After the point of no return: the VM's home is the destination, with its
        disks where they are now (idempotent)."""
        if not job.state.vm_moved:
            job.store.move_vm(job.vm, job.state.dest, job.state.dest_spec.model_dump_json())
            job.state.vm_moved = True
            job.save()

    async def confirm(self, job: Job) -> None:
        """The source stopped for good: release its disks (delete them if asked)."""


class Shared(StorageStrategy):
    """Both hosts see the same disk files; nothing moves."""

    kind = "shared"

    async def begin(self, job: Job) -> None:
        spec = job.state.spec
        needed = [d.path for d in spec.disks]
        if spec.kernel is not None:
            needed += [spec.kernel.kernel] + ([spec.kernel.initrd] if spec.kernel.initrd else [])
        missing = await job.dst.missing(needed)
        if missing:
            raise UserError(f"not found on host {job.dst.name}: {', '.join(missing)} (live "
                            "migration needs storage both hosts see: use --mode online)")


class _Moving(StorageStrategy):
    """The disks move into a pool of the destination (mirror, copy, rounds)."""

    async def begin(self, job: Job) -> None:
        await self._check_kernel(job)
        await plan_disks(job, resume=self.kind != "mirror")

    @staticmethod
    async def _check_kernel(job: Job) -> None:
        kernel = job.state.spec.kernel
        if kernel is not None:
            files = [kernel.kernel] + ([kernel.initrd] if kernel.initrd else [])
            missing = await job.dst.missing(files)
            if missing:
                raise UserError(f"not found on host {job.dst.name}: {', '.join(missing)}")

    async def moved(self, job: Job) -> None:
        if job.state.undo_for("remove-targets") is not None:
            job.forget("remove-targets")  # the VM's disks now: never deleted by a rollback
        for d in job.state.disks:
            d.created = False
        await super().moved(job)

    async def confirm(self, job: Job) -> None:
        if not job.opts.delete_source:
            return
        for d, fig in zip(job.state.disks, job.report.disks, strict=False):
            await job.src.remove_image(d.source)
            fig.source_deleted = True
        job.decision("source-images-deleted", paths=[d.source for d in job.state.disks])


async def plan_disks(job: Job, *, resume: bool) -> None:
    """Where each disk goes in the destination pool; refuse what cannot work before
    anything is allocated: no disks, an unknown pool, a format we cannot write, a
    target already there, not enough room. ``resume``: partial copies of an earlier
    attempt are fine (the transfer resumes them)."""
    st = job.state
    spec = st.spec
    if not spec.disks:
        raise UserError(f"VM {job.vm} has no disks to copy: use --mode live")
    pool_name = job.opts.target_storage or "local"
    pool = job.dst.config.pools.get(pool_name)
    if pool is None:
        known = ", ".join(sorted(job.dst.config.pools)) or "none"
        raise UserError(f"host {job.dst.name} has no storage pool {pool_name!r} "
                        f"(its pools: {known})")
    disks: list[DiskState] = []
    need = 0
    for i, disk in enumerate(spec.disks):
        info = await job.src.image_info(disk.path)
        fmt: ImageFormat
        if job.opts.target_format is not None:
            fmt = job.opts.target_format
        elif info.format in ("raw", "qcow2"):
            fmt = info.format  # type: ignore[assignment]
        else:
            raise UserError(f"disk {disk.path} is {info.format}: pass --target-format raw or "
                            "qcow2")
        target = images.target_path(str(pool), job.vm, i, fmt)
        if target == disk.path:
            raise UserError(f"disk {disk.path} is already in pool {pool_name!r} of "
                            f"{job.dst.name}: use --mode live (shared storage)")
        need += images.required_bytes(info, fmt)
        disks.append(DiskState(index=i, node=job.src.disk_node(i), source=disk.path,
                               format=info.format, virtual_size=info.virtual_size,
                               allocated=info.actual_size, target=target,
                               target_format=fmt))
    absent = set(await job.dst.missing([d.target for d in disks]))
    there = [d.target for d in disks if d.target not in absent]
    if there:
        raise ConflictError(f"target image already on {job.dst.name}: {', '.join(there)} "
                            "(remove it, or choose another pool with --target-storage)")
    free = await job.dst.free_bytes(str(pool))
    if need > free:
        raise EnvironmentError_(f"pool {pool_name!r} on {job.dst.name} ({pool}) has "
                                f"{_gib(free)} free; the disks need {_gib(need)}")
    st.disks = disks
    st.dest_spec = moved_spec(spec, [(d.target, d.target_format) for d in disks])
    job.report.disks = [_figures(d) for d in disks]
    job.save()
    partial = []
    if resume:
        absent_partials = set(await job.dst.missing([d.target + PARTIAL_SUFFIX for d in disks]))
        partial = [d.target for d in disks if d.target + PARTIAL_SUFFIX not in absent_partials]
    job.decision("storage-plan", pool=pool_name, need=need, free=free, resumes=partial,
                 disks=[{"source": d.source, "format": d.format,
                         "virtual_size": d.virtual_size, "allocated": d.allocated,
                         "target": d.target, "target_format": d.target_format}
                        for d in disks])


# -- mirror (online) ---------------------------------------------------------------------


async def on_free_port(start: Callable[[int], Awaitable[None]], *, tries: int = 5,
                       low: int = 49152, high: int = 60999) -> int:
    """Call ``start(port)`` with random ports until one is not refused (taken); return
    it, or raise the last refusal."""
    import random

    last: QmpError | None = None
    for _ in range(tries):
        port = random.randint(low, high)
        try:
            await start(port)
            return port
        except QmpError as exc:  # port taken: try another
            last = exc
    assert last is not None
    raise last


def _job_id(d: DiskState) -> str:
    return f"mirror-{d.node}"


def _nbd_node(d: DiskState) -> str:
    return f"nbd-{d.node}"


class Mirror(_Moving):
    """QEMU mirrors every disk into an NBD export of the destination QEMU while the
    guest runs; the mirrors complete at the switchover, with the source paused."""

    kind = "mirror"
    holds_destination = True
    capabilities: ClassVar[Mapping[str, bool]] = {"pause-before-switchover": True,
                                                  "late-block-activate": True}

    def __init__(self) -> None:
        self._started: dict[int, float] = {}

    async def prepare(self, job: Job) -> None:
        job.register("remove-targets")  # every planned target: none existed at begin
        for d in job.state.disks:
            await job.dst.create_image(d.target, d.target_format, d.virtual_size)
            d.created = True
            job.save()

    async def export(self, job: Job) -> None:
        mon = job.dst_monitor()
        addr = job.dst.config.migration_address
        tls = job.state.tls_id if job.opts.tls else None
        # TLS: only the source's client certificate may connect (tls-authz). Without TLS
        # (--insecure) QEMU cannot tell clients apart: the server takes no more clients
        # than the source's (one per disk), so none once the source is connected
        authz = job.state.authz_id if job.opts.tls else None
        limit = None if job.opts.tls else len(job.state.disks)

        async def start(port: int) -> None:
            await mon.nbd_server_start(NbdAddress(host=addr, port=port), tls_id=tls,
                                       tls_authz=authz, max_connections=limit)

        job.state.nbd_port = await on_free_port(start)
        job.save()
        for d in job.state.disks:
            await mon.export_add(f"export-{d.node}", d.node, d.node, writable=True)
        job.decision("nbd-export", address=addr, port=job.state.nbd_port,
                     exports=[d.node for d in job.state.disks], tls=job.opts.tls,
                     authz=job.state.tls_authz if job.opts.tls else None,
                     max_connections=limit)

    async def start(self, job: Job) -> None:
        mon = job.src_monitor()
        st = job.state
        assert st.nbd_port is not None
        job.register("cancel-mirrors")
        address = NbdAddress(host=job.dst.config.migration_address, port=st.nbd_port)
        tls = st.tls_id if job.opts.tls else None
        for d in st.disks:
            await mon.nbd_client_add(_nbd_node(d), address, d.node, tls_id=tls)
        t0 = time.monotonic()
        # the operator's (or the wave's) bandwidth caps the disks' copy as it caps memory's,
        # shared out between the disks
        speed = (max(1, int(job.opts.bandwidth) // max(1, len(st.disks)))
                 if job.opts.bandwidth else None)
        for d in st.disks:
            await mon.mirror(_job_id(d), d.node, _nbd_node(d), speed=speed)
            self._started[d.index] = time.monotonic()
        job.decision("mirror", jobs=[_job_id(d) for d in st.disks])
        job.say("copying disks")
        last_done, last_move = -1, t0
        while True:
            job.check_cancel()
            jobs = await self._jobs(job)
            now = time.monotonic()
            done = total = 0
            for d, fig in zip(st.disks, job.report.disks, strict=True):
                bj = jobs[_job_id(d)]
                done, total = done + bj.offset, total + bj.length
                fig.data_bytes = min(bj.offset, d.allocated)
                if bj.ready and fig.ready_s is None:
                    fig.ready_s = fig.seconds = round(now - self._started[d.index], 3)
            job.progress(Event(phase="perform", step="copying disks", done=done, total=total))
            if all(f.ready_s is not None for f in job.report.disks):
                break
            if done != last_done:
                last_done, last_move = done, now
            elif now - last_move > job.timing.link_stall_s:
                raise MigrationFailed(
                    f"the disk copy stalled: no byte moved for {now - last_move:.0f}s (is the "
                    f"link between {job.src.name} and {job.dst.name} down?)")
            await asyncio.sleep(job.timing.mirror_sample_s)
        job.decision("mirrors-ready", disks=[
            {"job": _job_id(d), "bytes": bj, "ready_s": f.ready_s}
            for d, f, bj in zip(st.disks, job.report.disks,
                                (jobs[_job_id(d)].offset for d in st.disks), strict=True)])

    async def _jobs(self, job: Job) -> dict[str, BlockJob]:
        """Our mirrors now; :class:`MigrationFailed` when one has ended on its own."""
        jobs = {j.id: j for j in await job.src_monitor().block_jobs(
            timeout=job.timing.qmp_timeout_s)}
        for d in job.state.disks:
            bj = jobs.get(_job_id(d))
            if bj is None:
                raise MigrationFailed(f"the copy of disk {d.source} ended unexpectedly")
            if bj.status in ("concluded", "null", "aborting") or bj.error:
                raise MigrationFailed(f"the copy of disk {d.source} to {job.dst.name} "
                                      f"failed: {bj.error or 'job ' + bj.status}")
        return jobs

    async def watch(self, job: Job) -> None:
        if job.state.undo_for("cancel-mirrors") is not None:
            await self._jobs(job)

    async def switchover(self, job: Job) -> None:
        """Complete every ready mirror (the rest is synced, the target consistent)."""
        mon = job.src_monitor()
        st = job.state
        t0 = time.monotonic()
        for d in st.disks:
            await mon.cancel_block_job(_job_id(d))
        deadline = t0 + job.timing.handover_timeout_s
        pending = {_job_id(d): (d, f) for d, f in zip(st.disks, job.report.disks, strict=True)}
        while pending:
            for bj in await mon.block_jobs(timeout=job.timing.qmp_timeout_s):
                entry = pending.get(bj.id)
                if entry is None or bj.status != "concluded":
                    continue
                d, fig = entry
                if bj.error:
                    raise MigrationFailed(f"completing the copy of disk {d.source} failed: "
                                          f"{bj.error}")
                fig.handover_s = round(time.monotonic() - t0, 3)
                # on the wire: the data, plus what the guest rewrote during the copy (the
                # mirror's count beyond one pass); holes travel as zero-write requests
                fig.wire_bytes = d.allocated + max(0, bj.offset - d.virtual_size)
                fig.data_bytes = min(bj.offset, d.allocated)
                fig.verified = "mirror"
                if fig.ready_s:
                    fig.mbps = round(fig.data_bytes * 8 / fig.ready_s / 1e6, 1)
                await mon.dismiss_job(bj.id)
                del pending[bj.id]
            if pending and time.monotonic() > deadline:
                raise MigrationFailed(f"the disk mirrors did not complete within "
                                      f"{job.timing.handover_timeout_s:.0f}s at the switchover")
            if pending:  # the guest is paused: every millisecond here is downtime
                await asyncio.sleep(0.01)
        job.forget("cancel-mirrors")
        for d in st.disks:
            with contextlib.suppress(QmpError):
                await mon.node_del(_nbd_node(d))
        job.decision("disks-handed-over", handover_ms=round((time.monotonic() - t0) * 1000))

    async def release(self, job: Job) -> None:
        if job.state.nbd_port is None:
            return
        try:
            await job.dst_monitor().nbd_server_stop()
        except QmpCommandError:
            # not running any more (stopped before a lost reply): if it still runs,
            # resuming the guest fails, and this is tried again
            return
        job.state.nbd_port = None
        job.save()


# -- copy (cold) and rounds (warm) -------------------------------------------------------


def _send_opts(job: Job, fmt: str, *, final: bool) -> SendOptions:
    return SendOptions(target_format=fmt, cipher=job.opts.cipher,
                       compress=job.opts.compress_disks,
                       bandwidth=float(job.opts.bandwidth) if job.opts.bandwidth else None,
                       final=final)


async def _copy_all(job: Job, label: str,
                    one: Callable[[DiskState, Callable[[Event], None]], Awaitable[CopyResult]],
                    *, final: bool) -> list[CopyResult]:
    """One transfer per disk, all at once, with one progress line; the figures add up
    in the report."""
    done: dict[int, tuple[int, int]] = {}

    def progress_for(i: int) -> Callable[[Event], None]:
        def cb(ev: Event) -> None:
            done[i] = (ev.done or 0, ev.total or 0)
            job.progress(Event(phase="perform", step=label,
                               done=sum(v[0] for v in done.values()),
                               total=sum(v[1] for v in done.values())))
        return cb

    job.say(label)
    t0 = time.monotonic()
    outs = list(await asyncio.gather(*(one(d, progress_for(d.index))
                                       for d in job.state.disks)))
    for d, fig, o in zip(job.state.disks, job.report.disks, outs, strict=True):
        fig.data_bytes += o.data_bytes
        fig.wire_bytes += o.wire_bytes
        fig.resent_bytes += o.resent_bytes
        fig.seconds = round((fig.seconds or 0.0) + o.seconds, 3)
        if final:
            fig.zero_bytes, fig.skipped_bytes, fig.verified = (o.zero_bytes, o.skipped_bytes,
                                                               o.verified)
            d.created = True
        if fig.seconds:
            fig.mbps = round(fig.data_bytes * 8 / fig.seconds / 1e6, 1)
    job.save()
    job.decision("copied", step=label, seconds=round(time.monotonic() - t0, 2),
                 disks=[{"target": d.target, "data_bytes": o.data_bytes,
                         "wire_bytes": o.wire_bytes, "verified": o.verified}
                        for d, o in zip(job.state.disks, outs, strict=True)])
    return outs


class Copy(_Moving):
    """The transfer engine copies every disk once the guest stopped."""

    kind = "copy"

    async def prepare(self, job: Job) -> None:
        job.register("remove-targets")  # finished copies; partial ones stay for a resume

    async def final(self, job: Job) -> None:
        async def one(d: DiskState, cb: Callable[[Event], None]) -> CopyResult:
            return await job.mover.copy(
                ImageEnd(job.src.name, d.source, d.format), ImageEnd(job.dst.name, d.target),
                _send_opts(job, d.target_format, final=True), progress=cb)

        await _copy_all(job, "copying the disks", one, final=True)


class Rounds(_Moving):
    """Base copy and incremental rounds from dirty bitmaps while the guest runs; the
    last delta after it powered off (its QEMU stays, paused, with its bitmaps)."""

    kind = "rounds"
    keeps_source = True

    async def begin(self, job: Job) -> None:
        await super().begin(job)
        job.state.source_kept = True
        job.save()

    async def prepare(self, job: Job) -> None:
        job.register("remove-targets")
        job.state.source_nbd = f"{job.src.runtime_dir(job.vm)}/xfer.nbd"
        job.register("drop-tracking")
        await job.src_monitor().nbd_server_start(NbdAddress(unix=job.state.source_nbd))

    def _manifest(self, job: Job, d: DiskState) -> str:
        return f"{job.src.runtime_dir(job.vm)}/xfer-{d.node}.manifest"

    async def _new_bitmap(self, job: Job) -> None:
        """Start tracking into a fresh bitmap; freeze the previous one (one
        transaction, so no write falls between them)."""
        st = job.state
        prev = st.bitmaps
        st.bitmaps += 1
        job.save()
        await job.src_monitor().bitmaps_transaction(
            [(d.node, f"vmx{st.bitmaps}") for d in st.disks],
            [(d.node, f"vmx{prev}") for d in st.disks] if prev else [])

    async def _round(self, job: Job, label: str, *, bitmap: int | None,
                     final: bool) -> int:
        """One copy of every disk: whole (bitmap None) or what bitmap ``bitmap`` marks;
        returns the data bytes sent."""
        mon = job.src_monitor()
        st = job.state
        tag = f"r{bitmap or 0}"
        for d in st.disks:
            await mon.export_add(f"xfer-{d.node}-{tag}", d.node, f"{d.node}-{tag}",
                                 writable=False,
                                 bitmaps=[f"vmx{bitmap}"] if bitmap is not None else ())
        t0 = time.monotonic()
        try:
            async def one(d: DiskState, cb: Callable[[Event], None]) -> CopyResult:
                assert st.source_nbd is not None
                src = ExportEnd(job.src.name, f"unix:{st.source_nbd}", f"{d.node}-{tag}",
                                bitmap=f"vmx{bitmap}" if bitmap is not None else None,
                                delta=bitmap is not None)
                return await job.mover.copy(src, ImageEnd(job.dst.name, d.target),
                                            _send_opts(job, d.target_format, final=final),
                                            manifest=self._manifest(job, d), progress=cb)

            outs = await _copy_all(job, label, one, final=final)
        finally:
            for d in st.disks:
                with contextlib.suppress(VmigrateError):
                    await mon.export_del(f"xfer-{d.node}-{tag}")
        if bitmap is not None:
            for d in st.disks:
                await mon.remove_bitmap(d.node, f"vmx{bitmap}")
        sent = sum(o.data_bytes for o in outs)
        job.report.steps.append(StepEntry(
            t=round(time.monotonic() - t0, 2), iteration=len(job.report.steps),
            action="round", detail=f"{label}: {sent} bytes in {time.monotonic() - t0:.1f}s"))
        return sent

    async def start(self, job: Job) -> None:
        await self._new_bitmap(job)
        await self._round(job, "base copy", bitmap=None, final=False)
        cutover = job.opts.cutover_at
        while True:
            job.check_cancel()
            waiting = cutover is not None and time.time() < cutover
            await self._new_bitmap(job)
            sent = await self._round(job, f"round {len(job.report.steps)}",
                                     bitmap=job.state.bitmaps - 1, final=False)
            if waiting:
                assert cutover is not None
                await asyncio.sleep(min(job.timing.round_pause_s,
                                        max(0.0, cutover - time.time())))
                continue
            if sent <= SMALL_DELTA or len(job.report.steps) > MAX_ROUNDS:
                job.decision("cutover", last_round_bytes=sent, rounds=len(job.report.steps))
                return

    async def final(self, job: Job) -> None:
        # the bitmap tracking since the last round holds every write up to the stop;
        # frozen (nothing writes any more), it can be exported
        for d in job.state.disks:
            await job.src_monitor().disable_bitmap(d.node, f"vmx{job.state.bitmaps}")
        await self._round(job, "last delta", bitmap=job.state.bitmaps, final=True)


STORAGE: dict[StorageKind, type[StorageStrategy]] = {
    "shared": Shared, "mirror": Mirror, "copy": Copy, "rounds": Rounds}


# -- undo actions ------------------------------------------------------------------------


@undo_action("remove-targets")
async def _remove_targets(job: Job, _args: Mapping[str, Any]) -> None:
    """Delete every planned target under its final name (none existed at begin, so
    each is ours); partial copies and their journals stay for a resume."""
    targets = [d.target for d in job.state.disks]
    if not targets:
        return
    present = set(targets) - set(await job.dst.missing(targets))
    for path in sorted(present):
        await job.dst.remove_image(path)
    for d in job.state.disks:
        d.created = False
    partial = [t + PARTIAL_SUFFIX for t in targets]
    kept = sorted(set(partial) - set(await job.dst.missing(partial)))
    if kept:
        job.decision("partial-copies-kept", paths=kept,
                     note="running the migration again resumes these transfers")


@undo_action("cancel-mirrors")
async def _cancel_mirrors(job: Job, _args: Mapping[str, Any]) -> None:
    """Stop the mirrors on the source without waiting on a dead link, then remove the
    NBD client nodes. The source disks are never touched."""
    if not await job.src.vm_exists(job.vm):
        return
    mon = job.src_monitor()
    ours = {_job_id(d) for d in job.state.disks}
    for jid in ours:
        with contextlib.suppress(QmpError):
            await mon.cancel_block_job(jid, force=True)

    async def gone() -> bool:
        left = [j for j in await mon.block_jobs() if j.id in ours]
        for j in left:
            if j.status == "concluded":
                with contextlib.suppress(QmpError):
                    await mon.dismiss_job(j.id)
        return not [j for j in left if j.status != "concluded"]

    if not await job.wait_until(gone, job.timing.cancel_grace_s):
        # in-flight NBD requests wait on a link that is gone: cut the connections
        if job.dst.config.migration_address and job.state.nbd_port:
            await job.src.cut_connections(job.dst.config.migration_address, job.state.nbd_port)
        if not await job.wait_until(gone, job.timing.cancel_wait_s):
            raise MigrationFailed("the disk mirrors did not stop on the source")
    for d in job.state.disks:
        with contextlib.suppress(QmpError):
            await mon.node_del(_nbd_node(d))


@undo_action("drop-tracking")
async def _drop_tracking(job: Job, _args: Mapping[str, Any]) -> None:
    """Warm: remove the dirty bitmaps, the NBD server and the shutdown action from the
    source QEMU (each on its own: one that fails does not keep the others)."""
    if not await job.src.vm_exists(job.vm):
        return
    mon = job.src_monitor()
    for d in job.state.disks:
        for n in range(1, job.state.bitmaps + 1):
            with contextlib.suppress(QmpError):
                await mon.remove_bitmap(d.node, f"vmx{n}")
    with contextlib.suppress(QmpError):
        await mon.nbd_server_stop()
    if job.state.shutdown_action_set:
        await mon.set_shutdown_action("poweroff")
        job.state.shutdown_action_set = False
        job.save()
