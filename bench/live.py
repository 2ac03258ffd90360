#!/usr/bin/env python3
"""Live-migration benchmark: vmigrate's default policy against baselines, side by side.

Runs in a throw-away lab (root), one migration per (link, dirty level, strategy):

* links: 1gbit and 200mbit (tc tbf on both hosts' migration links);
* dirty levels: idle, 0.5x, 2x and 5x the link rate, asked of the lab guest's
  memtouch workload in pages/s (the rate the guest reached is measured by QEMU
  and reported: under TCG the guest cannot reach every level);
* strategies, all over the same TLS links:
    - vmigrate:       the built-in 'balanced' policy (the default);
    - qemu-defaults:  QEMU 7.2 as started: 300 ms downtime limit, 128 MiB/s cap,
                      pre-copy only;
    - proxmox-like:   auto-converge and XBZRLE from the start, downtime limit
                      starting at 100 ms and doubled at every stall (PVE's
                      QemuMigrate), pre-copy only;
    - nova-defaults:  live_migration_downtime 500 ms reached in 10 steps from
                      50 ms (here one step per stalled iteration rather than per
                      75 s x GiB), no auto-converge, no post-copy.
  Baselines that do not finish within --budget seconds are cancelled and count
  as not completed (QEMU itself would go on copying).

Each run records completion, total time, QEMU's downtime, the observed downtime
(longest gap of a 1 ms ping from the probe namespace) and bytes sent.

Usage: sudo .venv/bin/python bench/live.py [--quick] [--budget 90] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmigrate.audit.log import AuditLog
from vmigrate.config import HOME_ENV, Inventory, load_inventory
from vmigrate.lab.image import build_image
from vmigrate.lab.links import set_link_rate
from vmigrate.lab.net import LabSpec, lab_down, lab_up, require_root
from vmigrate.plan.policy import BUILTIN, Policy, Step
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.vms import ConsoleFollower, CreateRequest, VmService
from vmigrate.store import Store

LINKS = {"1gbit": 125_000_000, "200mbit": 25_000_000}
LEVELS = {"idle": 0.0, "0.5x": 0.5, "2x": 2.0, "5x": 5.0}
PAGE = 4096
WSS = "64M"
MEMORY = "256M"


@dataclass(frozen=True)
class Strategy:
    """One way to run the migration: a convergence policy and the stream's compression."""

    policy: Policy
    compress: str | None = None


def strategies(budget: float) -> dict[str, Strategy]:
    qemu = Policy(name="qemu-defaults", downtime_ms=300, bandwidth=128 << 20, steps=(),
                  timeout_s=budget, timeout_action="abort")
    proxmox = Policy(
        name="proxmox-like", downtime_ms=100, timeout_s=budget, timeout_action="abort",
        steps=(Step(after_stalls=1, action="throttle", value=20),
               *(Step(after_stalls=1, action="downtime", value=100 * 2**i) for i in range(1, 8))),
    )
    nova = Policy(
        name="nova-defaults", downtime_ms=50, timeout_s=budget, timeout_action="abort",
        steps=tuple(Step(after_stalls=1, action="downtime", value=50 * i) for i in range(2, 11)),
    )
    return {
        "vmigrate": Strategy(BUILTIN["balanced"]),
        "qemu-defaults": Strategy(qemu),
        "proxmox-like": Strategy(proxmox, compress="xbzrle"),
        "nova-defaults": Strategy(nova),
    }


def with_policy(inv: Inventory, policy: Policy) -> Inventory:
    """``inv`` with ``policy`` among its ``[policies.NAME]`` tables (the service takes a
    policy by name; a built-in one is already known)."""
    if BUILTIN.get(policy.name) == policy:
        return inv
    tables = {**inv.policies, policy.name: policy.model_dump(mode="json")}
    return inv.model_copy(update={"policies": tables})


async def one_run(home: Path, link: str, level: str, name: str, how: Strategy,
                  index: int) -> dict[str, Any]:
    inv = load_inventory(home / "vmigrate.toml")
    store = Store(home / "vmigrate.db")
    rate = int(LEVELS[level] * LINKS[link] / PAGE)
    workload = "idle" if rate == 0 else f"memtouch:wss={WSS},rate={rate}"
    vm = f"b{index}"
    async with VmService(inv, store) as svc:
        await svc.create(CreateRequest(name=vm, host="h1", memory=MEMORY, workload=workload))
        try:
            console = ConsoleFollower(svc, vm)
            await console.wait("MEMCHECK pass=\\d+ ok" if rate else "VMIGRATE READY",
                               timeout=180)
            await asyncio.sleep(3)  # let the workload reach its rate
            mig = MigrationService(with_policy(inv, how.policy), store,
                                   AuditLog(home / "audit.jsonl"))
            report = await mig.migrate(MigrationRequest(
                vm=vm, dest="h2", mode="live", policy=how.policy.name,
                compress=how.compress, tls=True))
        finally:
            await svc.destroy(vm)
    store.close()
    r = report.model_dump(mode="json")
    mem = r["memory"] or {}  # None when the job failed before its memory setup
    return {
        "link": link, "level": level, "strategy": name, "asked_pages_s": rate,
        "completed": r["status"] == "completed", "status": r["status"],
        "total_time_s": r["total_time_s"], "qemu_downtime_ms": mem.get("qemu_downtime_ms"),
        "observed_downtime_ms": r["observed_downtime_ms"],
        # live: shared storage, so everything on the wire is the memory stream
        "bytes": r["bytes_transferred"], "ram_bytes": mem.get("ram_bytes"),
        "postcopy": bool(mem.get("postcopy")), "steps": [s["action"] for s in r["steps"]],
        "memcheck": r["verification"].get("memcheck"), "error": r["error"],
    }


def summarise(rows: list[dict[str, Any]]) -> str:
    out = ["| link | dirty | strategy | completed | total s | QEMU downtime ms | "
           "observed downtime ms | bytes / RAM | post-copy |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['bytes'] / r['ram_bytes']:.2f}" if r["bytes"] and r["ram_bytes"] else "-"
        obs = r["observed_downtime_ms"]
        out.append(
            f"| {r['link']} | {r['level']} | {r['strategy']} | "
            f"{'yes' if r['completed'] else 'no'} | {r['total_time_s']} | "
            f"{r['qemu_downtime_ms'] if r['completed'] else '-'} | "
            f"{f'{obs:.0f}' if obs is not None and r['completed'] else '-'} | {ratio} | "
            f"{'yes' if r['postcopy'] else 'no'} |")
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)
    out.append("")
    out.append("| strategy | completion | median observed downtime where dirty <= 0.5x (ms) |")
    out.append("|---|---|---|")
    for name, rs in by.items():
        done = sum(r["completed"] for r in rs)
        low = [r["observed_downtime_ms"] for r in rs if r["completed"]
               and r["level"] in ("idle", "0.5x") and r["observed_downtime_ms"] is not None]
        med = f"{statistics.median(low):.0f}" if low else "-"
        out.append(f"| {name} | {done}/{len(rs)} | {med} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="only the 200mbit link and the idle and 2x levels")
    ap.add_argument("--budget", type=float, default=90.0,
                    help="seconds a baseline may run before it counts as not completed")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--only", action="append", default=None, metavar="STRATEGY",
                    help="run only this strategy (repeatable): vmigrate, qemu-defaults, "
                    "proxmox-like, nova-defaults")
    args = ap.parse_args()
    require_root()
    build_image()
    links = ["200mbit"] if args.quick else list(LINKS)
    levels = ["idle", "2x"] if args.quick else list(LEVELS)
    home = Path(tempfile.mkdtemp(prefix="vmigrate-bench-"))
    os.environ[HOME_ENV] = str(home)
    name = "b" + secrets.token_hex(2)
    rows: list[dict[str, Any]] = []
    started = time.time()
    try:
        lab_up(LabSpec(name=name, hosts=2, link_rate=links[0]), home)
        index = 0
        for link in links:
            for host in ("h1", "h2"):
                set_link_rate(home, host, link, name)
            for level in levels:
                for strat, how in strategies(args.budget).items():
                    if args.only and strat not in args.only:
                        continue
                    index += 1
                    row = asyncio.run(one_run(home, link, level, strat, how, index))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        lab_down(home, name)
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{len(rows)} runs in {time.time() - started:.0f} s; machine: {os.cpu_count()} "
          f"cores, guests under TCG, {MEMORY} RAM, working set {WSS}\n")
    print(summarise(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
