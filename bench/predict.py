#!/usr/bin/env python3
"""Prediction benchmark: how close ``vmigrate plan``'s figures come to what migrations measure.

Runs in a throw-away lab (root, 2 hosts), driving the real command line as an
operator would (``python -m vmigrate.cli.main ...`` with ``VMIGRATE_HOME`` set),
with ONE state home for every run, so the store's history (and with it the
calibration) accumulates as the benchmark goes.

Scenarios: links {200mbit, 1gbit} (tc tbf on both hosts' migration links) x guest
workloads x modes {live, online, cold, warm}:

* idle:      the lab guest's idle workload;
* memtouch:  ``memtouch:wss=64M,rate=2500`` (2500 pages/s = about 10 MB/s of
             dirtied memory, inside a 64 MiB working set);
* busy:      ``memtouch:wss=64M,rate=15000`` (about 61 MB/s: above a 200 mbit link,
             below 1 gbit; the live modes need the policy's steps);
* diskwrite: ``diskwrite:dev=/dev/vda,rate=100`` (100 records of 4 KiB/s, each
             fdatasync'ed: about 400 KiB/s of disk writes).

Every run: a fresh raw disk in the lab's ``shared`` pool (512 MiB virtual, the
first 128 MiB random data, the rest a hole; shared, so live is possible; online,
cold and warm copy it into h2's ``local`` pool); ``vm create`` on h1 (256M RAM,
that disk as /dev/vda); wait for the guest's ready line; ``assess --to h2``
(defaults: 3 x 1 s dirty-rate windows, one 4 s window, 2 s link probe); then
``migrate --mode M --to h2 --json``, whose report keeps the prediction made from
that assessment before the migration started (``prediction.figures``: calibrated
on the store's earlier migrations; ``prediction.raw``: the model alone). The
measured figures are ``vmigrate.plan.predict.measured_figures(report)`` (the
figures calibration itself learns from). Then the VM is destroyed and its disk
copies deleted. The kernel's byte counters of h1's migration interface are read
around each migration as an independent wire-bytes measurement.

VM names: one per workload (``pidle``, ``pmem``, ``pdisk``), reused by every
run of that workload. Calibration prefers a VM's own history once it has two
migrations of a mode, so reusing a name is what lets per-VM calibration work, as
it would for an operator moving the same VM again; unique names would only ever
exercise the all-VMs calibration. Runs are ordered rounds x links x workloads x
modes (modes innermost), so every mode gets history early: from the third
(link, workload) group on every mode's prediction is calibrated.

A run counts as *calibrated* when at least 2 earlier migrations of its mode
completed with a prediction in this store (what ``calibrate`` needs). Relative
error = |predicted - measured| / measured. Failed runs (VM did not boot, assess
failed, migration not completed, no prediction) are counted and listed, and left
out of the error statistics.

Usage: sudo .venv/bin/python bench/predict.py [--quick] [--rounds N] [--out FILE]
           [--links 200mbit,1gbit] [--workloads idle,memtouch,diskwrite]
           [--modes live,online,cold,warm]
       .venv/bin/python bench/predict.py --from FILE   (summary of a saved run only)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
LINKS = {"200mbit": 25_000_000, "1gbit": 125_000_000}
WORKLOADS = {
    "idle": "idle",
    "memtouch": "memtouch:wss=64M,rate=2500",
    "busy": "memtouch:wss=64M,rate=15000",
    "diskwrite": "diskwrite:dev=/dev/vda,rate=100",
}
VM_NAMES = {"idle": "pidle", "memtouch": "pmem", "busy": "pbusy", "diskwrite": "pdisk"}
MODES = ("live", "online", "cold", "warm")
FIGURES = ("total_time_s", "downtime_ms", "wire_bytes")
SHORT = {"total_time_s": "time", "downtime_ms": "downtime", "wire_bytes": "bytes"}
MEMORY = "256M"
DISK_VIRTUAL = 512 * MiB
DISK_DATA = 128 * MiB
WITHIN = 0.30
CALIBRATED_AFTER = 2  # earlier completed same-mode migrations calibrate() needs


# -- driving the lab ---------------------------------------------------------------------------


class Bench:
    """One lab and one state home; runs scenarios through the real CLI."""

    def __init__(self, home: Path, lab: str, migrate_budget: float) -> None:
        self.home = home
        self.lab = lab
        self.budget = migrate_budget
        self.rows: list[dict[str, Any]] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VMIGRATE_HOME"] = str(self.home)
        env.pop("VMIGRATE_CONFIG", None)
        return env

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        # subprocess.run kills the CLI process it started (by PID) on timeout
        return subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args],
                              env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def inventory(self) -> Any:
        from vmigrate.config import load_inventory
        return load_inventory(self.home / "vmigrate.toml")

    def pool(self, host: str, which: str) -> Path:
        path = Path(self.inventory().host(host).pools[which])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_vm_dirs(self, vm: str) -> list[str]:
        """Remove runtime directories a previous VM of this name left on the hosts (its
        console log is opened with logappend: an old ready line would be read as new).
        Only when no QEMU of that name runs there."""
        from vmigrate.qemu.process import vm_paths
        inv = self.inventory()
        removed = []
        for host in ("h1", "h2"):
            d = Path(vm_paths(inv.host(host), vm).dir)
            pidfile = d / "qemu.pid"
            if pidfile.exists():
                pid = pidfile.read_text().strip()
                if pid.isdigit() and Path(f"/proc/{pid}").exists():
                    continue
            if d.exists():
                removed.append(host)
                shutil.rmtree(d, ignore_errors=True)
        return removed

    def wait_console(self, vm: str, pattern: str, timeout: float) -> None:
        from vmigrate.service.vms import ConsoleFollower, VmService
        from vmigrate.store import Store

        async def go() -> None:
            store = Store(self.home / "vmigrate.db")
            try:
                async with VmService(self.inventory(), store) as svc:
                    await ConsoleFollower(svc, vm).wait(pattern, timeout=timeout)
            finally:
                store.close()
        asyncio.run(go())

    def wire(self) -> tuple[int, int]:
        """(h1 sent, h2 received) on the migration interfaces so far."""
        from vmigrate.lab.links import link_bytes
        return link_bytes(self.home, "h1", self.lab)[1], link_bytes(self.home, "h2", self.lab)[0]

    def active_jobs(self, vm: str) -> list[str]:
        res = self.cli("job", "list", "--active", "--json")
        try:
            return [j["id"] for j in json.loads(res.stdout) if j["vm"] == vm]
        except (ValueError, KeyError, TypeError):
            return []

    def history_counts(self, mode: str, vm: str) -> tuple[int, int]:
        """Earlier migrations of ``mode`` in this bench that calibration can use:
        (all VMs, this VM)."""
        use = [r for r in self.rows if r["mode"] == mode and r["status"] == "completed"
               and r.get("prediction") is not None]
        return len(use), sum(1 for r in use if r["vm"] == vm)

    def expected_factors(self, mode: str, vm: str) -> dict[str, float]:
        """The factors calibrate() should apply, recomputed from this bench's own rows
        as its docstring states the rule (latest 20 of the mode, the VM's own once it has
        2, median measured / raw per figure over raw > 0, at least 2, clamped 0.2..5)."""
        use = [r for r in self.rows if r["mode"] == mode and r["status"] == "completed"
               and r.get("prediction") is not None and r.get("measured") is not None]
        own = [r for r in use if r["vm"] == vm]
        if len(own) >= 2:
            use = own
        use = use[-20:]
        out: dict[str, float] = {}
        for k in FIGURES:
            ratios = [r["measured"][k] / r["prediction"]["raw"][k] for r in use
                      if r["prediction"]["raw"][k] > 0]
            out[k] = min(5.0, max(0.2, statistics.median(ratios))) if len(ratios) >= 2 else 1.0
        return out

    def run(self, index: int, rnd: int, link: str, workload: str, mode: str) -> dict[str, Any]:
        from vmigrate.lab.disks import thin_raw_image
        from vmigrate.plan.predict import measured_figures

        vm = VM_NAMES[workload]
        n_all, n_own = self.history_counts(mode, vm)
        row: dict[str, Any] = {
            "index": index, "round": rnd, "link": link, "workload": workload, "mode": mode,
            "vm": vm, "earlier_same_mode": n_all, "earlier_same_mode_same_vm": n_own,
            "calibrated": n_all >= CALIBRATED_AFTER,
            "calibration_source": ("this VM" if n_own >= 2 else "all VMs"
                                   if n_all >= CALIBRATED_AFTER else "none"),
            "status": "failed", "stage": "create", "error": None, "job": None,
            "expected_factors": self.expected_factors(mode, vm),
        }
        t_run = time.monotonic()
        src = self.pool("h1", "shared") / f"{vm}-{index:03d}.raw"
        report: dict[str, Any] | None = None
        created = False
        try:
            thin_raw_image(src, DISK_VIRTUAL, DISK_DATA, offset=0)
            row["stale_vm_dirs"] = self.clear_vm_dirs(vm)
            t0 = time.monotonic()
            res = self.cli("vm", "create", vm, "--host", "h1", "--memory", MEMORY,
                           "--workload", WORKLOADS[workload],
                           "--disk", f"{src},format=raw")
            if res.returncode != 0:
                raise RuntimeError(f"vm create: {res.stderr.strip()[-400:]}")
            created = True
            row["stage"] = "boot"
            ready = r"MEMCHECK pass=\d+ ok" if workload == "memtouch" else (
                r"DISKWRITE ack=\d+ dev=/dev/vda" if workload == "diskwrite"
                else r"VMIGRATE READY")
            self.wait_console(vm, ready, timeout=240)
            row["boot_s"] = round(time.monotonic() - t0, 1)
            time.sleep(3)  # let the workload reach its rate

            row["stage"] = "assess"
            t0 = time.monotonic()
            res = self.cli("assess", vm, "--to", "h2", "--json", timeout=240)
            if res.returncode != 0:
                raise RuntimeError(f"assess: {res.stderr.strip()[-400:]}")
            a = json.loads(res.stdout)[0]
            row["assess_s"] = round(time.monotonic() - t0, 1)
            row["assessment"] = _assessment_summary(a)

            row["stage"] = "migrate"
            w0 = self.wire()
            t0 = time.monotonic()
            res = self.cli("migrate", vm, "--to", "h2", "--mode", mode, "--json",
                           timeout=self.budget)
            row["migrate_wall_s"] = round(time.monotonic() - t0, 1)
            w1 = self.wire()
            row["link_h1_tx_bytes"] = w1[0] - w0[0]
            row["link_h2_rx_bytes"] = w1[1] - w0[1]
            row["exit"] = res.returncode
            try:
                report = json.loads(res.stdout)
            except ValueError:
                raise RuntimeError(f"migrate (exit {res.returncode}) printed no report: "
                                   f"{res.stderr.strip()[-400:]}") from None
            row["job"] = report.get("job")
            row["status"] = report.get("status")
            row["error"] = report.get("error")
            row["report"] = _report_summary(report)
            pred = report.get("prediction")
            if pred is not None:
                row["prediction"] = {
                    "figures": pred["figures"], "raw": pred["raw"],
                    "factors": {k: (pred["figures"][k] / pred["raw"][k]
                                    if pred["raw"][k] else None) for k in FIGURES},
                    "uncertainty": pred.get("uncertainty"), "postcopy": pred.get("postcopy"),
                    "assessed_at": pred.get("assessed_at"),
                    "same_assessment": pred.get("assessed_at") == a["at"],
                }
                got = row["prediction"]["factors"]
                row["factor_check"] = all(
                    got[k] is None or abs(got[k] - row["expected_factors"][k]) <= 1e-6 * max(
                        1.0, abs(got[k])) for k in FIGURES)
            m = measured_figures(report)
            row["measured"] = m.model_dump(mode="json") if m is not None else None
            if row["status"] == "completed":
                row["stage"] = "done"
                if pred is None:
                    row["stage"] = "prediction"
                    row["error"] = "the report holds no prediction"
                elif m is None:
                    row["stage"] = "measure"
                    row["error"] = "measured_figures() gave None for a completed migration"
            if row["status"] == "completed" and res.returncode != 0:
                row["error"] = (row["error"] or "") + f" (exit {res.returncode}: checks " \
                    f"after the switchover failed: {report.get('verification')})"
        except subprocess.TimeoutExpired as exc:
            row["error"] = f"{row['stage']}: no answer within {exc.timeout:.0f} s"
            for job in self.active_jobs(vm):
                self.cli("job", "cancel", job)
                time.sleep(5)
                self.cli("job", "recover", job, "--force", timeout=300)
        except Exception as exc:  # keep going: the run is listed as failed
            row["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if created:
                res = self.cli("vm", "destroy", vm)
                if res.returncode != 0:
                    row["destroy_error"] = res.stderr.strip()[-400:]
            targets = [Path(d["target"]) for d in (report or {}).get("disks", [])
                       if d.get("target")]
            for path in {src, *targets, *self.pool("h2", "local").glob(f"{src.stem}*")}:
                with contextlib.suppress(OSError):
                    path.unlink()
        row["run_s"] = round(time.monotonic() - t_run, 1)
        row["errors"] = _errors(row)
        self.rows.append(row)
        return row


def _assessment_summary(a: dict[str, Any]) -> dict[str, Any]:
    dirty = a.get("dirty") or []
    total = sum(w["seconds"] for w in dirty)
    return {
        "at": a["at"],
        "dirty_rate": (sum(w["rate"] * w["seconds"] for w in dirty) / total) if total else 0.0,
        "dirty_peak": max((w["rate"] for w in dirty), default=0.0),
        "dirty_set_bytes": a.get("dirty_set_bytes"),
        "nonzero_fraction": a.get("nonzero_fraction"),
        "cpu_pct": a.get("cpu_pct"),
        "disk_write_rate": sum(d.get("write_rate", 0.0) for d in a.get("disks", [])),
        "allocated_bytes": sum(d.get("allocated_bytes", 0) for d in a.get("disks", [])),
        "compress_ratio": [d.get("compress_ratio") for d in a.get("disks", [])],
        "shared": [d.get("shared") for d in a.get("disks", [])],
        "link_bandwidth": (a.get("link") or {}).get("bandwidth"),
    }


def _report_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The parts of a (version-2) migration report worth keeping with the run. The
    memory figures are lifted out of ``memory`` (None for cold and warm);
    ``bytes_transferred`` is everything on the wire (memory stream and disks),
    ``memory_bytes`` the memory stream alone."""
    keep = ("total_time_s", "checks_s", "observed_downtime_ms", "bytes_transferred", "steps",
            "cleanup_errors")
    out = {k: r.get(k) for k in keep}
    mem = r.get("memory") or {}
    for k in ("qemu_total_time_ms", "qemu_downtime_ms", "ram_bytes", "iterations",
              "postcopy", "postcopy_time_s", "paused_guest", "max_throttle_pct"):
        out[k] = mem.get(k)
    out["memory_bytes"] = mem.get("bytes")
    out["disks"] = [{k: d.get(k) for k in ("source", "target", "source_allocated",
                                           "data_bytes", "wire_bytes", "resent_bytes",
                                           "seconds", "ready_s", "handover_s", "verified")}
                    for d in r.get("disks", [])]
    v = r.get("verification") or {}
    out["verification"] = {k: v.get(k) for k in ("dest_running", "answers_ping", "guest_crash",
                                                  "memcheck") if k in v}
    return out


# -- errors and statistics --------------------------------------------------------------------


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas <= 0:
        return None
    return abs(pred - meas) / meas


def _signed(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas <= 0:
        return None
    return (pred - meas) / meas


def _errors(row: dict[str, Any]) -> dict[str, Any] | None:
    pred, meas = row.get("prediction"), row.get("measured")
    if row.get("stage") != "done" or pred is None or meas is None:
        return None
    out: dict[str, Any] = {}
    for basis, figs in (("calibrated", pred["figures"]), ("raw", pred["raw"])):
        out[basis] = {k: _rel(figs[k], meas[k]) for k in FIGURES}
        out[f"{basis}_signed"] = {k: _signed(figs[k], meas[k]) for k in FIGURES}
    link = row.get("link_h1_tx_bytes")
    out["bytes_vs_link_counter"] = {
        "prediction": _rel(pred["figures"]["wire_bytes"], link),
        "raw": _rel(pred["raw"]["wire_bytes"], link),
        "measured_signed": _signed(meas["wire_bytes"], link)}
    return out


def _p90(values: list[float]) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


def stats(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "within_30": None, "p90": None}
    return {"n": len(vals), "median": statistics.median(vals),
            "within_30": sum(v <= WITHIN for v in vals) / len(vals), "p90": _p90(vals)}


def ok_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("errors")]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    good = ok_rows(rows)
    out: dict[str, Any] = {}
    scopes = [("all", good)] + [(m, [r for r in good if r["mode"] == m]) for m in MODES]
    for scope, rs in scopes:
        cal = [r for r in rs if r["calibrated"]]
        out[scope] = {
            "prediction (all runs)": {k: stats([r["errors"]["calibrated"][k] for r in rs])
                                      for k in FIGURES},
            "prediction, calibrated runs": {k: stats([r["errors"]["calibrated"][k]
                                                      for r in cal]) for k in FIGURES},
            "raw model (all runs)": {k: stats([r["errors"]["raw"][k] for r in rs])
                                     for k in FIGURES},
            "bias (median signed, calibrated runs)": {
                k: _median([r["errors"]["calibrated_signed"][k] for r in cal]) for k in FIGURES},
            "bias (median signed, raw, all runs)": {
                k: _median([r["errors"]["raw_signed"][k] for r in rs]) for k in FIGURES},
        }
    for key, values in (("link", sorted({r["link"] for r in good})),
                        ("round", sorted({r["round"] for r in good}))):
        for v in values:
            rs = [r for r in good if r[key] == v]
            out[f"{key} {v}"] = {
                "prediction (all runs)": {k: stats([r["errors"]["calibrated"][k] for r in rs])
                                          for k in FIGURES},
                "prediction, calibrated runs": {
                    k: stats([r["errors"]["calibrated"][k] for r in rs if r["calibrated"]])
                    for k in FIGURES},
            }
    out["bytes vs link counter"] = {}
    for scope, rs in scopes:
        b = [r["errors"]["bytes_vs_link_counter"] for r in rs]
        out["bytes vs link counter"][scope] = {
            "prediction (all runs)": stats([x["prediction"] for x in b]),
            "raw model (all runs)": stats([x["raw"] for x in b]),
            "measured_figures vs counter (median signed)": _median(
                [x["measured_signed"] for x in b]),
        }
    out["calibration factors as documented"] = {
        "checked": sum(1 for r in good if "factor_check" in r),
        "mismatches": [r["index"] for r in good if r.get("factor_check") is False],
    }
    t_all = out["all"]["prediction (all runs)"]["total_time_s"]
    t_cal = out["all"]["prediction, calibrated runs"]["total_time_s"]
    out["targets"] = {
        "median total-time error <= 15 % (all runs)": _ok(t_all["median"], lambda v: v <= 0.15),
        "90 % of runs within 30 % (all runs)": _ok(t_all["within_30"], lambda v: v >= 0.9),
        "median total-time error <= 15 % (calibrated)": _ok(t_cal["median"],
                                                             lambda v: v <= 0.15),
        "90 % of runs within 30 % (calibrated)": _ok(t_cal["within_30"], lambda v: v >= 0.9),
    }
    return out


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _ok(value: float | None, test: Any) -> bool | None:
    return None if value is None else bool(test(value))


# -- rendering --------------------------------------------------------------------------------


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.0%}" if signed else f"{v:.0%}"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(doc: dict[str, Any]) -> str:
    rows, summ, cond = doc["runs"], doc["summary"], doc["conditions"]
    out = [f"{cond['runs']} runs ({cond['completed']} usable, {cond['failed']} failed) in "
           f"{cond['wall_s'] / 60:.1f} min; links {', '.join(cond['links'])}; workloads "
           f"{', '.join(cond['workloads'])}; modes {', '.join(cond['modes'])}; "
           f"{cond['rounds']} round(s); {cond['cpus']} cores, TCG guests, {MEMORY} RAM, one "
           f"raw disk {DISK_VIRTUAL // MiB} MiB virtual / {DISK_DATA // MiB} MiB random data.",
           "", "### Per run", "",
           "| # | link | workload | mode | cal. (earlier) | time s pred / raw / meas | "
           "downtime ms pred / raw / meas | MiB pred / raw / meas (link) | "
           "err time / down / bytes | status |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m, e = r.get("prediction"), r.get("measured"), r.get("errors")

        def trio(k: str, scale: float, fmt: str, p: Any = p, m: Any = m) -> str:
            vals = [p["figures"][k] if p else None, p["raw"][k] if p else None,
                    m[k] if m else None]
            return " / ".join(_num(None if v is None else v / scale, fmt) for v in vals)

        link = r.get("link_h1_tx_bytes")
        errs = " / ".join(_pct(e["calibrated"][k]) for k in FIGURES) if e else "-"
        status = r["status"] if r.get("stage") == "done" else \
            f"{r['status']} at {r['stage']}"
        out.append(
            f"| {r['index']} | {r['link']} | {r['workload']} | {r['mode']} | "
            f"{'yes' if r['calibrated'] else 'no'} ({r['earlier_same_mode']}) | "
            f"{trio('total_time_s', 1, '.1f')} | {trio('downtime_ms', 1, '.0f')} | "
            f"{trio('wire_bytes', MiB, '.0f')} ({_num(link / MiB if link else None, '.0f')}) | "
            f"{errs} | {status} |")
    out += ["", "### Relative error |predicted - measured| / measured", "",
            "| scope | basis | n | time median | time within 30 % | time p90 | "
            "downtime median | downtime within 30 % | downtime p90 | bytes median | "
            "bytes within 30 % | bytes p90 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scope in ("all", *MODES):
        for basis in ("prediction (all runs)", "prediction, calibrated runs",
                      "raw model (all runs)"):
            s = summ[scope][basis]
            n = s["total_time_s"]["n"]
            if n == 0:
                continue
            cells = []
            for k in FIGURES:
                cells += [_pct(s[k]["median"]), _pct(s[k]["within_30"]), _pct(s[k]["p90"])]
            out.append(f"| {scope} | {basis} | {n} | " + " | ".join(cells) + " |")
    out += ["", "Prediction (calibrated figures) by link and by round:", "",
            "| scope | basis | n | time median | time within 30 % | time p90 | "
            "downtime median | downtime within 30 % | downtime p90 | bytes median | "
            "bytes within 30 % | bytes p90 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scope in [k for k in summ if k.startswith(("link ", "round "))]:
        for basis in ("prediction (all runs)", "prediction, calibrated runs"):
            s = summ[scope][basis]
            n = s["total_time_s"]["n"]
            if n == 0:
                continue
            cells = []
            for k in FIGURES:
                cells += [_pct(s[k]["median"]), _pct(s[k]["within_30"]), _pct(s[k]["p90"])]
            out.append(f"| {scope} | {basis} | {n} | " + " | ".join(cells) + " |")
    out += ["", "### Wire bytes against the kernel's counter of h1's migration interface", "",
            "(sent bytes, IP/TCP headers included, read around each migrate command)", "",
            "| scope | n | prediction: median error | within 30 % | p90 | raw model: median "
            "error | within 30 % | p90 | measured_figures vs counter, median signed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for scope, b in summ["bytes vs link counter"].items():
        p, w = b["prediction (all runs)"], b["raw model (all runs)"]
        if not p["n"]:
            continue
        out.append(f"| {scope} | {p['n']} | {_pct(p['median'])} | {_pct(p['within_30'])} | "
                   f"{_pct(p['p90'])} | {_pct(w['median'])} | {_pct(w['within_30'])} | "
                   f"{_pct(w['p90'])} | "
                   f"{_pct(b['measured_figures vs counter (median signed)'], True)} |")
    fc = summ["calibration factors as documented"]
    out += ["", f"Calibration factors in the reports equal the documented rule recomputed "
            f"from this bench's rows in {fc['checked'] - len(fc['mismatches'])} of "
            f"{fc['checked']} runs" + (f" (mismatch: runs {fc['mismatches']})"
                                       if fc["mismatches"] else "") + "."]
    out += ["", "### Bias: median signed error (predicted - measured) / measured", "",
            "| scope | time, calibrated runs | downtime, calibrated runs | bytes, calibrated "
            "runs | time, raw | downtime, raw | bytes, raw |", "|---|---|---|---|---|---|---|"]
    for scope in ("all", *MODES):
        c = summ[scope]["bias (median signed, calibrated runs)"]
        w = summ[scope]["bias (median signed, raw, all runs)"]
        out.append(f"| {scope} | " + " | ".join(_pct(c[k], True) for k in FIGURES) + " | "
                   + " | ".join(_pct(w[k], True) for k in FIGURES) + " |")
    out += ["", "### Targets (total time)", ""]
    for what, ok in summ["targets"].items():
        out.append(f"* {what}: {'met' if ok else 'not met' if ok is not None else 'no data'}")
    failed = [r for r in rows if not r.get("errors")]
    out += ["", f"### Failed or unusable runs: {len(failed)}", ""]
    for r in failed:
        out.append(f"* #{r['index']} {r['link']} {r['workload']} {r['mode']}: status "
                   f"{r['status']} at {r['stage']}, job {r.get('job')}: {r.get('error')}")
    return "\n".join(out)


def build_doc(bench_rows: list[dict[str, Any]], cond: dict[str, Any]) -> dict[str, Any]:
    cond = {**cond, "runs": len(bench_rows), "completed": len(ok_rows(bench_rows)),
            "failed": len(bench_rows) - len(ok_rows(bench_rows))}
    return {"conditions": cond, "summary": summary(bench_rows), "runs": bench_rows}


# -- main -------------------------------------------------------------------------------------


def _list(text: str, known: Any, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad or not items:
        raise SystemExit(f"unknown {what}: {', '.join(bad) or '(none)'}; known: "
                         f"{', '.join(known)}")
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1,
                    help="times every (link, workload, mode) runs (default 1: 32 runs, about "
                    "30 min here; with 2, every run of round 2 is calibrated on its own VM's "
                    "history, about 60 min)")
    ap.add_argument("--quick", action="store_true",
                    help="200mbit only, idle and memtouch, one round (8 runs)")
    ap.add_argument("--links", default=",".join(LINKS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--budget", type=float, default=900.0,
                    help="seconds one migrate command may take before it is stopped")
    ap.add_argument("--out", type=Path, default=Path("/tmp/predict-bench.json"),
                    help="full results as JSON (rewritten after every run)")
    ap.add_argument("--from", dest="from_file", type=Path, default=None,
                    help="do not run: print the summary of a saved --out file")
    args = ap.parse_args()
    if args.from_file is not None:
        saved = json.loads(args.from_file.read_text())
        for row in saved["runs"]:  # recomputed: a file of an older version of this script
            row["errors"] = _errors(row)
        print(render(build_doc(saved["runs"], saved["conditions"])))
        return 0

    from vmigrate.config import HOME_ENV
    from vmigrate.lab.image import build_image
    from vmigrate.lab.links import set_link_rate
    from vmigrate.lab.net import LabSpec, lab_down, lab_up, require_root

    links = _list(args.links, LINKS, "link")
    workloads = _list(args.workloads, WORKLOADS, "workload")
    modes = _list(args.modes, MODES, "mode")
    rounds = args.rounds
    if args.quick:
        links, workloads, rounds = ["200mbit"], ["idle", "memtouch"], 1
    require_root()
    build_image()

    def on_term(signum: int, _frame: object) -> None:  # a plain kill still tears the lab down
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    home = Path(tempfile.mkdtemp(prefix="vmigrate-predict-"))
    os.environ[HOME_ENV] = str(home)
    name = "p" + secrets.token_hex(2)
    bench = Bench(home, name, args.budget)
    started = time.time()
    cond: dict[str, Any] = {
        "links": links, "workloads": {w: WORKLOADS[w] for w in workloads}, "modes": modes,
        "rounds": rounds, "memory": MEMORY, "disk_virtual": DISK_VIRTUAL,
        "disk_data": DISK_DATA, "cpus": os.cpu_count(), "lab": name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0,
        "vm_names": {w: VM_NAMES[w] for w in workloads},
    }

    def save() -> dict[str, Any]:
        cond["wall_s"] = round(time.time() - started, 1)
        doc = build_doc(bench.rows, cond)
        args.out.write_text(json.dumps(doc, indent=2))
        return doc

    try:
        lab_up(LabSpec(name=name, hosts=2, link_rate=links[0]), home)
        index = 0
        current = None
        for rnd in range(1, rounds + 1):
            for link in links:
                if link != current:
                    for host in ("h1", "h2"):
                        set_link_rate(home, host, link, name)
                    current = link
                for workload in workloads:
                    for mode in modes:
                        index += 1
                        row = bench.run(index, rnd, link, workload, mode)
                        e = row.get("errors")
                        errs = (" ".join(f"{SHORT[k]} {_pct(e['calibrated'][k])}"
                                         for k in FIGURES) if e else row.get("error"))
                        print(f"[{index}] r{rnd} {link} {workload} {mode}: {row['status']} "
                              f"({row['stage']}) cal={row['calibrated']} "
                              f"run {row['run_s']} s; {errs}", file=sys.stderr, flush=True)
                        save()
    finally:
        try:
            doc = save()
        finally:
            keep = args.out.with_suffix(".state")  # the store and audit log, for job evidence
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            for f in ("vmigrate.db", "audit.jsonl"):
                if (home / f).exists():
                    shutil.copy2(home / f, keep / f)
            lab_down(home, name)
            shutil.rmtree(home, ignore_errors=True)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
