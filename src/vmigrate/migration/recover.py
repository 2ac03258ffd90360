"""Resolve jobs left behind by a controller that died, from their saved phase.

The saved phase (written before each phase's side effects) and what the hosts
say now decide the end state:

=========  ===============================================  ===================
phase      hosts now                                        outcome
=========  ===============================================  ===================
begin      (nothing was allocated)                          failed
prepare,   source migration completed, destination runs     completed (confirm)
perform    source in post-copy                              needs-operator
           otherwise                                        rolled back: failed
finish     destination runs                                 completed (confirm)
           otherwise                                        needs-operator
confirm    --                                               completed (confirm)
=========  ===============================================  ===================

"Rolled back" means: ``migrate_cancel`` if a migration is active, the source
resumed if the job had paused it, the incoming VM killed and its files removed.

Online jobs (disks copied) also: the disk mirrors on the source are cancelled and
their NBD nodes removed, and the target images (from the job's audited storage
plan) are deleted on rollback; a destination held paused (``-S``) after the copy
completed gets its NBD exports closed and is resumed; the VM's spec then points
at the target images. Source images are kept (``--delete-source`` is not
replayed).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from vmigrate.audit.log import AuditLog, read
from vmigrate.config import Inventory
from vmigrate.errors import HostError, QmpError, StateError
from vmigrate.hosts import open_host
from vmigrate.migration.online import moved_spec
from vmigrate.qemu import images, process
from vmigrate.qemu.process import VmState
from vmigrate.qemu.qmp import qmp_session
from vmigrate.qemu.spec import VMSpec
from vmigrate.store import JobRecord, Store


@dataclass(frozen=True)
class Recovery:
    """What ``job recover`` did for one job."""

    job: str
    vm: str
    phase: str
    outcome: str  # completed | failed | needs-operator
    detail: str


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


async def recover(inventory: Inventory, store: Store, audit: AuditLog, job: JobRecord,
                  *, force: bool = False) -> Recovery:
    """Bring one abandoned job to an end state on both hosts."""
    if not job.active:
        raise StateError(f"job {job.id} is not running (status {job.status})")
    if controller_alive(job) and not force:
        raise StateError(f"job {job.id} is still run by process {job.controller_pid}; "
                         "cancel it with 'vmigrate job cancel' instead")
    spec = VMSpec.model_validate_json(store.get_vm(job.vm).spec_json)
    src_cfg, dst_cfg = inventory.host(job.source), inventory.host(job.dest)
    audit.append("recover", {"phase": job.phase}, job=job.id)
    records = list(read(audit.path, job=job.id))
    paused_by_job = any(r.event == "decision" and r.data.get("decision") == "pause-guest"
                        for r in records)
    plans = [r.data.get("disks", []) for r in records
             if r.event == "decision" and r.data.get("decision") == "storage-plan"]
    targets: list[dict[str, str]] = plans[-1] if plans else []
    dest_spec = moved_spec(spec, [(t["target"], t["target_format"]) for t in targets]
                           ) if targets else spec
    async with open_host(src_cfg) as src, open_host(dst_cfg) as dst:
        src_paths = process.vm_paths(src_cfg, job.vm)

        async def src_migration() -> str:
            if await process.vm_pid(src, src_paths) is None:
                return "no-source"
            async with qmp_session(src, src_paths.qmp, vm=job.vm) as qmp:
                return str((await qmp.execute("query-migrate")).get("status", "none"))

        async def confirm() -> None:
            store.move_vm(job.vm, dst_cfg.name, dest_spec.model_dump_json())
            await process.stop_vm(src, src_cfg, spec, force=True)
            await process.remove_vm_dir(src, src_cfg, job.vm)

        async def release_held_dest() -> VmState:
            """An online destination held with -S after the copy: close its exports
            and let it run."""
            dst_paths = process.vm_paths(dst_cfg, job.vm)
            async with qmp_session(dst, dst_paths.qmp, vm=job.vm) as qmp:
                if str((await qmp.execute("query-migrate")).get("status")) == "completed":
                    with contextlib.suppress(QmpError):
                        await qmp.execute("nbd-server-stop")
                    await qmp.execute("cont")
            return await process.vm_state(dst, dst_cfg, job.vm)

        async def roll_back() -> None:
            if await process.vm_pid(src, src_paths) is not None:
                async with qmp_session(src, src_paths.qmp, vm=job.vm) as qmp:
                    status = str((await qmp.execute("query-migrate")).get("status", "none"))
                    if status in {"setup", "active", "pre-switchover", "device"}:
                        await qmp.execute("migrate_cancel")
                    if paused_by_job and await qmp.query_status() == "paused":
                        await qmp.execute("cont")
                    for i in range(len(targets)):  # online: the disk mirrors
                        with contextlib.suppress(QmpError):
                            await qmp.execute("block-job-cancel",
                                              {"device": f"mirror-disk{i}", "force": True})
                        with contextlib.suppress(QmpError):
                            await qmp.execute("blockdev-del", {"node-name": f"nbd-disk{i}"})
            await process.stop_vm(dst, dst_cfg, dest_spec, force=True)
            await process.remove_vm_dir(dst, dst_cfg, job.vm)
            for t in targets:
                await images.remove_image(dst, t["target"])

        dst_state = await process.vm_state(dst, dst_cfg, job.vm)
        if targets and dst_state == VmState.PAUSED and job.phase in (
                "perform", "finish", "confirm"):
            dst_state = await release_held_dest()
        outcome, detail = "failed", ""
        if job.mode in ("cold", "warm"):
            stopped = any(r.event == "decision" and r.data.get("decision") == "source-stopped"
                          for r in records)
            if job.phase in ("finish", "confirm") and dst_state == VmState.RUNNING:
                await confirm()
                outcome, detail = "completed", "the VM runs on the destination from its copies"
            elif job.phase == "begin":
                detail = "the controller died in begin; nothing had been allocated"
            else:
                await process.stop_vm(dst, dst_cfg, dest_spec, force=True)
                await process.remove_vm_dir(dst, dst_cfg, job.vm)
                for t in targets:  # finished copies; partial ones stay for a resume
                    await images.remove_image(dst, t["target"])
                if stopped and await process.vm_state(src, src_cfg, job.vm) != VmState.RUNNING:
                    await process.stop_vm(src, src_cfg, spec, force=True)
                    await process.start_vm(src, src_cfg, spec)
                detail = (f"rolled back from {job.phase}"
                          + ("; the source was restarted" if stopped else "")
                          + "; partial copies kept, a new migration resumes them")
        else:
            match job.phase:
                case "begin":
                    detail = "the controller died in begin; nothing had been allocated"
                case "prepare" | "perform":
                    status = await src_migration()
                    if status == "completed" and dst_state == VmState.RUNNING:
                        await confirm()
                        outcome, detail = "completed", "QEMU finished the migration on its own"
                    elif status.startswith("postcopy"):
                        outcome = "needs-operator"
                        detail = (f"the source is in {status}: the guest's memory is split; "
                                  "wait for it to complete or recover the link")
                    else:
                        await roll_back()
                        detail = f"rolled back from {job.phase} (source migration was {status})"
                case "finish":
                    if dst_state == VmState.RUNNING:
                        await confirm()
                        outcome, detail = "completed", "the destination runs; source stopped"
                    else:
                        outcome = "needs-operator"
                        detail = f"the destination is {dst_state.value} after the switchover"
                case "confirm":
                    await confirm()
                    outcome, detail = "completed", "confirm finished"
                case _:
                    outcome, detail = "needs-operator", f"unknown phase {job.phase}"
        with contextlib.suppress(HostError, QmpError):
            detail += (f"; now: source {(await process.vm_state(src, src_cfg, job.vm)).value}"
                       f", destination {(await process.vm_state(dst, dst_cfg, job.vm)).value}")
    report = dict(job.report or {})
    report.update({"status": outcome, "error": detail, "recovered": True})
    store.end_job(job.id, outcome, report=report, error=None if outcome == "completed" else detail)
    audit.append("end", {"status": outcome, "error": detail, "recovered": True}, job=job.id)
    return Recovery(job.id, job.vm, job.phase, outcome, detail)
