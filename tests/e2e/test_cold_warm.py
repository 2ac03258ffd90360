"""Cold and warm migration end to end: real QEMU, SSH and the transfer engine in the lab.

Each test builds its disks in h1's local pool and moves the VM into h2's; it checks
where the VM runs, what the copies hold, and what the report says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import (
    guest,  # noqa: F401  (fixture)
    slow_links,  # noqa: F401  (fixture)
    vm_host,
)
from tests.e2e.test_online import create, pool, sha256
from tests.e2e.test_vms import BOOT_MARK, boot_sector_image, wait_for_console
from vmigrate.lab.disks import thin_raw_image

pytestmark = pytest.mark.lab

MiB = 1 << 20


def move(lab: Lab, vm: str, mode: str, *args: str, timeout: float = 600
         ) -> tuple[int, dict[str, Any]]:
    res = lab.cli("migrate", vm, "--to", "h2", "--mode", mode, "--json", *args,
                  timeout=timeout)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def test_cold_moves_own_boot_image(lab: Lab, guest: list[str]) -> None:  # noqa: F811
    src = pool(lab, "h1") / "cold-boot.raw"
    boot_sector_image(src)
    with src.open("r+b") as f:  # data past the boot sector, so "identical" means much
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(bytes(range(256)) * 4096 * 8)
    digest = sha256(src)
    guest.append("coldboot")
    res = lab.cli("vm", "create", "coldboot", "--host", "h1", "--memory", "64M",
                  "--disk", f"{src},format=raw", "--no-nic")
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, "coldboot", BOOT_MARK, timeout=60)
    # the boot sector ignores the power button: hard stop after the timeout
    rc, r = move(lab, "coldboot", "cold", "--shutdown-timeout", "3")
    assert rc == 0, r
    assert r["status"] == "completed" and r["mode"] == "cold"
    assert vm_host(lab, "coldboot") == "h2"
    target = Path(r["disks"][0]["target"])
    assert target.parent == pool(lab, "h2")
    assert sha256(target) == digest
    assert r["disks"][0]["verified"] == "full"
    assert r["verification"]["dest_running"] is True
    wait_for_console(lab, "coldboot", BOOT_MARK, timeout=60)
    assert src.exists()  # kept without --delete-source


def test_cold_refuses_bad_input_and_changes_nothing(lab: Lab) -> None:
    res = lab.cli("migrate", "nosuchvm", "--to", "h2", "--mode", "cold")
    assert res.returncode == 2, res.stderr
    res = lab.cli("migrate", "x", "--to", "h2", "--mode", "cold", "--cutover", "+5")
    assert res.returncode == 2 and "--cutover" in res.stderr


def _disk_with_data(path: Path, data: int) -> None:
    # diskwrite's records start at 0; the random data sits past them
    thin_raw_image(path, 1024 * MiB, data, offset=512 * MiB)


def test_warm_keeps_every_record_and_cuts_over_faster_than_cold(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    slow_links("200mbit")
    downtime: dict[str, float] = {}
    for mode in ("cold", "warm"):
        name = f"{mode}dw"
        src = pool(lab, "h1") / f"{name}.raw"
        _disk_with_data(src, 256 * MiB)
        guest.append(name)
        create(lab, name, [src], workload="diskwrite:dev=/dev/vda,rate=100")
        wait_for_console(lab, name, r"DISKWRITE ack=\d+", timeout=60)
        t0 = time.monotonic()
        rc, r = move(lab, name, mode)
        assert rc == 0, (r["error"], r["steps"], r["verification"])
        assert vm_host(lab, name) == "h2"
        assert r["verification"]["answers_ping"] is True
        downtime[mode] = r["observed_downtime_ms"]
        print(f"{mode}: downtime {r['observed_downtime_ms']:.0f} ms, total "
              f"{time.monotonic() - t0:.1f} s, rounds {[s['detail'] for s in r['steps']]}")
        # every record the guest acknowledged on h1 was on h2's copy before it booted
        rec = r["verification"]["records"]["/dev/vda"]
        assert rec["found"] >= rec["acked"] > 0
        # and the guest writes on there
        wait_for_console(lab, name, r"DISKWRITE ack=\d+", timeout=60)
        target = Path(r["disks"][0]["target"])
        assert target.parent == pool(lab, "h2")
        assert r["disks"][0]["verified"] == "full"
        if mode == "warm":
            assert len(r["steps"]) >= 3  # base copy, at least one round, last delta
            last = r["steps"][-1]["detail"]
            assert last.startswith("last delta")
    print(f"downtime: cold {downtime['cold']:.0f} ms, warm {downtime['warm']:.0f} ms, "
          f"ratio {downtime['warm'] / downtime['cold']:.2f}")
    assert downtime["warm"] < 0.8 * downtime["cold"]
