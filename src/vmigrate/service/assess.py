"""``vmigrate assess``: measure what a migration of a VM will have to move.

The I/O half of planning (the pure half is :mod:`vmigrate.plan`). For one VM:

* **memory**: its size; the share of its pages that are not zero (64 pieces of
  64 KiB spread over the first 2 GiB of guest-physical memory, always RAM on
  the pc and q35 machines, read with ``pmemsave`` into the VM's directory on
  its host); the dirty page rate over several ``calc-dirty-rate``
  windows (QMP, ``page-sampling`` mode with the most sample pages QEMU 7.2
  allows), plus one longer window: when the guest dirties fewer distinct pages in
  the long window than its rate says, what it dirtied bounds its writable set;
* **disks**: virtual size (``qemu-img info``), allocated bytes (``stat``), the
  guest's write rate (``query-blockstats`` before and after the windows), how
  well the data would travel (a sample read on the host: zero and compressed
  share), and whether the destination sees the same file (same inode and size
  there: shared storage);
* **CPU**: the QEMU process's CPU time over the windows, per vCPU;
* **link**: one TCP stream between the hosts' migration addresses, measured on
  the receiver (:func:`vmigrate.transfer.remote.probe_link`).

Every assessment is stored with its time, so history accumulates for
calibration and for the best-window advice.

QEMU facts (7.2, this machine): ``calc-dirty-rate`` reports whole MiB/s,
truncated, so each window counts half a MiB/s more (the middle of the interval);
``sample-pages`` is 128..4096 per GiB; ``calc-time`` whole seconds. The
``dirty-bitmap`` mode kills a TCG guest's QEMU (seen here), so only
``page-sampling`` is used; ``dirty-ring`` needs KVM's dirty ring.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import HostError, QmpCommandError, QmpError, UserError
from vmigrate.hosts import Host, HostPool
from vmigrate.pki import QEMU_FILES
from vmigrate.plan.assessment import (
    Assessment,
    DirtyWindow,
    DiskAssessment,
    LinkAssessment,
)
from vmigrate.progress import Event, ProgressFn, guarded
from vmigrate.qemu import images, process
from vmigrate.qemu.process import VmState
from vmigrate.qemu.qmp import QmpSession, qmp_session
from vmigrate.qemu.spec import VMSpec
from vmigrate.store import Store
from vmigrate.transfer.remote import probe_link, sample_disk

MiB = 1 << 20
#: QEMU 7.2's limit for calc-dirty-rate's sample-pages (per GiB of RAM)
MAX_SAMPLE_PAGES = 4096
#: guest RAM sample for the zero-page share: pieces, bytes each, below this address
RAM_PIECES = 64
RAM_PIECE = 64 << 10
RAM_SAMPLE_BELOW = 2 << 30
PAGE = 4096
#: a long window saturated when it saw less than this share of what the rate predicts
SATURATION = 0.8

@dataclass(frozen=True)
class AssessOptions:
    """How long and how hard to measure."""

    #: short calc-dirty-rate windows, and their length (whole seconds)
    windows: int = 3
    window_s: int = 1
    #: one longer window that shows a bounded writable set (0: none)
    long_window_s: int = 4
    #: link probe seconds (0: do not probe)
    probe_s: float = 2.0
    #: 1 MiB chunks read per disk for the compression sample (0: do not sample)
    sample_chunks: int = 32

    def check(self) -> None:
        if not 1 <= self.windows <= 60:
            raise UserError("--windows must be between 1 and 60")
        if not 1 <= self.window_s <= 60 or not 0 <= self.long_window_s <= 60:
            raise UserError("window lengths are whole seconds from 1 to 60")
        if not 0 <= self.probe_s <= 60:
            raise UserError("--probe-seconds must be between 0 and 60")


async def _dirty_window(qmp: QmpSession, seconds: int) -> float:
    """One calc-dirty-rate window; bytes per second."""
    await qmp.execute("calc-dirty-rate", {"calc-time": seconds,
                                          "sample-pages": MAX_SAMPLE_PAGES,
                                          "mode": "page-sampling"})
    deadline = time.monotonic() + seconds + 15
    await asyncio.sleep(seconds)
    while True:
        reply = await qmp.execute("query-dirty-rate")
        if reply.get("status") == "measured":
            return (float(reply.get("dirty-rate", 0)) + 0.5) * MiB
        if time.monotonic() > deadline:
            raise QmpCommandError(f"calc-dirty-rate did not finish (status {reply.get('status')})")
        await asyncio.sleep(0.2)


async def _cpu_ticks(host: Host, pid: int) -> float:
    """utime + stime of a process, seconds."""
    res = await host.run(["cat", f"/proc/{pid}/stat"], check=False)
    if res.status != 0:
        return 0.0
    fields = res.stdout.rsplit(")", 1)[-1].split()
    clk = await _clk_tck(host)
    return (int(fields[11]) + int(fields[12])) / clk  # utime, stime (fields 14, 15)


_CLK: dict[str, int] = {}


async def _clk_tck(host: Host) -> int:
    if host.name not in _CLK:
        res = await host.run(["getconf", "CLK_TCK"], check=False)
        _CLK[host.name] = int(res.stdout.strip()) if res.status == 0 and \
            res.stdout.strip().isdigit() else 100
    return _CLK[host.name]


async def _nonzero_fraction(qmp: QmpSession, host: Host, vm_dir: str, memory: int
                            ) -> float | None:
    """Share of sampled guest RAM pages that are not all zeros (None if QEMU refused)."""
    start, limit = 1 << 20, min(memory, RAM_SAMPLE_BELOW)
    if limit - start < RAM_PIECES * RAM_PIECE:
        return None
    step = (limit - start - RAM_PIECE) // (RAM_PIECES - 1) // PAGE * PAGE
    tmp = f"{vm_dir}/assess-sample"
    await host.run(["mkdir", "-p", tmp])
    try:
        for i in range(RAM_PIECES):
            await qmp.execute("pmemsave", {"val": start + i * step, "size": RAM_PIECE,
                                           "filename": f"{tmp}/{i:03d}"})
        # a constant script: the directory is a positional parameter, never shell text
        await host.run(["sh", "-c", 'cat -- "$1"/[0-9]* > "$1/all"', "sh", tmp])
        data = await host.read_file(f"{tmp}/all")
    except QmpError:
        return None
    finally:
        await host.run(["rm", "-rf", tmp], check=False)
    pages = [data[o:o + PAGE] for o in range(0, len(data), PAGE)]
    if not pages:
        return None
    zero = bytes(PAGE)
    return sum(1 for p in pages if p != zero) / len(pages)


async def _same_file(src: Host, dst: Host, path: str) -> bool:
    """The destination sees the very file the source has at ``path`` (shared storage):
    same inode and size, not merely a file of the same name."""
    argv = ["stat", "-L", "-c", "%i %s", "--", path]
    a, b = await src.run(argv, check=False), await dst.run(argv, check=False)
    return a.status == 0 and b.status == 0 and a.stdout.split() == b.stdout.split()


def _written(stats: list[dict[str, Any]]) -> dict[str, int]:
    return {str(s.get("node-name") or s.get("device") or s.get("qdev")):
            int(s.get("stats", {}).get("wr_bytes", 0)) for s in stats}


async def _has_tls(host: Host, cfg: HostConfig) -> bool:
    try:
        return not await host.missing([f"{cfg.tls_path}/{f}" for f in QEMU_FILES])
    except HostError:
        return False


class Assessor:
    """Measures VMs of the inventory; use as ``async with`` (host sessions close on exit)."""

    def __init__(self, inventory: Inventory, store: Store, *,
                 progress: ProgressFn | None = None) -> None:
        """``progress`` is told what is measured as it goes, as Events with a ``message``
        (guarded: a display that fails is switched off, the assessment goes on)."""
        self.inventory = inventory
        self.store = store
        self._progress = guarded(progress)
        self._hosts = HostPool(inventory)

    def note(self, line: str) -> None:
        """Tell the progress callback ``line``."""
        self._progress(Event(message=line))

    async def __aenter__(self) -> Assessor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._hosts.aclose()

    def _host(self, name: str) -> tuple[Host, HostConfig]:
        return self._hosts.get(name)

    async def assess(self, vm: str, *, dest: str | None = None,
                     opts: AssessOptions = AssessOptions(), store: bool = True) -> Assessment:
        """Measure ``vm`` (and the link to ``dest``, if given) and keep the result.

        Raises :class:`NotFoundError` for an unknown VM or host, :class:`UserError`
        when ``dest`` is where the VM already runs; a VM that is not running is
        assessed from its spec and disks alone (no dirty rate, no CPU)."""
        opts.check()
        record = self.store.get_vm(vm)
        spec = VMSpec.model_validate_json(record.spec_json)
        if dest is not None and dest == record.host:
            raise UserError(f"VM {vm} already runs on {dest}")
        src, src_cfg = self._host(record.host)
        dst_pair = self._host(dest) if dest is not None else None
        at = time.time()
        state = await process.vm_state(src, src_cfg, vm)
        running = state in (VmState.RUNNING, VmState.PAUSED)
        pid = await process.vm_pid(src, process.vm_paths(src_cfg, vm)) if running else None
        fields: dict[str, Any] = {"vm": vm, "host": record.host, "at": at, "running": running,
                                  "memory_bytes": spec.memory_mib * MiB, "vcpus": spec.vcpus}
        written: dict[str, int] = {}
        write_s = 0.0
        if running and pid is not None:
            async with qmp_session(src, process.vm_paths(src_cfg, vm).qmp, vm=vm) as qmp:
                ver = (await qmp.execute("query-version"))["qemu"]
                fields["qemu_version"] = (int(ver["major"]), int(ver["minor"]),
                                          int(ver["micro"]))
                fields["nonzero_fraction"] = await _nonzero_fraction(
                    qmp, src, process.vm_paths(src_cfg, vm).dir, spec.memory_mib * MiB)
                before = _written(await qmp.execute("query-blockstats",
                                                    {"query-nodes": False}))
                cpu0, t0 = await _cpu_ticks(src, pid), time.monotonic()
                windows, bound = await self._dirty(qmp, vm, opts)
                cpu1, t1 = await _cpu_ticks(src, pid), time.monotonic()
                after = _written(await qmp.execute("query-blockstats",
                                                   {"query-nodes": False}))
            write_s = max(t1 - t0, 1e-3)
            written = {k: max(0, v - before.get(k, 0)) for k, v in after.items()}
            fields.update(dirty=windows, dirty_set_bytes=bound,
                          cpu_pct=round(min(100.0, 100 * (cpu1 - cpu0) / write_s / spec.vcpus),
                                        1))
        fields["disks"] = await self._disks(spec, src, src_cfg, dst_pair, written, write_s,
                                            opts)
        if dst_pair is not None:
            dst, dst_cfg = dst_pair
            fields["tls"] = await _has_tls(src, src_cfg) and await _has_tls(dst, dst_cfg)
            if opts.probe_s > 0:
                self.note(f"{vm}: probing the link {record.host} -> {dest} "
                          f"for {opts.probe_s:g} s")
                got = await probe_link(src, src_cfg, dst, dst_cfg, seconds=opts.probe_s)
                fields["link"] = LinkAssessment(
                    source=record.host, dest=dst_cfg.name, bandwidth=got["rate"],
                    rtt_ms=got["connect_ms"], probe_s=got["seconds"])
                self.note(f"{vm}: link {got['rate'] * 8 / 1e6:,.0f} Mbit/s")
        result = Assessment.model_validate(fields)
        if store:
            self.store.add_assessment(vm, record.host, dest, at, result.model_dump(mode="json"))
        return result

    async def _dirty(self, qmp: QmpSession, vm: str, opts: AssessOptions
                     ) -> tuple[list[DirtyWindow], int | None]:
        windows: list[DirtyWindow] = []
        for i in range(opts.windows):
            rate = await _dirty_window(qmp, opts.window_s)
            windows.append(DirtyWindow(seconds=opts.window_s, rate=rate))
            self.note(f"{vm}: dirty rate window {i + 1}/{opts.windows}: "
                      f"{rate / MiB:,.0f} MiB/s")
        bound: int | None = None
        if opts.long_window_s > 0:
            long_rate = await _dirty_window(qmp, opts.long_window_s)
            short = sum(w.rate for w in windows) / len(windows)
            seen = long_rate * opts.long_window_s
            if short > 0 and seen < SATURATION * short * opts.long_window_s:
                bound = int(seen)
                self.note(f"{vm}: long window ({opts.long_window_s} s) saw {seen / MiB:,.0f} "
                          "MiB dirtied: the writable set is bounded")
            else:
                windows.append(DirtyWindow(seconds=opts.long_window_s, rate=long_rate))
                self.note(f"{vm}: dirty rate window {opts.long_window_s} s: "
                          f"{long_rate / MiB:,.0f} MiB/s")
        return windows, bound

    async def _disks(self, spec: VMSpec, src: Host, src_cfg: HostConfig,
                     dst_pair: tuple[Host, HostConfig] | None, written: dict[str, int],
                     write_s: float, opts: AssessOptions) -> list[DiskAssessment]:
        disks: list[DiskAssessment] = []
        for i, disk in enumerate(spec.disks):
            info = await images.image_info(src, disk.path, fmt=disk.format)
            allocated = info.actual_size
            ratio: float | None = None
            if opts.sample_chunks > 0 and allocated > 0:
                got = await sample_disk(src, src_cfg, disk.path, disk.format,
                                        chunks=opts.sample_chunks)
                ratio = max(float(got["ratio"]), 1e-4)
                allocated = min(allocated, int(got["allocated"])) or allocated
            shared = dst_pair is not None and await _same_file(src, dst_pair[0], disk.path)
            rate = written.get(f"disk{i}", 0) / write_s if write_s else 0.0
            disks.append(DiskAssessment(
                device=f"disk{i}", path=disk.path, format=disk.format,
                virtual_bytes=info.virtual_size, allocated_bytes=allocated,
                write_rate=rate, compress_ratio=ratio, shared=shared))
        return disks

