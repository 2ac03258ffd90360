"""End to end: build the lab guest image and boot it under QEMU (TCG).

The image is built into the default image directory, so it is cached between
runs.  Each test starts its own QEMU with ``subprocess.Popen`` and kills only
that process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import pytest

from vmigrate.lab.image import GuestImage, build_image
from vmigrate.lab.records import last_acks, verify_diskwrite_records
from vmigrate.lab.workloads import Workload, kernel_cmdline, parse_workload, parse_workloads

QEMU = "qemu-system-x86_64"

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which(QEMU) is None,
        reason="needs root and qemu-system-x86_64",
    ),
]

BOOT_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image()


class Guest:
    """A QEMU process booting the lab guest, with its serial console in a file."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        """Wait until the console shows a line matching ``pattern``; return the last match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while True:
            matches = list(regex.finditer(self.text()))
            if matches:
                return matches[-1]
            if self.proc.poll() is not None:
                pytest.fail(
                    f"QEMU exited ({self.proc.returncode}) before {pattern!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} on the console after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])


@contextmanager
def boot(
    image: GuestImage,
    tmp_path: Path,
    workload: Workload | Sequence[Workload],
    extra: Sequence[str] = (),
) -> Iterator[Guest]:
    log = tmp_path / "console.log"
    argv = [
        QEMU,
        "-accel", "tcg",
        "-m", "256",
        "-nographic",
        "-monitor", "none",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", kernel_cmdline(workload=workload),
        "-serial", f"file:{log}",
        "-display", "none",
        "-no-reboot",
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield Guest(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def raw_disks(tmp_path: Path, count: int, size: int = 64 * 1024 * 1024) -> list[Path]:
    """``count`` sparse raw disk images of ``size`` bytes in ``tmp_path``."""
    disks = []
    for i in range(count):
        disk = tmp_path / f"data{i}.raw"
        with disk.open("wb") as f:
            f.truncate(size)
        disks.append(disk)
    return disks


def virtio_drives(disks: Sequence[Path]) -> list[str]:
    """QEMU arguments attaching ``disks`` in order: /dev/vda, /dev/vdb ... in the guest."""
    return [arg for disk in disks for arg in ("-drive", f"file={disk},format=raw,if=virtio")]


def test_image_build_is_cached(image: GuestImage) -> None:
    stamp = image.kernel.parent / "image.json"
    before = (image.kernel.stat().st_mtime_ns, image.initrd.stat().st_mtime_ns)
    again = build_image()
    assert again == image
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == before
    assert stamp.is_file()


def test_memtouch_guest_boots_and_verifies_memory(image: GuestImage, tmp_path: Path) -> None:
    workload = parse_workload("memtouch:wss=16M,rate=2000")
    with boot(image, tmp_path, workload) as guest:
        guest.wait_for(r"^VMIGRATE READY ip=none workload=memtouch\s*$")
        guest.wait_for(r"^MEMCHECK pass=\d+ ok\s*$")
        guest.wait_for(r"^VMIGRATE HEARTBEAT n=2\s*$", 30)
        text = guest.text()
    assert "MEMCHECK FAIL" not in text
    assert "VMIGRATE WARN" not in text
    assert "Kernel panic" not in text


def test_diskwrite_guest_acknowledged_records_are_on_disk(
    image: GuestImage, tmp_path: Path
) -> None:
    (disk,) = raw_disks(tmp_path, 1)
    workload = parse_workload("diskwrite:dev=/dev/vda,rate=50")
    with boot(image, tmp_path, workload, virtio_drives([disk])) as guest:
        guest.wait_for(r"^VMIGRATE READY ip=none workload=diskwrite\s*$")
        guest.wait_for(r"^DISKWRITE start dev=/dev/vda size=4096 ")
        ack_line = r"^DISKWRITE ack=(\d+) dev=/dev/vda\s*$"
        first = int(guest.wait_for(ack_line).group(1))
        deadline = time.monotonic() + 30
        last = first
        while last <= first:
            if time.monotonic() > deadline:
                pytest.fail(f"DISKWRITE ack stuck at {first}:\n{guest.tail()}")
            time.sleep(0.5)
            last = int(guest.wait_for(ack_line).group(1))
    # QEMU is dead now: everything the guest acknowledged must be on the disk.
    assert "DISKWRITE error" not in guest.text()
    assert verify_diskwrite_records(disk) >= last > first >= 1


def test_guest_runs_memtouch_and_two_disk_writers_at_once(
    image: GuestImage, tmp_path: Path
) -> None:
    disks = raw_disks(tmp_path, 2)
    devices = ("/dev/vda", "/dev/vdb")
    workloads = parse_workloads(
        "memtouch:wss=16M,rate=2000+diskwrite:dev=/dev/vda,rate=50+diskwrite:dev=/dev/vdb,rate=50"
    )
    with boot(image, tmp_path, workloads, virtio_drives(disks)) as guest:
        guest.wait_for(r"^VMIGRATE READY ip=none workload=memtouch\+diskwrite\+diskwrite\s*$")
        for dev in devices:
            guest.wait_for(rf"^DISKWRITE start dev={dev} size=4096 ")
        guest.wait_for(r"^MEMCHECK pass=\d+ ok\s*$")
        # Both writers acknowledge records, and keep doing so while memtouch runs.
        deadline = time.monotonic() + 60
        first = last_acks(guest.text())
        while True:
            acks = last_acks(guest.text())
            if all(acks.get(dev, 0) > max(first.get(dev, 0), 1) for dev in devices):
                break
            if time.monotonic() > deadline or guest.proc.poll() is not None:
                pytest.fail(f"acks from both disks expected, got {acks}:\n{guest.tail()}")
            time.sleep(0.5)
        guest.wait_for(r"^MEMCHECK pass=\d+ ok\s*$")
    # QEMU is dead now: every record acknowledged on a device must be on its disk.
    text = guest.text()
    acks = last_acks(text)
    assert sorted(acks) == sorted(devices)
    for dev, disk in zip(devices, disks, strict=True):
        assert verify_diskwrite_records(disk) >= acks[dev] >= 2, dev
    for bad in (
        "DISKWRITE error",
        "MEMCHECK FAIL",
        "VMIGRATE WARN",
        "VMIGRATE WORKLOAD EXIT",
        "Kernel panic",
    ):
        assert bad not in text


def test_memtouch_rate_is_accurate(tmp_path: Path) -> None:
    """memtouch's pacing (run on the host): within 10% of the requested rate."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    src = tmp_path / "memtouch.c"
    guest = resources.files("vmigrate.lab").joinpath("guest")
    src.write_bytes(guest.joinpath("memtouch.c").read_bytes())
    (tmp_path / "common.h").write_bytes(guest.joinpath("common.h").read_bytes())
    exe = tmp_path / "memtouch"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True)
    rate, pages = 4096, 1024  # wss=4M: four passes a second, one line a second
    proc = subprocess.Popen([str(exe), "wss=4M", f"rate={rate}"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("MEMTOUCH start")
        points: list[tuple[float, int]] = []
        while len(points) < 5:
            line = proc.stdout.readline()
            m = re.fullmatch(r"MEMCHECK pass=(\d+) ok\n", line)
            assert m is not None, line
            points.append((time.monotonic(), int(m.group(1))))
    finally:
        proc.kill()
        proc.wait()
    (t0, p0), (t1, p1) = points[0], points[-1]
    measured = (p1 - p0) * pages / (t1 - t0)
    assert abs(measured - rate) / rate < 0.10, measured
