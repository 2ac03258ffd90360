"""Online migration end to end: disks copied over NBD between the lab hosts' local pools.

Each test builds its own disks in h1's local pool, migrates to h2's, and asserts the
end state on both hosts: where the VM runs, which QEMU processes and images exist,
and what the images hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import (
    assert_arrived,
    audit_size,
    guest,  # noqa: F401  (fixture)
    last_job,
    slow_links,  # noqa: F401  (fixture)
    vm_host,
    vm_pid_on,
    wait_audit,
)
from tests.e2e.test_vms import boot_sector_image, wait_for_console
from vmigrate.hosts import CommandResult, open_host
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.links import link_down, link_up
from vmigrate.lab.records import last_acks, verify_diskwrite_records

pytestmark = pytest.mark.lab

MiB = 1 << 20


def pool(lab: Lab, host: str, name: str = "local") -> Path:
    path = lab.inventory.host(host).pools[name]
    path.mkdir(parents=True, exist_ok=True)
    return path


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def online(lab: Lab, vm: str, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    res = lab.cli("migrate", vm, "--to", "h2", "--mode", "online", "--json", *args,
                  timeout=timeout)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def create(lab: Lab, name: str, disks: list[Path], *, workload: str = "idle",
           fmt: str = "raw") -> None:
    args = [arg for d in disks for arg in ("--disk", f"{d},format={fmt},cache=none")]
    res = lab.cli("vm", "create", name, "--host", "h1", "--memory", "256M",
                  "--workload", workload, *args)
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, name, r"VMIGRATE READY", timeout=120)


def qemu_img_compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True, timeout=300)


def console(lab: Lab, vm: str) -> str:
    res = lab.cli("vm", "console", vm)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_two_disks_under_diskwrite_move_online(lab: Lab, guest: list[str]) -> None:  # noqa: F811
    a, b = pool(lab, "h1") / "two1-a.raw", pool(lab, "h1") / "two1-b.raw"
    thin_raw_image(a, 1 << 30, 0)
    thin_raw_image(b, 256 * MiB, 0)
    guest.append("two1")
    create(lab, "two1", [a, b], workload="memtouch:wss=64M,rate=5000"
           "+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb,rate=20")
    wait_for_console(lab, "two1", r"MEMCHECK pass=\d+ ok", timeout=120)
    wait_for_console(lab, "two1", r"DISKWRITE ack=\d+ dev=/dev/vdb", timeout=60)
    rc, report = online(lab, "two1")
    assert rc == 0, (report["error"], report["verification"])
    assert_arrived(report)
    assert report["verification"]["memcheck"] == "ok", report["verification"]
    disks = report["disks"]
    assert [Path(d["source"]) for d in disks] == [a, b]
    targets = [Path(d["target"]) for d in disks]
    assert all(t.parent == pool(lab, "h2") for t in targets)
    assert all(d["ready_s"] is not None and d["handover_s"] is not None for d in disks)
    # the guest keeps writing there: new acks on the destination console
    before = last_acks(console(lab, "two1"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        acks = last_acks(console(lab, "two1"))
        if all(acks.get(dev, 0) > before.get(dev, 0) for dev in ("/dev/vda", "/dev/vdb")):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no new acks on the destination: {before} -> {acks}")
    assert lab.cli("vm", "stop", "two1", "--force").returncode == 0
    acks = last_acks(console(lab, "two1"))
    assert verify_diskwrite_records(targets[0]) >= acks["/dev/vda"] > 0
    assert verify_diskwrite_records(targets[1]) >= acks["/dev/vdb"] > 0


def test_raw_to_qcow2_arrives_thin(lab: Lab, guest: list[str]) -> None:  # noqa: F811
    src = pool(lab, "h1") / "thin1.raw"
    thin_raw_image(src, 4 << 30, 100 * MiB)
    guest.append("thin1")
    create(lab, "thin1", [src])
    rc, report = online(lab, "thin1", "--target-format", "qcow2")
    assert rc == 0, (report["error"], report["verification"])
    assert report["status"] == "completed" and report["mode"] == "online"
    assert_arrived(report)
    (disk,) = report["disks"]
    target = Path(disk["target"])
    assert target.parent == pool(lab, "h2") and disk["target_format"] == "qcow2"
    assert disk["source_deleted"] is False and src.exists()  # kept without --delete-source
    # thin: the 4 GiB disk with 100 MiB of data is not inflated on the way
    assert allocated(target) <= 2 * allocated(src), (allocated(target), allocated(src))
    show = lab.cli_json("vm", "show", "thin1")
    assert isinstance(show, dict) and show["host"] == "h2"
    assert qemu_img_compare(src, target).returncode == 0


def test_own_boot_image_content_matches(lab: Lab, guest: list[str]) -> None:  # noqa: F811
    src = pool(lab, "h1") / "boot1.raw"
    boot_sector_image(src)
    with src.open("r+b") as f:  # some data past the boot sector, and a hole
        f.truncate(256 * MiB)
        f.seek(32 * MiB)
        f.write(os.urandom(8 * MiB))
    guest.append("boot1")
    res = lab.cli("vm", "create", "boot1", "--host", "h1", "--memory", "64M",
                  "--disk", f"{src},format=raw,cache=none")
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, "boot1", "VMIGRATE-BOOTSECTOR-OK", timeout=60)
    ref = pool(lab, "h1") / "boot1-ref.raw"  # the source goes with --delete-source
    subprocess.run(["cp", "--sparse=always", str(src), str(ref)], check=True)
    try:
        rc, report = online(lab, "boot1", "--delete-source")
        assert rc == 0, (report["error"], report["verification"])
        (disk,) = report["disks"]
        target = Path(disk["target"])
        assert disk["source_deleted"] is True and not src.exists()
        # the source QEMU stopped at confirm; the guest halted after its boot sector
        assert lab.cli("vm", "stop", "boot1", "--force").returncode == 0
        cmp = qemu_img_compare(ref, target)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        ref.unlink(missing_ok=True)


def test_link_cut_during_mirror_rolls_back(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None]  # noqa: F811
) -> None:
    slow_links("50mbit")  # ~6 MB/s: 200 MiB of data takes ~35 s
    src = pool(lab, "h1") / "cut1.raw"
    thin_raw_image(src, 1 << 30, 200 * MiB)
    guest.append("cut1")
    create(lab, "cut1", [src])
    before = sha256(src)
    offset = audit_size(lab)
    proc = lab.popen("migrate", "cut1", "--to", "h2", "--mode", "online", "--json")
    try:
        wait_audit(lab, "mirror", offset)
        time.sleep(3)
        link_down(lab.home, "h1", lab.name)
        out, errs = proc.communicate(timeout=180)
    finally:
        link_up(lab.home, "h1", lab.name)
        if proc.poll() is None:
            proc.kill()
            out, errs = proc.communicate()
    assert proc.returncode == 1, errs[-3000:] + out
    report = json.loads(out)
    assert report["status"] == "failed" and report["phase"] == "perform"
    assert report["error"]
    assert report["verification"]["source_running"] is True
    assert report["verification"]["dest_clean"] is True
    assert vm_host(lab, "cut1") == "h1"
    assert vm_pid_on(lab, "h1", "cut1") is not None
    assert vm_pid_on(lab, "h2", "cut1") is None
    assert list(pool(lab, "h2").glob("cut1-*")) == []
    assert sha256(src) == before  # the idle guest never wrote; the mirror never did
    assert report["cleanup_errors"] == []


def on_host(lab: Lab, host: str, *argv: str) -> CommandResult:
    """Run a command on a lab host over its SSH (in its own mount namespace)."""

    async def run() -> CommandResult:
        h = open_host(lab.inventory.host(host))
        try:
            return await h.run(list(argv), check=False)
        finally:
            await h.close()

    return asyncio.run(run())


@pytest.fixture
def tiny_pool(lab: Lab) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted on h2 (as h2's sshd sees the filesystem), added to h2 as
    pool "tiny"."""
    mnt = lab.home / "tiny-pool"
    assert on_host(lab, "h2", "mkdir", "-p", str(mnt)).status == 0
    res = on_host(lab, "h2", "mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt))
    assert res.status == 0, res.stderr
    inv = lab.home / "vmigrate.toml"
    original = inv.read_text()
    marker = "[hosts.h2.pools]\n"
    assert marker in original
    inv.write_text(original.replace(marker, f'{marker}tiny = "{mnt}"\n'))
    try:
        yield mnt
    finally:
        inv.write_text(original)
        on_host(lab, "h2", "umount", str(mnt))
        on_host(lab, "h2", "rmdir", str(mnt))


def test_pool_too_small_refused_at_begin(
    lab: Lab, guest: list[str], tiny_pool: Path  # noqa: F811
) -> None:
    src = pool(lab, "h1") / "big1.raw"
    thin_raw_image(src, 1 << 30, 64 * MiB)
    guest.append("big1")
    create(lab, "big1", [src])
    rc, report = online(lab, "big1", "--target-storage", "tiny")
    assert rc == 3, report  # refused in begin: a missing prerequisite (room), nothing started
    assert report["status"] == "failed" and report["phase"] == "begin"
    assert "tiny" in report["error"] and "free" in report["error"]
    assert on_host(lab, "h2", "ls", "-A", str(tiny_pool)).stdout == ""
    assert vm_host(lab, "big1") == "h1"
    assert vm_pid_on(lab, "h2", "big1") is None and vm_pid_on(lab, "h1", "big1") is not None
    # an unknown pool is refused the same way, naming the pools there are
    rc, report = online(lab, "big1", "--target-storage", "nosuch")
    assert rc == 2 and report["phase"] == "begin" and "local" in report["error"]


def test_online_options_need_online_mode(lab: Lab) -> None:
    res = lab.cli("migrate", "nosuchvm", "--to", "h2", "--target-format", "qcow2")
    assert res.returncode == 2 and "--mode online" in res.stderr


def test_controller_killed_during_mirror_is_recovered(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None]  # noqa: F811
) -> None:
    slow_links("50mbit")
    src = pool(lab, "h1") / "kill1.raw"
    thin_raw_image(src, 1 << 30, 200 * MiB)
    guest.append("kill1")
    create(lab, "kill1", [src])
    offset = audit_size(lab)
    proc = lab.popen("migrate", "kill1", "--to", "h2", "--mode", "online", "--json")
    try:
        wait_audit(lab, "mirror", offset)
        time.sleep(2)
        proc.send_signal(signal.SIGKILL)  # the controller we started, by its PID
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert last_job(lab, "kill1")["status"] == "running"  # left behind, mirror still going
    res = lab.cli("job", "recover", "--json")
    assert res.returncode == 0, res.stderr
    assert last_job(lab, "kill1")["status"] == "failed"
    assert vm_host(lab, "kill1") == "h1"
    assert vm_pid_on(lab, "h1", "kill1") is not None
    assert vm_pid_on(lab, "h2", "kill1") is None
    assert list(pool(lab, "h2").glob("kill1-*")) == []
    assert src.exists()
