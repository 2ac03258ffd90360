#!/usr/bin/env python3
"""Online-migration benchmark: disk copy throughput and downtime against two baselines.

Runs in a throw-away lab (root) with both hosts' migration links shaped to 200mbit
(tc tbf on both ends), so that the link and not the CPU (TCG guests, 2 cores) is
the bottleneck. The VM has one raw disk in h1's ``local`` pool: a 4 GiB image,
sparse but for D MiB of incompressible data (``os.urandom``) at offset 64 MiB.
D is 256 MiB and 1 GiB (``--quick``: 256 MiB only). The guest is either idle or
runs ``diskwrite`` at 50 records/s of 4 KiB on that same disk (from offset 0, well
clear of the data; about 200 KiB/s of writes the mirror has to keep up with). "Idle"
is the lab guest's idle workload; the lab image also runs ``tlbtick`` (a user process
waking every 2 ms, against a TCG stale-TLB corruption of idle guests, see
BENCHMARKS.md), so an idle guest is not fully quiet.

Three ways to move the VM, each measured in the same session on the same lab:

* vmigrate:      ``MigrationService.migrate`` as ``vmigrate migrate --mode online`` runs
                 it: the default 'balanced' policy, TLS on the NBD and RAM streams;
* libvirt-like:  the same online migration with TLS off (``tls=False``), as
                 ``virsh migrate --live --copy-storage-all`` runs by default (no
                 ``--tls``). What is the same as libvirt: the destination exports
                 thin target images over NBD, one ``blockdev-mirror`` per disk,
                 ``sync=full``, QEMU's default mirror settings (no speed cap,
                 default buffer size and granularity, background copy mode), the
                 RAM migration starting once every mirror is ready. What is not:
                 this is vmigrate's orchestration, not libvirt's: the RAM phase runs
                 under vmigrate's 'balanced' policy (libvirt leaves QEMU's 300 ms
                 downtime limit and lifts the bandwidth cap), the mirrors are
                 completed at ``pause-before-switchover`` as vmigrate does it, and
                 vmigrate's checks and probe run. No libvirt was run: this row
                 isolates the cost of TLS, it does not measure libvirt;
* cold copy:     the VM off: ``qemu-img convert -O raw`` of the same kind of source
                 image, read from a read-only ``qemu-nbd`` (plain NBD, no TLS) bound
                 on h1's migration address and written into h2's pool by a
                 ``qemu-img`` running in h2's namespace, over the same shaped link.
                 The VM is down for the whole copy (plus a shutdown and a boot, which
                 are not counted).

What each online run records: total time (begin to confirm), the mirror's time to
ready (``ready_s``, sampled every 0.5 s, so it is late by 0 to 0.5 s plus a QMP
round trip), the bytes of data actually carried, i.e. the source image's allocated
bytes (the mirror's own offset counts the sparse ranges too, written as zeroes
without crossing the link as data), the mirror throughput = allocated / ready_s
and its fraction of the link rate, QEMU's downtime and the observed downtime
(longest gap of a 1 ms ping from the probe namespace). Time to ready includes the
mirror's initial zeroing of the whole target over NBD (cheap: write-zeroes requests)
and the re-copying of blocks the guest dirtied meanwhile (not in the numerator).
As a diagnostic, every mirror progress sample is timed: the "data range only"
fraction is the rate at which the offset crossed the data (its first and last
16 MiB left out), i.e. the streaming rate without the fixed costs around it. The
rows also hold when the longest ping gap began, relative to the mirror's start.
Each copy is checked: idle and cold targets with ``qemu-img compare`` against the
source, diskwrite targets with the guest's records (every acknowledged record valid).

A migration still running after --budget seconds is cancelled and counts as failed.

Usage: sudo .venv/bin/python bench/online.py [--quick] [--repeat N] [--budget 600]
       [--out FILE] [--only vmigrate|libvirt-like|cold]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vmigrate.audit.log import AuditLog
from vmigrate.config import HOME_ENV, Inventory, load_inventory
from vmigrate.errors import ConflictError
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.image import build_image
from vmigrate.lab.links import host_netns, set_link_rate
from vmigrate.lab.net import LabSpec, lab_down, lab_up, require_root
from vmigrate.lab.records import last_acks, verify_diskwrite_records
from vmigrate.progress import Event
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.vms import ConsoleFollower, CreateRequest, VmService
from vmigrate.store import Store

MiB = 1 << 20
LINK = "200mbit"
LINK_BYTES_S = 25_000_000
VIRTUAL_SIZE = 4 << 30
DATA_OFFSET = 64 * MiB
SIZES = {"256M": 256 * MiB, "1G": 1024 * MiB}
WORKLOADS = {"idle": "idle", "diskwrite": "diskwrite:dev=/dev/vda,rate=50"}
MEMORY = "256M"
NBD_PORT = 10809

LABELS = {
    "vmigrate": "vmigrate (balanced, TLS)",
    "libvirt-like": "libvirt-like (no TLS, defaults)",
    "cold": "cold qemu-img convert (no TLS)",
}


#: the online strategies, and whether each runs with TLS
STRATEGIES = {"vmigrate": True, "libvirt-like": False}


def request(strat: str, vm: str) -> MigrationRequest:
    """The online migration of ``vm`` to h2 for strategy ``strat``."""
    return MigrationRequest(vm=vm, dest="h2", mode="online", policy="balanced",
                            tls=STRATEGIES[strat], insecure=not STRATEGIES[strat])


def pool(inv: Inventory, host: str) -> Path:
    path = inv.host(host).pools["local"]
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_source(path: Path, data: int) -> None:
    """A sparse raw image of VIRTUAL_SIZE holding ``data`` random bytes at DATA_OFFSET."""
    thin_raw_image(path, VIRTUAL_SIZE, data, offset=DATA_OFFSET)


def images_identical(a: Path, b: Path) -> bool:
    res = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(a), str(b)],
                         capture_output=True, text=True, timeout=600)
    return res.returncode == 0


def fraction(nbytes: int | None, seconds: float | None) -> tuple[float | None, float | None]:
    """(MB/s, fraction of the link rate) of ``nbytes`` carried in ``seconds``."""
    if not nbytes or not seconds:
        return None, None
    rate = nbytes / seconds
    return round(rate / 1e6, 2), round(rate / LINK_BYTES_S, 3)



class Instrumented:
    """What the diagnostics need from a migration as it runs: its job id (``on_job``)
    and the time of every disk-copy progress sample (``progress``)."""

    def __init__(self) -> None:
        self.job_id: str | None = None
        #: (Unix time, image bytes copied, image bytes to copy), all disks together
        self.samples: list[tuple[float, int, int]] = []

    def on_job(self, job_id: str) -> None:
        self.job_id = job_id

    def progress(self, ev: Event) -> None:
        if ev.step == "copying disks" and ev.done is not None and ev.total is not None:
            self.samples.append((time.time(), ev.done, ev.total))


def request_cancel(store: Store, job_id: str) -> None:
    """The watchdog: cancel the job unless it has ended meanwhile."""
    with contextlib.suppress(ConflictError):
        store.request_cancel(job_id)


def decision_times(audit: Path, job: str) -> dict[str, float]:
    """Unix time of each decision the job logged (the first of each name)."""
    out: dict[str, float] = {}
    for line in audit.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("job") == job and rec.get("event") == "decision":
            name = rec["data"]["decision"]
            ts = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            out.setdefault(name, ts)
    return out


def crossing(samples: list[tuple[float, int, int]], level: int) -> float | None:
    """When the mirror offset crossed ``level`` (linear between 0.5 s samples)."""
    for (t0, d0, _), (t1, d1, _) in itertools.pairwise(samples):
        if d0 < level <= d1:
            return t0 + (t1 - t0) * (level - d0) / (d1 - d0)
    return None


def diagnostics(mig: Instrumented, r: dict[str, Any], home: Path,
                data: int) -> dict[str, Any]:
    """Where the mirror's time went, in seconds from the mirror's start, and what the
    probe saw (``r``: the report). The offset runs through the disk in order: zeroes up
    to DATA_OFFSET, the data, then zeroes to the end."""
    if mig.job_id is None:
        return {}
    marks = decision_times(home / "audit.jsonl", mig.job_id)
    start = marks.get("mirror")
    if start is None:
        return {}

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - start, 2)

    lo, hi = DATA_OFFSET + 16 * MiB, DATA_OFFSET + data - 16 * MiB
    t_lo, t_hi = crossing(mig.samples, lo), crossing(mig.samples, hi)
    steady = None
    if t_lo is not None and t_hi is not None and t_hi > t_lo:
        steady = round((hi - lo) / (t_hi - t_lo) / LINK_BYTES_S, 3)
    done = next((t for t, d, n in mig.samples if n and d >= n), None)
    probe = r["probe"] or {}
    gap_start = probe.get("gap_start")
    return {
        "t_data_start_s": rel(crossing(mig.samples, DATA_OFFSET)),
        "t_data_end_s": rel(crossing(mig.samples, DATA_OFFSET + data)),
        "t_offset_complete_s": rel(done),
        "t_ready_s": rel(marks.get("mirrors-ready")),
        "t_migrate_s": rel(marks.get("migrate")),
        "t_handed_over_s": rel(marks.get("disks-handed-over")),
        "steady_link_fraction": steady,
        "gap_ms": probe.get("longest_gap_ms"),
        "gap_at_s": rel(gap_start) if gap_start else None,
        "probe_sent": probe.get("sent"),
        "probe_received": probe.get("received"),
    }


async def online_run(home: Path, size: str, workload: str, strat: str, index: int,
                     rep: int, budget: float) -> dict[str, Any]:
    inv = load_inventory(home / "vmigrate.toml")
    store = Store(home / "vmigrate.db")
    vm = f"o{index}"
    src = pool(inv, "h1") / f"{vm}.raw"
    make_source(src, SIZES[size])
    target: Path | None = None
    disk: dict[str, Any] | None = None
    samples: list[tuple[float, int, int]] = []
    row: dict[str, Any] = {"kind": "online", "size": size, "workload": workload,
                           "strategy": strat, "rep": rep}
    try:
        async with VmService(inv, store) as svc:
            t_boot = time.monotonic()
            await svc.create(CreateRequest(name=vm, host="h1", memory=MEMORY,
                                           disks=[f"{src},format=raw,cache=none"],
                                           workload=WORKLOADS[workload]))
            try:
                console = ConsoleFollower(svc, vm)
                await console.wait(r"VMIGRATE READY", timeout=180)
                row["boot_s"] = round(time.monotonic() - t_boot, 1)
                if workload == "diskwrite":
                    await console.wait(r"DISKWRITE ack=\d+ dev=/dev/vda", timeout=120)
                await asyncio.sleep(3)  # let the workload reach its rate
                mig = Instrumented()
                service = MigrationService(inv, store, AuditLog(home / "audit.jsonl"),
                                           progress=mig.progress)
                loop = asyncio.get_running_loop()
                watchdogs: list[asyncio.TimerHandle] = []

                def started(job_id: str) -> None:
                    mig.on_job(job_id)
                    watchdogs.append(loop.call_later(budget, request_cancel, store, job_id))

                try:
                    report = await service.migrate(request(strat, vm), on_job=started)
                finally:
                    for w in watchdogs:
                        w.cancel()
                r = report.model_dump(mode="json")
                disk = r["disks"][0] if r["disks"] else None
                row["diag"] = diagnostics(mig, r, home, SIZES[size])
                samples = mig.samples
                if r["status"] == "completed" and disk is not None:
                    target = Path(disk["target"])
                    ack = 0
                    if workload == "diskwrite":  # an ack printed on h2: it wrote there
                        for _ in range(20):
                            ack = last_acks(await svc.console(vm)).get("/dev/vda", 0)
                            if ack:
                                break
                            await asyncio.sleep(1)
                    await svc.stop(vm, force=True)
                    if workload == "idle":
                        row["check"] = "identical" if images_identical(src, target) else "DIFFER"
                    elif not ack:
                        row["check"] = "no ack on h2 in 20 s"
                    else:  # every record the guest acknowledged (on h2) is on the target
                        valid = verify_diskwrite_records(target)
                        row["check"] = (f"records ok ({valid} >= {ack})" if valid >= ack
                                        else f"RECORDS BAD ({valid} < {ack})")
            finally:
                await svc.destroy(vm)
    finally:
        store.close()
        src.unlink(missing_ok=True)
        if target is not None:
            target.unlink(missing_ok=True)
    allocated = disk["source_allocated"] if disk else None
    ready = disk["ready_s"] if disk else None
    mbs, frac = fraction(allocated, ready)
    mem = r["memory"] or {}  # None when the job failed before its memory setup
    row.update({
        "status": r["status"], "error": r["error"], "tls": r["tls"],
        "total_time_s": r["total_time_s"], "ready_s": ready,
        "handover_s": disk["handover_s"] if disk else None,
        "source_allocated": allocated, "mirror_offset": mirror_offset(disk, samples),
        "report_mirror_mbps": disk["mbps"] if disk else None,
        "mirror_MBps": mbs, "link_fraction": frac,
        "qemu_downtime_ms": mem.get("qemu_downtime_ms"),
        "observed_downtime_ms": r["observed_downtime_ms"],
        "ram_bytes_sent": mem.get("bytes"), "postcopy": bool(mem.get("postcopy")),
        "answers_ping": r["verification"].get("answers_ping"),
        "guest_crash": r["verification"].get("guest_crash"),
    })
    row.setdefault("check", "-")
    return row


def cold_run(home: Path, name: str, size: str, index: int, rep: int,
             budget: float) -> dict[str, Any]:
    """qemu-nbd (read-only, h1's migration address) -> qemu-img convert in h2's netns."""
    inv = load_inventory(home / "vmigrate.toml")
    src = pool(inv, "h1") / f"c{index}.raw"
    dst = pool(inv, "h2") / f"c{index}.raw"
    make_source(src, SIZES[size])
    dst.unlink(missing_ok=True)
    addr = inv.host("h1").migration_address
    assert addr is not None
    ns1, ns2 = host_netns(home, "h1", name), host_netns(home, "h2", name)
    row: dict[str, Any] = {"kind": "cold", "size": size, "workload": "off",
                           "strategy": "cold", "rep": rep}
    # `ip netns exec` execs qemu-nbd: the PID is qemu-nbd's own
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns1, "qemu-nbd", "--read-only", "--format=raw",
         "--persistent", f"--bind={addr}", f"--port={NBD_PORT}", "--export-name=cold",
         str(src)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            ss = subprocess.run(["ip", "netns", "exec", ns1, "ss", "-Hltn",
                                 f"sport = :{NBD_PORT}"], capture_output=True, text=True)
            if ss.stdout.strip():
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.1)
        t0 = time.monotonic()
        res = subprocess.run(["ip", "netns", "exec", ns2, "qemu-img", "convert", "-f", "raw",
                              "-O", "raw", f"nbd://{addr}:{NBD_PORT}/cold", str(dst)],
                             capture_output=True, text=True, timeout=budget)
        copy_s = round(time.monotonic() - t0, 3)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    try:
        allocated = src.stat().st_blocks * 512
        ok = res.returncode == 0
        mbs, frac = fraction(allocated, copy_s) if ok else (None, None)
        row.update({
            "status": "completed" if ok else "failed",
            "error": None if ok else res.stderr.strip()[-500:], "tls": False,
            "total_time_s": copy_s, "ready_s": copy_s, "handover_s": None,
            "source_allocated": allocated, "mirror_MBps": mbs, "link_fraction": frac,
            "qemu_downtime_ms": None, "observed_downtime_ms": None,
            "cold_downtime_s": copy_s if ok else None,
            "target_allocated": dst.stat().st_blocks * 512 if ok else None,
            "check": ("identical" if images_identical(src, dst) else "DIFFER") if ok else "-",
        })
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return row


def mirror_offset(disk: dict[str, Any] | None,
                  samples: list[tuple[float, int, int]]) -> int | None:
    """The mirror's own byte count (the sparse ranges and the blocks copied again
    included) when it was completed, else at its last progress sample. The report
    keeps what crossed the link instead: ``wire_bytes`` = allocated + (offset -
    virtual size) once the mirror was ready (its offset then reached its length, at
    least the virtual size), so the final offset is that, inverted."""
    if disk is not None and disk["handover_s"] is not None:
        return int(disk["virtual_size"] + disk["wire_bytes"] - disk["source_allocated"])
    return samples[-1][1] if samples else None


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(rows: list[dict[str, Any]]) -> str:
    out = ["| data | guest | strategy | status | total s | copy s (mirror to ready) | "
           "copied MiB | MB/s | / link | / link, data range only | QEMU downtime ms | "
           "observed downtime ms | check |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cold = r["kind"] == "cold"
        done = r["status"] == "completed"
        qemu = f"(VM off {r['cold_downtime_s']:.1f} s)" if cold and done else _f(
            r["qemu_downtime_ms"] if done else None, ".0f")
        out.append(
            f"| {r['size']} | {r['workload']} | {LABELS[r['strategy']]} | {r['status']} | "
            f"{_f(r['total_time_s'], '.1f')} | {_f(r['ready_s'], '.1f')} | "
            f"{_f(r['source_allocated'] / MiB if r['source_allocated'] else None, '.0f')} | "
            f"{_f(r['mirror_MBps'], '.1f')} | {_f(r['link_fraction'], '.0%')} | "
            f"{_f(r.get('diag', {}).get('steady_link_fraction'), '.0%')} | {qemu} | "
            f"{_f(r['observed_downtime_ms'] if done else None, '.0f')}"
            f"{' (no reply on h2 in 30 s)' if r.get('answers_ping') is False else ''} | "
            f"{r['check']}{' GUEST CRASH' if r.get('guest_crash') else ''} |")
    out += ["", "Medians per data size and strategy (over guest workloads and repeats):", "",
            "| data | strategy | runs completed | median / link | median / link, data range | "
            "median total s | median QEMU downtime ms | median observed downtime ms |",
            "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["size"], r["strategy"]), []).append(r)
    for (size, strat), rs in groups.items():
        ok = [r for r in rs if r["status"] == "completed"]
        frac = _med([r["link_fraction"] for r in ok])
        out.append(
            f"| {size} | {LABELS[strat]} | {len(ok)}/{len(rs)} | {_f(frac, '.0%')} | "
            f"{_f(_med([r.get('diag', {}).get('steady_link_fraction') for r in ok]), '.0%')} | "
            f"{_f(_med([r['total_time_s'] for r in ok]), '.1f')} | "
            f"{_f(_med([r['qemu_downtime_ms'] for r in ok]), '.0f')} | "
            f"{_f(_med([r['observed_downtime_ms'] for r in ok]), '.0f')} |")
    # paired: vmigrate's throughput over the libvirt-like one in the same cell and repeat
    pairs: list[float] = []
    by_cell = {(r["size"], r["workload"], r["rep"], r["strategy"]): r for r in rows}
    for (size, wl, rep, strat), r in by_cell.items():
        other = by_cell.get((size, wl, rep, "libvirt-like"))
        if strat == "vmigrate" and other and r["mirror_MBps"] and other["mirror_MBps"]:
            pairs.append(r["mirror_MBps"] / other["mirror_MBps"])
    if pairs:
        out += ["", f"vmigrate (TLS) / libvirt-like (no TLS) mirror throughput, paired per "
                f"cell: median {statistics.median(pairs):.3f} over {len(pairs)} pairs "
                f"(min {min(pairs):.3f}, max {max(pairs):.3f})"]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 MiB of data only")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (default 1)")
    ap.add_argument("--budget", type=float, default=600.0,
                    help="seconds a migration or copy may run before it is cancelled")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--only", action="append", default=None, metavar="STRATEGY",
                    help="run only this strategy (repeatable): vmigrate, libvirt-like, cold")
    args = ap.parse_args()
    require_root()
    build_image()
    sizes = ["256M"] if args.quick else list(SIZES)
    home = Path(tempfile.mkdtemp(prefix="vmigrate-bench-"))
    os.environ[HOME_ENV] = str(home)
    name = "o" + secrets.token_hex(2)
    rows: list[dict[str, Any]] = []
    started = time.time()

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # partial results survive an interrupted run
            args.out.write_text(json.dumps(rows, indent=2))

    try:
        lab_up(LabSpec(name=name, hosts=2, link_rate=LINK), home)
        for host in ("h1", "h2"):
            set_link_rate(home, host, LINK, name)
        index = 0
        for size in sizes:
            for rep in range(args.repeat):
                for workload in WORKLOADS:
                    for strat in STRATEGIES:
                        if args.only and strat not in args.only:
                            continue
                        index += 1
                        keep(asyncio.run(online_run(home, size, workload, strat, index, rep,
                                                    args.budget)))
                if not args.only or "cold" in args.only:
                    index += 1
                    keep(cold_run(home, name, size, index, rep, args.budget))
    finally:
        lab_down(home, name)
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{len(rows)} runs in {time.time() - started:.0f} s; machine: {os.cpu_count()} "
          f"cores, guests under TCG, {MEMORY} RAM; link {LINK} ({LINK_BYTES_S / 1e6:.0f} MB/s) "
          f"on both hosts\n")
    print(summarise(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
