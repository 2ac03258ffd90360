"""Assess, plan and migrate --mode auto against the lab: real QEMU (calc-dirty-rate,
query-blockstats), a real link probe between host namespaces, real migrations."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import assert_arrived, guest, slow_links, start_guest, vm_host
from tests.e2e.test_vms import wait_for_console
from vmigrate.plan.assessment import Assessment

pytestmark = pytest.mark.lab

__all__ = ["guest", "slow_links"]  # fixtures used here

PAGE = 4096
MiB = 1 << 20


def data_disk(lab: Lab, name: str, data: int, virtual: int) -> Path:
    """A raw disk in the lab's shared pool with ``data`` random bytes at its start."""
    path = lab.inventory.host("h1").pools["shared"] / f"{name}.raw"
    with path.open("wb") as f:
        for _ in range(data // MiB):
            f.write(os.urandom(MiB))
        f.truncate(virtual)
    return path


def assess(lab: Lab, vm: str, *args: str) -> Assessment:
    got = lab.cli_json("assess", vm, "--to", "h2", *args, timeout=120)
    assert isinstance(got, list) and len(got) == 1
    return Assessment.model_validate(got[0])


def test_assessed_dirty_rate_matches_memtouch(lab: Lab, guest: list[str]) -> None:
    guest.append("as1")
    rate = 5000  # pages/s = 19.5 MiB/s
    start_guest(lab, "as1", f"memtouch:wss=256M,rate={rate}", memory="512M")
    a = assess(lab, "as1")
    expected = rate * PAGE
    assert a.running and a.memory_bytes == 512 * MiB
    assert len(a.dirty) >= 3
    assert abs(a.dirty_rate - expected) <= 0.2 * expected, (a.dirty_rate, expected)
    assert a.dirty_peak >= a.dirty_rate
    assert a.cpu_pct > 0
    # the session lab's links run at 1 gbit: the probe sees most of it, never more
    assert a.link is not None and 0.3 * 125e6 < a.link.bandwidth < 1.1 * 125e6
    assert a.tls is True
    # stored: the window advice finds it in the history
    advice = lab.cli_json("plan", "as1", "--window")
    assert isinstance(advice, list) and advice[0]["best"] is not None


def test_unknown_vm_and_bad_options_fail_cleanly(lab: Lab) -> None:
    assert lab.cli("assess", "nosuchvm").returncode == 2  # NotFoundError is a UserError
    assert lab.cli("assess", "nosuchvm", "--windows", "0").returncode == 2
    assert lab.cli("plan", "nosuchvm").returncode == 2  # neither --to nor --window
    assert lab.cli("migrate", "nosuchvm", "--to", "h2", "--mode", "sideways").returncode == 2


def test_plan_idle_and_dirty_guests_choose_differently_then_auto_migrates(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None]
) -> None:
    slow_links("50mbit")  # 6.25 MB/s
    idle_disk = data_disk(lab, "pl-idle", 256 * MiB, 512 * MiB)
    busy_disk = data_disk(lab, "pl-busy", 256 * MiB, 512 * MiB)
    guest.extend(["plidle", "plbusy"])
    res = lab.cli("vm", "create", "plidle", "--host", "h1", "--memory", "256M",
                  "--workload", "idle", "--disk", str(idle_disk))
    assert res.returncode == 0, res.stderr
    # 7700 pages/s = 31.5 MB/s: five times the link
    res = lab.cli("vm", "create", "plbusy", "--host", "h1", "--memory", "384M",
                  "--workload", "memtouch:wss=192M,rate=7700", "--disk", str(busy_disk))
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, "plidle", r"VMIGRATE READY", timeout=120)
    wait_for_console(lab, "plbusy", r"MEMCHECK pass=\d+ ok", timeout=120)

    got = lab.cli_json("plan", "plidle", "plbusy", "--to", "h2", timeout=240)
    assert isinstance(got, list) and len(got) == 2
    plans: dict[str, dict[str, Any]] = {p["vm"]: p for p in got}
    idle, busy = plans["plidle"], plans["plbusy"]
    link = lab.cli_json("assess", "plbusy", "--to", "h2", "--windows", "1")
    assert isinstance(link, list)
    busy_a = Assessment.model_validate(link[0])
    assert busy_a.link is not None and busy_a.dirty_rate > 3 * busy_a.link.bandwidth
    # every mode predicted, with figures
    for p in (idle, busy):
        assert set(p["predictions"]) == {"live", "online", "cold", "warm"}
        assert p["predictions"]["live"]["figures"]["total_time_s"] > 0
    assert busy["predictions"]["live"]["postcopy"] is True or \
        busy["predictions"]["live"]["aborts"] is True
    assert idle["predictions"]["live"]["postcopy"] is False
    chosen_idle = idle["decision"]["chosen"]
    chosen_busy = busy["decision"]["chosen"]
    assert chosen_idle == "live"
    assert chosen_busy not in (None, chosen_idle)
    why = " ".join(busy["decision"]["explanation"]).lower()
    assert "post-copy" in why or "dirty" in why, why

    # the text form says the same
    res = lab.cli("plan", "plidle", "--to", "h2")
    assert res.returncode == 0 and "live" in res.stdout

    # auto takes the plan's choice; the report puts prediction next to measurement
    # (the busy guest goes first: two TCG guests on two cores starve the probe)
    assert lab.cli("vm", "destroy", "plbusy").returncode == 0
    res = lab.cli("migrate", "plidle", "--to", "h2", "--mode", "auto", "--json", timeout=400)
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads(res.stdout)
    assert report["mode"] == "live" and report["status"] == "completed"
    assert_arrived(report)
    assert vm_host(lab, "plidle") == "h2"
    pred = report["prediction"]
    assert pred["chosen_by"] == "auto" and pred["mode"] == "live"
    for key in ("total_time_s", "downtime_ms", "wire_bytes"):
        assert pred["figures"][key] > 0
    assert report["total_time_s"] > 0 and report["bytes_transferred"] > 0
    shown = lab.cli("job", "show", report["job"])
    assert shown.returncode == 0 and "predicted" in shown.stdout and "measured" in shown.stdout
    for d in (idle_disk, busy_disk):
        d.unlink()

