"""Benchmark: evacuating a host, vmigrate's wave against the ways other tools do it.

A 3-host lab: h1's uplink at --uplink (default 1gbit), h2's and h3's downlinks narrower
(--downlink, default 200mbit), so that running migrations to both destinations at once
can beat one at a time (with one shared source link, sequential is already optimal).
--guests guests (128 MiB, a mix of idle guests and guests dirtying memory at up to a
third of a downlink) start on h1, then h1 is evacuated, once per strategy:

- vmigrate:      'wave run --evacuate h1' as the product does it: placement, the
                 network-aware schedule, each move capped within the links' budgets
                 (the lab's [links] budget, 0.8), the adaptive policy;
- sequential:    Nova's default (host-evacuate-live, one migration at a time), its
                 downtime steps (nova-defaults, as in bench/live.py), no bandwidth cap;
- all-at-once:   every migration at once, QEMU's defaults, no cap;
- kubevirt:      at most 5 migrations in the cluster and 2 out of a node, random order,
                 no bandwidth limit, QEMU's 300 ms downtime, no post-copy, aborted after
                 150 s per GiB of guest memory (KubeVirt's completionTimeoutPerGiB);
- proxmox:       'migrateall' to one target (h2), 2 workers, VMs by name, its
                 doubling downtime policy (proxmox-like, as in bench/live.py).

The baselines go to the destinations vmigrate's placement picks (h2 and h3), except
proxmox (h2 only). Each run records the makespan (first start to last end), the sum and
the longest observed downtime (the 1 ms probe), failed or aborted migrations, bytes on
the wire over guest RAM, the busiest 1 s average on each link against its budget
(veth counters at 4 Hz), and for vmigrate the ETA predicted before the start against
the makespan.

Usage: sudo .venv/bin/python bench/fleet.py [--guests 6] [--uplink 1gbit]
       [--downlink 200mbit] [--only STRATEGY ...] [--repeat 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmigrate.audit.log import AuditLog
from vmigrate.config import HOME_ENV, Inventory, load_inventory
from vmigrate.errors import VmigrateError
from vmigrate.fleet import WaveRunner, store_wave
from vmigrate.lab._plan import parse_rate
from vmigrate.lab.image import build_image
from vmigrate.lab.links import lab_link_rates
from vmigrate.lab.net import LAB_LINK_BUDGET, LabSpec, lab_down, lab_up, require_root
from vmigrate.lab.traffic import LinkKey, LinkSampler
from vmigrate.plan.policy import Policy, Step
from vmigrate.service.fleet import plan_wave
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.vms import ConsoleFollower, CreateRequest, VmService
from vmigrate.store import Store

STRATEGIES = ("vmigrate", "sequential", "all-at-once", "kubevirt", "proxmox")
PAGE = 4096
GiB = 1 << 30


def policies() -> dict[str, Policy]:
    """The baselines' convergence policies (no timeout of their own but KubeVirt's)."""
    long = 3600.0
    return {
        "sequential": Policy(
            name="nova-defaults", downtime_ms=50, timeout_s=long, timeout_action="abort",
            steps=tuple(Step(after_stalls=1, action="downtime", value=50 * i)
                        for i in range(2, 11))),
        "all-at-once": Policy(name="qemu-defaults", downtime_ms=300, steps=(),
                              timeout_s=long, timeout_action="abort"),
        "kubevirt": Policy(name="kubevirt-like", downtime_ms=300, steps=(),
                           timeout_s=150.0 * 128 / 1024, timeout_action="abort"),
        "proxmox": Policy(
            name="proxmox-like", downtime_ms=100, timeout_s=long, timeout_action="abort",
            steps=(Step(after_stalls=1, action="throttle", value=20),
                   *(Step(after_stalls=1, action="downtime", value=100 * 2**i)
                     for i in range(1, 8)))),
    }


def with_policies(inv: Inventory) -> Inventory:
    tables = {**inv.policies, **{p.name: p.model_dump(mode="json")
                                 for p in policies().values()}}
    return inv.model_copy(update={"policies": tables})


def workloads(n: int, downlink: float) -> list[str]:
    """Idle guests and guests dirtying 10, 20, 30 % of a downlink, in turn."""
    out = []
    for i in range(n):
        share = (0.0, 0.1, 0.2, 0.3)[i % 4]
        rate = int(share * downlink / PAGE)
        out.append("idle" if rate == 0 else f"memtouch:wss=16M,rate={rate}")
    return out


async def start_guests(inv: Inventory, store: Store, names: list[str],
                       loads: list[str]) -> None:
    async with VmService(inv, store) as svc:
        for vm, load in zip(names, loads, strict=True):
            await svc.create(CreateRequest(name=vm, host="h1", memory="128M", workload=load))
        for vm, load in zip(names, loads, strict=True):
            await ConsoleFollower(svc, vm).wait(
                "MEMCHECK pass=\\d+ ok" if load != "idle" else "VMIGRATE READY", timeout=300)
    await asyncio.sleep(3)


async def destroy_all(inv: Inventory, store: Store) -> None:
    async with VmService(inv, store) as svc:
        for rec in store.list_vms():
            try:
                await svc.destroy(rec.name)
            except VmigrateError as exc:
                print(f"bench: destroying {rec.name}: {exc}", file=sys.stderr)


async def run_baseline(inv: Inventory, store: Store, audit: AuditLog, strategy: str,
                       moves: list[tuple[str, str]], seed: int) -> list[dict[str, Any]]:
    """The moves as ``strategy`` runs them; one row per migration."""
    policy = policies()[strategy]
    service = MigrationService(with_policies(inv), store, audit)
    rows: list[dict[str, Any]] = []
    cluster = asyncio.Semaphore({"sequential": 1, "all-at-once": len(moves),
                                 "kubevirt": 5, "proxmox": 2}[strategy])
    per_node = asyncio.Semaphore(2 if strategy == "kubevirt" else len(moves))
    order = list(moves)
    if strategy == "kubevirt":
        random.Random(seed).shuffle(order)
    else:
        order.sort()

    async def one(vm: str, dst: str) -> None:
        async with cluster, per_node:
            t0 = time.monotonic()
            report = await service.migrate(MigrationRequest(
                vm=vm, dest=dst, mode="live", policy=policy.name, tls=True))
            r = report.model_dump(mode="json")
            rows.append({"vm": vm, "dst": dst, "status": r["status"],
                         "started": t0, "ended": time.monotonic(),
                         "observed_downtime_ms": r["observed_downtime_ms"],
                         "bytes": r["bytes_transferred"], "error": r["error"]})

    if strategy == "sequential":
        for vm, dst in order:
            await one(vm, dst)
    else:
        await asyncio.gather(*(one(vm, dst) for vm, dst in order))
    return rows


async def run_vmigrate(inv: Inventory, store: Store, audit: AuditLog
                       ) -> tuple[list[dict[str, Any]], float, list[tuple[str, str]]]:
    """The product's evacuation; its rows, the ETA predicted before the start, and the
    moves it planned (the baselines take the same destinations)."""
    plan = await plan_wave(inv, store, evacuate="h1")
    rec = store_wave(store, plan.schedule, kind="evacuate", host="h1",
                     modes={m.vm: "live" for m in plan.placement.moves})
    runner = WaveRunner(store, audit, lambda p: MigrationService(inv, store, audit, progress=p))
    t0 = time.monotonic()
    report = await runner.run(rec.id)
    t1 = time.monotonic()
    rows = []
    for m in report["moves"]:
        meas = m.get("measured") or {}
        rows.append({"vm": m["vm"], "dst": m["dst"],
                     "status": "completed" if m["state"] == "done" else m["state"],
                     "started": t0, "ended": t1,
                     "observed_downtime_ms": meas.get("downtime_ms"),
                     "bytes": meas.get("bytes"), "error": m.get("error")})
    moves = [(m.vm, m.dst) for m in plan.placement.moves]
    return rows, plan.schedule.makespan_s, moves


async def one_run(home: Path, strategy: str, n: int, downlink: float, seed: int,
                  moves: list[tuple[str, str]] | None) -> tuple[dict[str, Any],
                                                                list[tuple[str, str]] | None]:
    inv = load_inventory(home / "vmigrate.toml")
    store = Store(home / "vmigrate.db")
    audit = AuditLog(home / "audit.jsonl")
    names = [f"g{secrets.token_hex(2)}{i}" for i in range(n)]
    try:
        await start_guests(inv, store, names, workloads(n, downlink))
        budgets: dict[LinkKey, float] = {
            ("h1", "up"): LAB_LINK_BUDGET * parse_rate_bytes(home, "h1", "up"),
            ("h2", "down"): LAB_LINK_BUDGET * downlink,
            ("h3", "down"): LAB_LINK_BUDGET * downlink}
        eta: float | None = None
        started = time.monotonic()
        with LinkSampler(home, ["h1", "h2", "h3"]) as sampler:
            if strategy == "vmigrate":
                rows, eta, moves = await run_vmigrate(inv, store, audit)
            else:
                assert moves is not None, "run vmigrate first: the baselines take its placement"
                ours = [(vm, dst) for vm, dst in
                        zip(names, [d for _, d in sorted(moves)], strict=False)]
                if strategy == "proxmox":
                    ours = [(vm, "h2") for vm, _ in ours]
                rows = await run_baseline(inv, store, audit, strategy, ours, seed)
        makespan = time.monotonic() - started
        peaks = {f"{h} {d}": round(sampler.peak(h, d) / budgets[(h, d)], 3)
                 for h, d in budgets}
        ram = n * 128 * (1 << 20)
        downs = [r["observed_downtime_ms"] or 0.0 for r in rows
                 if r["status"] == "completed"]
        row = {"strategy": strategy, "guests": n, "makespan_s": round(makespan, 1),
               "eta_s": round(eta, 1) if eta is not None else None,
               "completed": sum(r["status"] == "completed" for r in rows),
               "failed": [r["vm"] for r in rows if r["status"] != "completed"],
               "downtime_sum_ms": round(sum(downs), 1),
               "downtime_max_ms": round(max(downs, default=0.0), 1),
               "bytes_per_ram": round(sum(r["bytes"] or 0 for r in rows) / ram, 2),
               "peak_1s_over_budget": peaks, "runs": rows}
        return row, moves
    finally:
        await destroy_all(inv, store)
        store.close()


def parse_rate_bytes(home: Path, host: str, direction: str) -> float:
    up, down = lab_link_rates(home)[host]
    return up if direction == "up" else down


def summarise(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], []).append(r)

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(r[key]) for r in rs)

    out = ["| strategy | makespan s | vs sequential | downtime sum ms | downtime max ms | "
           "failed | bytes / RAM | busiest 1 s / budget | ETA s |",
           "|---|---|---|---|---|---|---|---|---|"]
    seq = med(by["sequential"], "makespan_s") if "sequential" in by else None
    for name in STRATEGIES:
        rs = by.get(name)
        if not rs:
            continue
        mk = med(rs, "makespan_s")
        peaks = {k: max(r["peak_1s_over_budget"][k] for r in rs)
                 for k in rs[0]["peak_1s_over_budget"]}
        out.append(
            f"| {name} | {mk:.1f} | {mk / seq:.2f} | " if seq else f"| {name} | {mk:.1f} | - | ")
        out[-1] += (f"{med(rs, 'downtime_sum_ms'):.0f} | {med(rs, 'downtime_max_ms'):.0f} | "
                    f"{sum(len(r['failed']) for r in rs)} | {med(rs, 'bytes_per_ram'):.2f} | "
                    + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()) + " | "
                    + (f"{med(rs, 'eta_s'):.1f}" if rs[0]["eta_s"] is not None else "-")
                    + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=6)
    ap.add_argument("--uplink", default="1gbit")
    ap.add_argument("--downlink", default="200mbit")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", action="append", default=None, choices=STRATEGIES)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    require_root()
    build_image()
    home = Path(tempfile.mkdtemp(prefix="vmigrate-fleet-"))
    os.environ[HOME_ENV] = str(home)
    name = "fb" + secrets.token_hex(2)
    down = parse_rate(args.downlink) / 8
    rows: list[dict[str, Any]] = []
    started = time.time()
    strategies = [s for s in STRATEGIES if not args.only or s in args.only or s == "vmigrate"]
    try:
        lab_up(LabSpec(name=name, hosts=3, link_rate=args.uplink, uplinks={"h1": args.uplink},
                       downlinks={"h2": args.downlink, "h3": args.downlink}), home)
        moves: list[tuple[str, str]] | None = None
        for i in range(max(1, args.repeat)):
            for strat in strategies:
                row, got = asyncio.run(one_run(home, strat, args.guests, down,
                                               args.seed + i, moves))
                if strat == "vmigrate":
                    moves = got
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    finally:
        lab_down(home, name)
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{len(rows)} runs in {time.time() - started:.0f} s; {args.guests} guests of 128 "
          f"MiB on h1; h1 up {args.uplink}, h2 and h3 down {args.downlink}; link budget "
          f"{LAB_LINK_BUDGET}; {os.cpu_count()} cores, guests under TCG\n")
    print(summarise(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
