"""VMs on lab hosts over real SSH: the lab guest, a VM from a disk the test writes, bad specs."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
from vmigrate.lab.probe import ping
from vmigrate.lab.records import last_acks, verify_diskwrite_records

pytestmark = pytest.mark.lab

BOOT_MARK = "VMIGRATE-BOOTSECTOR-OK"


def wait_for_console(lab: Lab, vm: str, pattern: str, timeout: float) -> re.Match[str]:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        res = lab.cli("vm", "console", vm)
        text = res.stdout
        match = regex.search(text)
        if match:
            return match
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} on {vm}'s console; last output:\n{text[-2000:]}")


def qemu_pids(lab: Lab) -> list[int]:
    """PIDs in the lab hosts' VM pidfiles whose processes are alive."""
    pids = []
    for pidfile in lab.home.glob("labs/*/hosts/*/data/vms/*/qemu.pid"):
        text = pidfile.read_text().strip()
        if text.isdigit() and Path(f"/proc/{text}").exists():
            pids.append(int(text))
    return pids


def boot_sector_image(path: Path) -> None:
    """A 1 MiB raw disk whose boot sector prints BOOT_MARK on COM1 and halts."""
    code = bytes.fromhex(
        "fa"          # cli
        "31c0"        # xor ax, ax
        "8ed8"        # mov ds, ax
        "be167c"      # mov si, 0x7c16 (the message)
        "baf803"      # mov dx, 0x3f8 (COM1)
        "ac"          # next: lodsb
        "84c0"        # test al, al
        "7403"        # jz done
        "ee"          # out dx, al
        "ebf8"        # jmp next
        "f4"          # done: hlt
        "ebfd"        # jmp done
    )
    assert len(code) == 0x16
    sector = code + (BOOT_MARK + "\r\n").encode() + b"\0"
    sector = sector.ljust(510, b"\0") + b"\x55\xaa"
    path.write_bytes(sector + bytes(1024 * 1024 - 512))


def test_lab_guest_runs_memtouch_and_answers_ping(lab: Lab) -> None:
    info = lab.cli_json("vm", "create", "g1", "--host", "h1", "--memory", "256M",
                        "--workload", "memtouch:wss=32M,rate=2000")
    assert isinstance(info, dict)
    ip = info["ip"]
    assert ip and info["host"] == "h1"
    try:
        wait_for_console(lab, "g1", r"MEMCHECK pass=\d+ ok", timeout=180)
        assert lab.inventory.lab is not None
        result = ping(lab.inventory.lab.probe_netns, ip, count=3)
        assert result.received == 3
        reply = lab.cli("vm", "qmp", "g1", '{"execute": "query-status"}')
        assert reply.returncode == 0, reply.stderr
        assert '"status": "running"' in reply.stdout
        listing = lab.cli_json("vm", "list")
        assert listing == [{"name": "g1", "host": "h1", "state": "running", "ip": ip}]
        assert "FAIL" not in lab.cli("vm", "console", "g1").stdout
    finally:
        res = lab.cli("vm", "destroy", "g1")
        assert res.returncode == 0, res.stderr
    assert qemu_pids(lab) == []
    assert lab.cli_json("vm", "list") == []


def test_lab_guest_powers_off_on_acpi_power_button(lab: Lab) -> None:
    disk = lab.inventory.host("h1").pools["shared"] / "powerbtn.raw"
    disk.parent.mkdir(parents=True, exist_ok=True)
    with disk.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    res = lab.cli("vm", "create", "pwr", "--host", "h1", "--memory", "128M", "--no-nic",
                  "--workload", "diskwrite:dev=/dev/vda,rate=50",
                  "--disk", f"{disk},format=raw,cache=none")
    assert res.returncode == 0, res.stderr
    try:
        wait_for_console(lab, "pwr", r"DISKWRITE ack=[1-9]\d* dev=/dev/vda", timeout=120)
        started = time.monotonic()
        res = lab.cli("vm", "stop", "pwr", "--timeout", "15")  # no --force: ACPI power-down
        elapsed = time.monotonic() - started
        assert res.returncode == 0, res.stderr
        assert elapsed < 15
        show = lab.cli_json("vm", "show", "pwr")
        assert isinstance(show, dict) and show["state"] == "stopped"
        text = lab.cli("vm", "console", "pwr").stdout
        assert "VMIGRATE POWEROFF" in text
        # diskwrite got SIGTERM, finished its record and said so before the power went.
        assert "VMIGRATE WORKLOAD EXIT kind=diskwrite status=0" in text
        ack = last_acks(text)["/dev/vda"]
        assert verify_diskwrite_records(disk) >= ack > 0
    finally:
        lab.cli("vm", "destroy", "pwr")
    assert qemu_pids(lab) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_vm_boots_from_disk_image_the_test_wrote(lab: Lab, fmt: str) -> None:
    shared = lab.inventory.host("h2").pools["shared"]
    raw = shared / f"boot-{fmt}.raw"
    boot_sector_image(raw)
    disk = raw
    if fmt == "qcow2":
        disk = shared / "boot.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)], check=True)
    name = f"disk-{fmt}"
    res = lab.cli("vm", "create", name, "--host", "h2", "--memory", "64M", "--no-nic",
                  "--disk", f"{disk},format={fmt}")
    assert res.returncode == 0, res.stderr
    try:
        wait_for_console(lab, name, BOOT_MARK, timeout=60)
        show = lab.cli_json("vm", "show", name)
        assert isinstance(show, dict)
        assert show["state"] == "running" and show["host"] == "h2"
    finally:
        lab.cli("vm", "destroy", name)
    assert qemu_pids(lab) == []


@pytest.mark.parametrize(
    "args",
    [
        ["vm", "create", "bad1", "--host", "h9", "--workload", "idle"],
        ["vm", "create", "bad2", "--host", "h1", "--disk", "/nonexistent/disk.img"],
        ["vm", "create", "bad3", "--host", "h1", "--memory", "abc", "--workload", "idle"],
        ["vm", "create", "bad4", "--host", "h1", "--workload", "memtouch:wss=lots"],
        ["vm", "create", "bad 5", "--host", "h1", "--workload", "idle"],
    ],
    ids=["unknown-host", "missing-disk", "memory-abc", "bad-workload", "bad-name"],
)
def test_bad_spec_is_refused_with_nothing_started(lab: Lab, args: list[str]) -> None:
    res = lab.cli(*args)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert lab.cli_json("vm", "list") == []
    assert qemu_pids(lab) == []


def test_qmp_on_unknown_vm_is_user_error(lab: Lab) -> None:
    res = lab.cli("vm", "qmp", "nosuchvm", "query-status")
    assert res.returncode == 2


def start_bootsector_vm(lab: Lab, name: str, disk: Path) -> None:
    """VM ``name`` on h1 booting the boot-sector image written to ``disk`` (64 MiB of
    RAM, raw, cache=none), running once its console says so."""
    boot_sector_image(disk)
    res = lab.cli("vm", "create", name, "--host", "h1", "--memory", "64M",
                  "--disk", f"{disk},format=raw,cache=none")
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, name, "VMIGRATE-BOOTSECTOR-OK", timeout=60)
