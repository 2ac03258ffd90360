"""CPU models and machine types that migrate, end to end on the lab's real QEMU 7.2.

One small guest on h1 (its QEMU only needs to run: no test here waits for it to boot)
and three refusals that must happen in ``begin``, with exit status 2 and nothing started
on h2: h2's QEMU lacking the guest's machine type (an inventory ``qemu_binary`` wrapper
that plays an older QEMU), and h2 restricted by the inventory to an older CPU model
(``cpu_limit``). The inventory is restored after each.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from vmigrate.config import dump_inventory, parse_inventory

pytestmark = pytest.mark.lab

VM = "cpu1"
#: an older QEMU on h2: it lacks pc-i440fx-7.2 (its -machine help and QMP say so, and
#: it refuses to start one), as a QEMU 7.1 would
OLDER_QEMU = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in
    pc-i440fx-7.2|pc-i440fx-7.2,*)
      echo "qemu-system-x86_64: unsupported machine type 'pc-i440fx-7.2'" >&2; exit 1;;
  esac
done
qemu-system-x86_64 "$@" | sed -e 's/pc-i440fx-7\\.2/pc-i440fx-7.1/g'
"""


def qemu_cmdline(lab: Lab, host: str, vm: str) -> list[str] | None:
    pidfile = lab.inventory.host(host).data_dir / "vms" / vm / "qemu.pid"
    if not pidfile.exists():
        return None
    pid = pidfile.read_text().strip()
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None


def edit_h2(lab: Lab, **fields: Any) -> None:
    path = lab.home / "vmigrate.toml"
    inv = parse_inventory(path.read_text(), str(path))
    h2 = inv.hosts["h2"].model_copy(update=fields)
    path.write_text(dump_inventory(inv.model_copy(update={"hosts": {**inv.hosts, "h2": h2}})))


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[dict[str, Any]]:
    """A small lab guest on h1, defined with the defaults (its QEMU runs; it may still be
    booting); destroyed afterwards."""
    res = lab.cli("vm", "create", VM, "--host", "h1", "--memory", "128M", "--workload",
                  "idle", "--json")
    assert res.returncode == 0, res.stderr
    try:
        yield json.loads(res.stdout)
    finally:
        lab.cli("vm", "destroy", VM)


@pytest.fixture
def inventory(lab: Lab) -> Iterator[None]:
    """The test may change the inventory; it is restored afterwards."""
    path = lab.home / "vmigrate.toml"
    original = path.read_text()
    try:
        yield
    finally:
        path.write_text(original)


def refused_in_begin(lab: Lab) -> dict[str, Any]:
    """A live migration of the guest to h2 that begin refuses: exit 2, the job failed
    in begin, nothing of the VM on h2, the guest still on h1."""
    before = {j["id"] for j in lab.cli_json("job", "list") if j["vm"] == VM}  # type: ignore
    res = lab.cli("migrate", VM, "--to", "h2", "--mode", "live", "--json", timeout=120)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    report = json.loads(res.stdout)
    assert report["status"] == "failed" and report["phase"] == "begin", report
    jobs = [j for j in lab.cli_json("job", "list") if j["vm"] == VM]  # type: ignore
    assert [j["phase"] for j in jobs if j["id"] not in before] == ["begin"]
    assert qemu_cmdline(lab, "h2", VM) is None
    # no QEMU was started there (starting one writes the spec next to its pidfile first)
    assert not (lab.inventory.host("h2").data_dir / "vms" / VM / "spec.json").exists()
    assert qemu_cmdline(lab, "h1", VM) is not None
    return report


def test_a_vm_is_defined_with_a_baseline_cpu_and_a_versioned_machine(
        lab: Lab, guest: dict[str, Any]) -> None:
    spec = guest["spec"]
    assert spec["machine"] == "pc-i440fx-7.2"
    assert spec["cpu"]["name"] == "x86-64-v2-AES" and spec["cpu"]["model"] == "qemu64-v1"
    argv = qemu_cmdline(lab, "h1", VM)
    assert argv is not None
    assert argv[argv.index("-cpu") + 1].startswith("qemu64-v1,aes=on,")
    assert argv[argv.index("-machine") + 1].startswith("pc-i440fx-7.2,")
    # what the lab's TCG hosts cannot give is refused before anything is defined
    for cpu in ("host", "Skylake-Client-v4"):
        res = lab.cli("vm", "create", "cpu2", "--host", "h1", "--cpu", cpu, "--no-start")
        assert res.returncode == 2, (cpu, res.stderr)
    assert "cpu2" not in {v["name"] for v in lab.cli_json("vm", "list")}  # type: ignore


def test_a_destination_without_the_machine_type_is_refused_in_begin(
        lab: Lab, guest: dict[str, Any], inventory: None, tmp_path: Path) -> None:
    wrapper = tmp_path / "qemu-7.1"
    wrapper.write_text(OLDER_QEMU)
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    edit_h2(lab, qemu_binary=str(wrapper))
    report = refused_in_begin(lab)
    assert "pc-i440fx-7.2" in report["error"]


def test_a_destination_restricted_to_an_older_cpu_is_refused_in_begin(
        lab: Lab, guest: dict[str, Any], inventory: None) -> None:
    edit_h2(lab, cpu_limit="Conroe")
    report = refused_in_begin(lab)
    # the features x86-64-v2 has and a Core 2 (Conroe) has not, named
    assert all(f in report["error"] for f in ("aes", "popcnt", "sse4.1", "sse4.2"))
