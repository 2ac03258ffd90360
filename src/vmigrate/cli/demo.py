"""``vmigrate demo``: the main job, end to end, in a throw-away lab."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from vmigrate.audit.log import AuditLog
from vmigrate.cli._common import err, out, print_json, run
from vmigrate.cli.migrate import render_report
from vmigrate.cli.plan import render_plan
from vmigrate.config import HOME_ENV, Inventory, load_inventory
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.image import build_image
from vmigrate.lab.net import LabSpec, lab_down, lab_up, require_root
from vmigrate.lab.probe import ping
from vmigrate.lab.records import last_acks, verify_diskwrite_records
from vmigrate.plan.capabilities import MigrationOptions
from vmigrate.plan.policy import BUILTIN, DEFAULT_POLICY
from vmigrate.progress import Event, lines
from vmigrate.service.assess import Assessor
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.planning import make_plan, prediction_record
from vmigrate.service.vms import ConsoleFollower, CreateRequest, VmService
from vmigrate.store import Store

GUEST = "demo-guest"
DISK_GUEST = "demo-disk"
WARM_GUEST = "demo-warm"
#: the online guest's disk: 1 GiB, thin, 64 MiB of data; the guest appends records to it
DISK_SIZE, DISK_DATA = 1 << 30, 64 << 20
DISK_WORKLOAD = "diskwrite:dev=/dev/vda,rate=50"
#: ~80 MB/s of dirtied memory under TCG: above the 200 mbit (25 MB/s) migration links
WORKLOAD = "memtouch:wss=64M,rate=20000"
LINK_RATE = "200mbit"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _step(msg: str) -> None:
    err.print(f"[bold cyan]==>[/] {msg}")


def _console_line(line: str) -> None:
    """Echo the guest's own lines (not the kernel's boot log)."""
    if line.startswith(("VMIGRATE", "MEMCHECK", "DISKWRITE")):
        err.print(f"   [dim]{line}[/]", markup=True, highlight=False)


async def _guest(home: Path, summary: dict[str, Any]) -> None:
    inv = load_inventory(home / "vmigrate.toml")
    assert inv.lab is not None
    store = Store(home / "vmigrate.db")
    async with VmService(inv, store) as svc:
        _step(f"starting lab guest {GUEST} on h1 with workload {WORKLOAD}")
        t0 = time.monotonic()
        info = await svc.create(
            CreateRequest(name=GUEST, host="h1", memory="256M", workload=WORKLOAD)
        )
        summary["vm"] = {"name": GUEST, "host": info.host, "ip": info.spec.ip,
                         "workload": WORKLOAD}
        _step("guest console (heartbeat and memory check):")
        console = ConsoleFollower(svc, GUEST)
        await console.wait(r"VMIGRATE READY", timeout=180, on_line=_console_line)
        summary["vm"]["boot_seconds"] = round(time.monotonic() - t0, 1)
        match = await console.wait(r"MEMCHECK pass=(\d+) (ok|FAIL)", timeout=120,
                                   on_line=_console_line)
        summary["vm"]["memcheck"] = match.group(0)
        await console.wait(r"VMIGRATE HEARTBEAT", timeout=30, on_line=_console_line)
        reply = await svc.qmp(GUEST, {"execute": "query-status"})
        summary["vm"]["qmp_status"] = reply.get("return", {}).get("status")
        if info.spec.ip:
            _step(f"ping {info.spec.ip} from the probe namespace {inv.lab.probe_netns}")
            result = ping(inv.lab.probe_netns, info.spec.ip, count=5)
            summary["ping"] = {"sent": result.sent, "received": result.received,
                               "rtt_avg_ms": result.rtt_avg_ms}
        _step(f"assessing {GUEST} and the link h1 -> h2, then predicting every mode")
        opts = MigrationOptions(policy=BUILTIN[DEFAULT_POLICY])
        async with Assessor(inv, store,
                            progress=lines(lambda m: err.print(f"   [dim]{m}[/]"))) as a:
            assessment = await a.assess(GUEST, dest="h2")
        plan = make_plan(inv, store, assessment, opts)
        render_plan(plan, err)
        summary["plan"] = plan.as_dict()
        _step(f"live-migrating {GUEST} h1 -> h2 over {LINK_RATE} TLS links, dirtying memory "
              "faster than the link (policy {DEFAULT_POLICY}: planned from the assessment)")
        prediction = (prediction_record(plan, "live", chosen_by="operator")
                      if plan.predictions["live"].feasible else None)
        report = await _service(inv, store, home).migrate(
            MigrationRequest(vm=GUEST, dest="h2", mode="live"),
            prediction=prediction)
        summary["migration"] = report.model_dump(mode="json")
        _step(f"destroying {GUEST}")
        await svc.destroy(GUEST)
        await _online(inv, store, svc, home, summary)
        await _warm(inv, store, svc, home, summary)
    store.close()


async def _start_disk_guest(inv: Inventory, svc: VmService, name: str, memory: str) -> None:
    """Start ``name`` on h1 writing records to its own thin disk (with some data) in h1's
    local pool; return once it acknowledged a record."""
    pool = inv.host("h1").pools["local"]
    pool.mkdir(parents=True, exist_ok=True)
    disk = pool / f"{name}.raw"
    thin_raw_image(disk, DISK_SIZE, DISK_DATA)
    _step(f"starting {name} on h1 with its disk in h1's local pool ({DISK_WORKLOAD})")
    await svc.create(CreateRequest(name=name, host="h1", memory=memory,
                                   disks=[f"{disk},format=raw,cache=none"],
                                   workload=DISK_WORKLOAD))
    console = ConsoleFollower(svc, name)
    await console.wait(r"DISKWRITE ack=\d+", timeout=180, on_line=_console_line)


async def _online(inv: Inventory, store: Store, svc: VmService, home: Path,
                  summary: dict[str, Any]) -> None:
    """A guest writing records to its own disk in h1's local pool moves, disk and all,
    to h2's local pool; then every acknowledged record is checked on the copy."""
    await _start_disk_guest(inv, svc, DISK_GUEST, "256M")
    _step(f"online-migrating {DISK_GUEST} h1 -> h2: disk copied over NBD (TLS) into h2's "
          "local pool, then memory")
    report = await _service(inv, store, home).migrate(
        MigrationRequest(vm=DISK_GUEST, dest="h2", mode="online"))
    data = report.model_dump(mode="json")
    summary["online"] = data
    if report.status == "completed":
        await asyncio.sleep(3)  # a few records written on h2
        await svc.stop(DISK_GUEST, force=True)
        acks = last_acks(await svc.console(DISK_GUEST))
        target = Path(data["disks"][0]["target"])
        summary["online_records"] = {"acknowledged": acks.get("/dev/vda", 0),
                                     "on_target": verify_diskwrite_records(target)}
    _step(f"destroying {DISK_GUEST}")
    await svc.destroy(DISK_GUEST)


async def _warm(inv: Inventory, store: Store, svc: VmService, home: Path,
                summary: dict[str, Any]) -> None:
    """A guest writing records to its own disk moves warm: base copy and rounds on our
    transfer engine while it runs, then a short stop for the last delta; the
    acknowledged records are checked on h2's copy before it boots there."""
    await _start_disk_guest(inv, svc, WARM_GUEST, "128M")
    _step(f"warm-migrating {WARM_GUEST} h1 -> h2: base copy and incremental rounds while it "
          "runs (encrypted, verified), then it stops for the last delta only")
    report = await _service(inv, store, home).migrate(
        MigrationRequest(vm=WARM_GUEST, dest="h2", mode="warm", shutdown_timeout=20))
    summary["warm"] = report.model_dump(mode="json")
    _step(f"destroying {WARM_GUEST}")
    await svc.destroy(WARM_GUEST)


def _service(inv: Inventory, store: Store, home: Path) -> MigrationService:
    """The service every vmigrate migrate uses, showing one line per phase and step."""
    return MigrationService(inv, store, AuditLog(home / "audit.jsonl"),
                            progress=_DemoProgress())


class _DemoProgress:
    """One line per phase, policy step and note."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, ev: Event) -> None:
        line = ev.message or (f"{ev.phase}: {ev.step}" if ev.step else "")
        if line and line != self.last:
            err.print(f"   [dim]{line}[/]", highlight=False)
            self.last = line


def run_demo(*, keep: bool = False, as_json: bool = False) -> None:
    """Build a lab, run a guest in it, print a summary, tear everything down."""
    require_root()
    _step("building the lab guest image (cached after the first run)")
    build_image(progress=lines(lambda m: err.print(f"   [dim]{m}[/]")))
    home = Path(tempfile.mkdtemp(prefix="vmigrate-demo-"))
    old_home = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    name = "d" + secrets.token_hex(2)
    summary: dict[str, Any] = {"lab": name}
    started = time.monotonic()
    try:
        _step(f"bringing up lab {name}: 2 hosts, {LINK_RATE} migration links")
        inv = lab_up(LabSpec(name=name, hosts=2, link_rate=LINK_RATE), home,
                     progress=lines(lambda m: err.print(f"   [dim]{m}[/]")))
        summary["hosts"] = {h.name: {"ssh": h.address, "migration": h.migration_address}
                            for h in inv.hosts.values()}
        run(_guest(home, summary))
    finally:
        if keep:
            _step(f"lab left up: VMIGRATE_HOME={home} vmigrate lab down")
        else:
            _step("tearing the lab down")
            try:
                lab_down(home, name)
            finally:
                if old_home is None:
                    os.environ.pop(HOME_ENV, None)
                else:
                    os.environ[HOME_ENV] = old_home
                shutil.rmtree(home, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if as_json:
        print_json(summary)
        return
    if mig := summary.get("migration"):
        render_report(mig)
    if onl := summary.get("online"):
        render_report(onl)
    if warm := summary.get("warm"):
        render_report(warm)
    table = Table(title="vmigrate demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("lab", f"{name}: hosts {', '.join(summary.get('hosts', {}))}")
    vm = summary.get("vm", {})
    table.add_row("guest", f"{vm.get('name')} on {vm.get('host')}, ip {vm.get('ip')}")
    table.add_row("boot to READY", f"{vm.get('boot_seconds')} s (TCG)")
    table.add_row("memory check", str(vm.get("memcheck")))
    table.add_row("QMP status", str(vm.get("qmp_status")))
    p = summary.get("ping")
    if p:
        table.add_row("ping from probe", f"{p['received']}/{p['sent']} replies, "
                      f"avg {p['rtt_avg_ms']} ms")
    if mig:
        table.add_row("live migration", f"{mig['status']} in {mig['total_time_s']} s, observed "
                      f"downtime {_ms(mig.get('observed_downtime_ms'))}, memory check on h2: "
                      f"{mig['verification'].get('memcheck')}")
    if plan_ := summary.get("plan"):
        live = plan_["predictions"]["live"].get("figures") or {}
        table.add_row("plan", f"chose {plan_['decision']['chosen']}; live predicted "
                      f"{live.get('total_time_s', 0):.1f} s, downtime "
                      f"{_ms(live.get('downtime_ms'))}, "
                      f"{(live.get('wire_bytes') or 0) / 2**20:,.0f} MiB on the wire"
                      + (" (post-copy)" if plan_["predictions"]["live"]["postcopy"] else ""))
    if onl:
        disk = (onl.get("disks") or [{}])[0]
        rec = summary.get("online_records", {})
        table.add_row("online migration", f"{onl['status']} in {onl['total_time_s']} s, disk "
                      f"ready in {disk.get('ready_s')} s, observed downtime "
                      f"{_ms(onl.get('observed_downtime_ms'))}; records on h2's copy: "
                      f"{rec.get('on_target')} valid, {rec.get('acknowledged')} acknowledged")
    if warm:
        rounds = "; ".join(st["detail"] for st in warm.get("steps", []))
        rec = (warm["verification"].get("records") or {}).get("/dev/vda", {})
        table.add_row("warm migration", f"{warm['status']} in {warm['total_time_s']} s "
                      f"({rounds}); downtime {_ms(warm.get('observed_downtime_ms'))}; "
                      f"records on h2's copy: {rec.get('found')} valid, "
                      f"{rec.get('acked')} acknowledged")
    table.add_row("total time", f"{summary['seconds']} s")
    table.add_row("teardown", "lab removed" if not keep else "lab kept")
    out.print(table)
