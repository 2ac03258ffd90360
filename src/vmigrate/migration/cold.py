"""Cold and warm migration: the disks move on our own transfer engine.

Cold (the safe, universal path):

* begin: the VM is known, the destination answers and has room in its pool
  (the storage plan of online migration), no target image exists yet;
* perform: the guest is shut down (ACPI; after ``shutdown_timeout`` it is
  stopped hard unless ``force`` is off), then every disk is transferred at
  once from the source host straight to the destination host
  (:mod:`vmigrate.transfer`), converting formats if asked;
* finish: the VM starts on the destination from the copies; for lab guests
  the probe must see it answer, which is when the downtime ends;
* confirm: the source's runtime files go; its images stay unless
  ``delete_source``.

Warm adds rounds before the cutover, like Forklift's warm import: a dirty bitmap
per disk on the running source QEMU, a full base copy read through an NBD
export of the running disk, then incremental rounds of only what the bitmap
marks dirty, until a round is small enough (or ``cutover_at`` arrives). Then the
guest shuts down (QEMU stays, paused, with its bitmaps), the last delta goes,
and the VM starts on the destination.

Before the VM runs on the destination every failure puts the source back as
it was (restarted if it ran) and deletes finished copies; partial copies and
their journals stay on the destination, so running the migration again
resumes the transfer instead of starting over.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmigrate.errors import StateError
from vmigrate.lab.image import parse_workloads
from vmigrate.lab.records import last_acks, verify_diskwrite_records
from vmigrate.migration.live import MigrationFailed, Progress
from vmigrate.migration.online import OnlineMigration
from vmigrate.plan.policy import plan_setup
from vmigrate.qemu import process
from vmigrate.qemu.qmp import qmp_session
from vmigrate.transfer.engine import PARTIAL_SUFFIX, SendOptions
from vmigrate.transfer.remote import NbdSource, Outcome, Place, copy

#: how long the guest may take to boot and answer on the destination
BOOT_WAIT_S = 120.0
#: warm: cut over once a round sent at most this many bytes ...
SMALL_DELTA = 32 << 20
#: ... or after this many rounds
MAX_ROUNDS = 8
#: warm with a cutover time: pause between rounds while waiting for it
ROUND_PAUSE_S = 5.0


@dataclass(frozen=True)
class DiskMoveOptions:
    """What cold and warm migration take besides the storage plan."""

    #: seconds the guest gets to power off after the ACPI button
    shutdown_timeout: float = 60.0
    #: stop the guest hard when it did not power off in time (else fail, source runs)
    force: bool = True
    #: bytes per second for each disk's transfer (None: no cap)
    bandwidth: float | None = None
    #: warm: wall-clock time (epoch seconds) to cut over at; None: when converged
    cutover_at: float | None = None
    cipher: str = "aes-256-gcm"
    compress: str = "auto"


class ColdMigration(OnlineMigration):
    """Stop, copy, start: see the module doc."""

    mode = "cold"

    def __init__(self, *args: Any, disk_opts: DiskMoveOptions | None = None,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.disk_opts = disk_opts or DiskMoveOptions()
        self.report.options.update(
            shutdown_timeout=self.disk_opts.shutdown_timeout, force=self.disk_opts.force,
            disk_bandwidth=self.disk_opts.bandwidth, cutover_at=self.disk_opts.cutover_at,
            cipher=self.disk_opts.cipher, compress=self.disk_opts.compress)
        self.report.tls = False  # the transfer stream carries its own AES-256-GCM
        self._was_running = False
        self._source_stopped = False
        self._stopped_at = 0.0
        self._rounds: list[dict[str, Any]] = []

    # -- phases ------------------------------------------------------------------------

    async def _run_phases(self, stack: contextlib.AsyncExitStack) -> None:
        await self._begin()
        self._check_cancel()
        self._phase("prepare")
        self._cleanups.append(("delete finished copies on the destination",
                               self._remove_targets))
        self._dst_log_from = await process.console_size(self.dst, self.dst_cfg, self.vm)
        await self._prepare_source(stack)
        self._phase("perform")
        self._start_probe()
        await self._before_stop()
        self._check_cancel()
        await self._stop_source()
        await self._copy_final()
        await self._release_source()
        await self._finish()
        await self._confirm()

    async def _prepare_source(self, stack: contextlib.AsyncExitStack) -> None:
        """Warm: dirty tracking and an NBD server on the running source."""

    async def _release_source(self) -> None:
        """Warm: the source QEMU, kept for the last delta, goes."""

    async def _begin(self) -> None:
        self._phase("begin")
        state = await process.vm_state(self.src, self.src_cfg, self.vm)
        if state == process.VmState.UNKNOWN:
            raise StateError(f"cannot tell the state of VM {self.vm} on {self.src_cfg.name}")
        self._was_running = state != process.VmState.STOPPED
        self._check_source_state(state)
        await self.dst.run(["true"], timeout=20)
        await self._check_dest_files()
        if await process.vm_pid(self.dst, process.vm_paths(self.dst_cfg, self.vm)):
            raise StateError(f"a QEMU for {self.vm} already runs on {self.dst_cfg.name}")
        self.setup = plan_setup(self.opts)
        await self._begin_storage()
        self.setup = None  # no memory migration: QEMU's migration setup does not apply
        self._decision("transfer", transport="tcp" if self.dst_cfg.migration_address
                       else "ssh", cipher=self.disk_opts.cipher,
                       compress=self.disk_opts.compress, bandwidth=self.disk_opts.bandwidth)

    def _check_source_state(self, state: process.VmState) -> None:
        """Cold: a running or a stopped VM both move."""

    async def _before_stop(self) -> None:
        """Warm: the base copy and the incremental rounds."""

    # -- stopping and restarting the source --------------------------------------------

    async def _stop_source(self) -> None:
        if not self._was_running:
            self._stopped_at = time.monotonic()
            return
        self._cleanups.append(("restart the VM on the source", self._restart_source))
        self.on_progress(Progress("perform", note="shutting the guest down (ACPI)"))
        t0 = time.monotonic()
        hard = await self._shutdown_guest()
        self._source_stopped = True
        self._stopped_at = t0
        self._decision("source-stopped", how="hard" if hard else "acpi",
                       seconds=round(time.monotonic() - t0, 2))

    async def _shutdown_guest(self) -> bool:
        """Power the guest off; True when it had to be stopped hard."""
        try:
            await process.stop_vm(self.src, self.src_cfg, self.spec,
                                  timeout=self.disk_opts.shutdown_timeout)
            return False
        except StateError:
            if not self.disk_opts.force:
                raise
        await process.stop_vm(self.src, self.src_cfg, self.spec, force=True)
        return True

    async def _stop_dest_vm(self) -> None:
        await process.stop_vm(self.dst, self.dst_cfg, self.dest_spec, force=True)
        await process.remove_vm_dir(self.dst, self.dst_cfg, self.vm)

    async def _restart_source(self) -> None:
        if self._source_stopped and self._was_running:
            state = await process.vm_state(self.src, self.src_cfg, self.vm)
            if state != process.VmState.RUNNING:
                await process.stop_vm(self.src, self.src_cfg, self.spec, force=True)
                await process.start_vm(self.src, self.src_cfg, self.spec)
            self._source_stopped = False

    # -- copying -----------------------------------------------------------------------

    def _send_opts(self, fmt: str, *, final: bool) -> SendOptions:
        return SendOptions(target_format=fmt, cipher=self.disk_opts.cipher,
                           compress=self.disk_opts.compress,
                           bandwidth=self.disk_opts.bandwidth, final=final)

    async def _copy_all(self, label: str, make: Any) -> list[Outcome]:
        """Run one transfer per disk, all at once, with one progress line."""
        done: dict[int, tuple[int, int]] = {}

        def progress_for(i: int) -> Any:
            def cb(ev: dict[str, Any]) -> None:
                done[i] = (int(ev.get("done") or 0), int(ev.get("total") or 0))
                d = sum(v[0] for v in done.values())
                t = sum(v[1] for v in done.values())
                self.on_progress(Progress("perform", note=None, disk=(d, t)))
            return cb

        self.on_progress(Progress("perform", note=label))
        t0 = time.monotonic()
        outs = await asyncio.gather(*(make(p, progress_for(p.index)) for p in self.plans))
        self._decision("copied", step=label, seconds=round(time.monotonic() - t0, 2),
                       disks=[o.as_dict() for o in outs])
        return list(outs)

    async def _copy_final(self) -> None:
        async def one(p: Any, cb: Any) -> Outcome:
            return await copy(self.inventory, Place(self.src_cfg.name, p.source),
                              Place(self.dst_cfg.name, p.target),
                              self._send_opts(p.target_format, final=True),
                              source_format=p.info.format, progress=cb,
                              hosts={self.src_cfg.name: self.src, self.dst_cfg.name: self.dst})

        outs = await self._copy_all("copying the disks", one)
        self._record_copies(outs, final_round=True)

    def _record_copies(self, outs: list[Outcome], *, final_round: bool) -> None:
        for p, o in zip(self.plans, outs, strict=True):
            p.created = p.created or final_round  # the target now exists under its name
            d = o.as_dict()
            entry = next((e for e in self.report.disks if e["target"] == p.target), None)
            if entry is None:
                entry = {"source": p.source, "format": p.info.format,
                         "virtual_size": p.info.virtual_size,
                         "source_allocated": p.info.actual_size, "target": p.target,
                         "target_format": p.target_format, "data_bytes": 0, "wire_bytes": 0,
                         "zero_bytes": 0, "skipped_bytes": 0, "resent_bytes": 0,
                         "transfer_s": 0.0}
                self.report.disks.append(entry)
            for k in ("data_bytes", "wire_bytes", "resent_bytes"):
                entry[k] += int(d.get(k) or 0)
            if final_round:
                entry["zero_bytes"] = d.get("zero_bytes")
                entry["skipped_bytes"] = d.get("skipped_bytes")
                entry["verified"] = d.get("verified")
            entry["transfer_s"] = round(entry["transfer_s"] + float(d["seconds"]), 3)
        self.report.bytes_transferred = sum(e["wire_bytes"] for e in self.report.disks)

    async def _remove_targets(self) -> None:
        await super()._remove_targets()
        kept = [p.target + PARTIAL_SUFFIX for p in self.plans]
        present = await self.dst.run(["ls", "-d", "--", *kept], check=False)
        if present.stdout.strip():
            self._decision("partial-copies-kept", paths=present.stdout.split(),
                           note="running the migration again resumes these transfers")

    # -- finish and confirm -----------------------------------------------------------

    async def _check_records(self) -> None:
        """Lab guests running diskwrite: every record acknowledged on the source (its
        console, read after the stop) must be on the copy, before the copy boots."""
        if not self.spec.workload or "diskwrite" not in self.spec.workload:
            return
        text = await process.read_console(self.src, self.src_cfg, self.vm)
        out: dict[str, dict[str, int]] = {}
        for dev, acked in last_acks(text).items():
            index = ord(dev[-1]) - ord("a") if dev.startswith("/dev/vd") else -1
            plan = next((p for p in self.plans if p.index == index), None)
            if plan is None or plan.target_format != "raw":
                continue
            size = _record_size(self.spec.workload, dev) * (acked + 1) + (1 << 20)
            data = await self.dst.read_head(plan.target, size)
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                found = verify_diskwrite_records(Path(f.name))
            out[dev] = {"acked": acked, "found": found}
        self.report.verification.records = out
        self._decision("disk-records", **out)
        lost = {d: r for d, r in out.items() if r["found"] < r["acked"]}
        if lost:
            raise MigrationFailed(f"acknowledged disk records missing on the copy: {lost}")

    async def _finish(self) -> None:
        await self._check_records()
        self._phase("finish")
        if not self._was_running:  # it was stopped: it stays stopped, now on the destination
            await self._finish_storage()
            self._cleanups.clear()
            self.report.verification.dest_running = False
            return
        self._cleanups.append(("stop the VM on the destination", self._stop_dest_vm))
        await process.start_vm(self.dst, self.dst_cfg, self.dest_spec)
        async with qmp_session(self.dst, process.vm_paths(self.dst_cfg, self.vm).qmp,
                               vm=self.vm) as qmp:
            status = await qmp.query_status()
        if status != "running":
            raise MigrationFailed(f"the VM started on {self.dst_cfg.name} is {status}")
        self.report.verification.dest_running = True
        if self.spec.workload is not None:  # a lab guest says when it is up
            await self._wait_ready()
        if self.probe is not None:
            await self._await_ping()
            if not self.report.verification.answers_ping:
                # the long-running ping may have backed off while the guest was down
                # for many seconds: ask once more with fresh pings
                self.report.verification.answers_ping = await self._ping_fresh()
            if not self.report.verification.answers_ping:
                raise MigrationFailed(f"the guest did not answer on {self.dst_cfg.name}")
        answered = time.monotonic()
        await self._stop_probe()
        self.report.qemu_downtime_ms = None
        # downtime: from the source stop to the guest answering (or running) here
        self.report.observed_downtime_ms = round((answered - self._stopped_at) * 1000.0, 1)
        await self._finish_storage()
        self._cleanups.clear()  # the VM runs on the destination from its own copies
        self.report.steps = self._rounds

    async def _ping_fresh(self, timeout: float = 20.0) -> bool:
        lab = self.inventory.lab
        if lab is None or not self.spec.ip:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", lab.probe_netns, "ping", "-n", "-c", "1", "-W", "1",
                self.spec.ip, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            if await proc.wait() == 0:
                self._decision("answered-fresh-ping")
                return True
        return False

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + BOOT_WAIT_S
        while time.monotonic() < deadline:
            text = await self._dest_console()
            if "VMIGRATE READY" in text:
                return
            await asyncio.sleep(0.5)
        raise MigrationFailed(f"the guest did not boot on {self.dst_cfg.name} within "
                              f"{BOOT_WAIT_S:.0f}s")

    async def _finish_storage(self) -> None:
        self.store.move_vm(self.vm, self.dst_cfg.name, self.dest_spec.model_dump_json())
        for p in self.plans:
            p.created = False

    async def _confirm(self) -> None:
        self._phase("confirm")
        await process.remove_vm_dir(self.src, self.src_cfg, self.vm)
        await self._confirm_storage()


class WarmMigration(ColdMigration):
    """Base copy and incremental rounds while the VM runs; a short cold cutover."""

    mode = "warm"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._bitmap_no = 0
        self._nbd_sock = f"{process.vm_paths(self.src_cfg, self.vm).dir}/xfer.nbd"

    def _check_source_state(self, state: process.VmState) -> None:
        if state != process.VmState.RUNNING:
            raise StateError(f"VM {self.vm} is {state.value}: warm migration copies a "
                             "running VM's disks (use --mode cold)")

    def _manifest(self, index: int) -> str:
        return f"{process.vm_paths(self.src_cfg, self.vm).dir}/xfer-disk{index}.manifest"

    async def _prepare_source(self, stack: contextlib.AsyncExitStack) -> None:
        self.src_qmp = await stack.enter_async_context(
            qmp_session(self.src, process.vm_paths(self.src_cfg, self.vm).qmp, vm=self.vm))
        self._cleanups.append(("drop dirty bitmaps and exports on the source",
                               self._drop_tracking))
        await self.src_qmp.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": self._nbd_sock}}})

    async def _release_source(self) -> None:
        with contextlib.suppress(Exception):
            assert self.src_qmp is not None
            await self.src_qmp.execute("quit")
        self.src_qmp = None
        await process.stop_vm(self.src, self.src_cfg, self.spec, force=True)

    async def _new_bitmap(self, *, disable_previous: bool) -> None:
        """Start tracking into a fresh bitmap; freeze the previous one (one transaction,
        so no write falls between them)."""
        assert self.src_qmp is not None
        prev, self._bitmap_no = self._bitmap_no, self._bitmap_no + 1
        actions: list[dict[str, Any]] = []
        for p in self.plans:
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": p.node, "name": f"vmx{self._bitmap_no}", "granularity": 65536,
                "persistent": False}})
            if disable_previous and prev:
                actions.append({"type": "block-dirty-bitmap-disable",
                                "data": {"node": p.node, "name": f"vmx{prev}"}})
        await self.src_qmp.execute("transaction", {"actions": actions})

    async def _round(self, label: str, *, bitmap: int | None, final: bool) -> list[Outcome]:
        """One copy of every disk: whole (bitmap None) or what bitmap ``bitmap`` marks."""
        assert self.src_qmp is not None
        tag = f"r{bitmap or 0}"
        for p in self.plans:
            args: dict[str, Any] = {"type": "nbd", "id": f"xfer-{p.node}-{tag}",
                                    "node-name": p.node, "name": f"{p.node}-{tag}",
                                    "writable": False}
            if bitmap is not None:
                args["bitmaps"] = [f"vmx{bitmap}"]
            await self.src_qmp.execute("block-export-add", args)
        try:
            async def one(p: Any, cb: Any) -> Outcome:
                src = NbdSource(f"unix:{self._nbd_sock}", f"{p.node}-{tag}",
                                bitmap=f"vmx{bitmap}" if bitmap is not None else None,
                                delta=bitmap is not None)
                return await copy(self.inventory, (self.src_cfg.name, src),
                                  Place(self.dst_cfg.name, p.target),
                                  self._send_opts(p.target_format, final=final),
                                  manifest=self._manifest(p.index), progress=cb,
                                  hosts={self.src_cfg.name: self.src,
                                         self.dst_cfg.name: self.dst})
            t0 = time.monotonic()
            outs = await self._copy_all(label, one)
        finally:
            for p in self.plans:
                with contextlib.suppress(Exception):
                    await self.src_qmp.execute("block-export-del",
                                                {"id": f"xfer-{p.node}-{tag}"})
        if bitmap is not None:
            for p in self.plans:
                await self.src_qmp.execute("block-dirty-bitmap-remove",
                                            {"node": p.node, "name": f"vmx{bitmap}"})
        self._record_copies(outs, final_round=final)
        sent = sum(int(o.as_dict().get("data_bytes") or 0) for o in outs)
        self._rounds.append({"t": round(time.monotonic() - t0, 2), "iteration":
                             len(self._rounds), "action": "round", "taken": True,
                             "detail": f"{label}: {sent} bytes in "
                                       f"{time.monotonic() - t0:.1f}s"})
        return outs

    async def _before_stop(self) -> None:
        await self._new_bitmap(disable_previous=False)
        await self._round("base copy", bitmap=None, final=False)
        while True:
            self._check_cancel()
            wait_for_cutover = (self.disk_opts.cutover_at is not None
                                and time.time() < self.disk_opts.cutover_at)
            await self._new_bitmap(disable_previous=True)
            outs = await self._round(f"round {len(self._rounds)}",
                                     bitmap=self._bitmap_no - 1, final=False)
            sent = sum(int(o.as_dict().get("data_bytes") or 0) for o in outs)
            if wait_for_cutover:
                assert self.disk_opts.cutover_at is not None
                await asyncio.sleep(min(ROUND_PAUSE_S,
                                        max(0.0, self.disk_opts.cutover_at - time.time())))
                continue
            if sent <= SMALL_DELTA or len(self._rounds) > MAX_ROUNDS:
                self._decision("cutover", last_round_bytes=sent, rounds=len(self._rounds))
                return

    async def _shutdown_guest(self) -> bool:
        """Power off, keeping QEMU (paused, with its bitmaps and exports) for the last
        delta; a guest that does not power off in time is paused hard."""
        assert self.src_qmp is not None
        qmp = self.src_qmp
        await qmp.execute("set-action", {"shutdown": "pause"})
        await qmp.execute("system_powerdown")
        deadline = time.monotonic() + self.disk_opts.shutdown_timeout
        while time.monotonic() < deadline:
            if await qmp.query_status() in ("shutdown", "paused"):
                return False
            await asyncio.sleep(0.2)
        if not self.disk_opts.force:
            await qmp.execute("set-action", {"shutdown": "poweroff"})
            raise StateError(f"VM {self.vm} did not power off within "
                             f"{self.disk_opts.shutdown_timeout:.0f}s; it runs on")
        await qmp.execute("stop")
        return True

    async def _copy_final(self) -> None:
        # the bitmap tracking since the last round holds every write up to the stop;
        # frozen (nothing writes any more), it can be exported
        assert self.src_qmp is not None
        for p in self.plans:
            await self.src_qmp.execute("block-dirty-bitmap-disable",
                                       {"node": p.node, "name": f"vmx{self._bitmap_no}"})
        await self._round("last delta", bitmap=self._bitmap_no, final=True)

    async def _restart_source(self) -> None:
        if self.src_qmp is not None and self._source_stopped:
            # QEMU still runs, paused after the guest powered off: a clean reboot
            with contextlib.suppress(Exception):
                await self.src_qmp.execute("set-action", {"shutdown": "poweroff"})
                await self.src_qmp.execute("system_reset")
                await self.src_qmp.execute("cont")
                self._source_stopped = False
                return
        await super()._restart_source()

    async def _drop_tracking(self) -> None:
        if self.src_qmp is None:
            return
        for p in self.plans:
            for n in range(1, self._bitmap_no + 1):
                with contextlib.suppress(Exception):
                    await self.src_qmp.execute("block-dirty-bitmap-remove",
                                                {"node": p.node, "name": f"vmx{n}"})
        with contextlib.suppress(Exception):
            await self.src_qmp.execute("nbd-server-stop")
        with contextlib.suppress(Exception):
            await self.src_qmp.execute("set-action", {"shutdown": "poweroff"})


def _record_size(workload: str, dev: str) -> int:
    """The record size the guest's diskwrite on ``dev`` uses (``size=``, default 4 KiB)."""
    for w in parse_workloads(workload):
        params = w.effective_params()
        if w.kind == "diskwrite" and params.get("dev") == dev:
            text = str(params.get("size", "4096")).upper()
            mult = {"K": 1024, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * mult
    return 4096
