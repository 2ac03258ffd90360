"""The transfer receiver's least privilege, in the lab (real hosts, SSH, the migration
network): it writes only under the host's allowed directories, never through a link
planted next to its target, takes as its session only a connection that proves it holds
the key, and fails a copy whose link was cut within 30 s (both ends), the rerun resuming.

Budget: about 110 s of lab time, most of it the 60 s link cut."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import (
    guest,  # noqa: F401  (fixture)
    slow_links,  # noqa: F401  (fixture)
    vm_host,
)
from tests.e2e.test_online import pool, sha256
from tests.e2e.test_transfer import _cmdlines, random_image
from tests.e2e.test_vms import BOOT_MARK, boot_sector_image, wait_for_console
from vmigrate.config import dump_inventory, load_inventory
from vmigrate.lab.links import host_netns, link_bytes, link_down, link_up
from vmigrate.transfer.engine import CHUNK_SIZE, JOURNAL_SUFFIX, PARTIAL_SUFFIX, zero_id
from vmigrate.transfer.journal import Geometry, Journal

pytestmark = pytest.mark.lab

MiB = 1 << 20
CUT_S = 60.0


@pytest.fixture
def h2_dir(lab: Lab) -> Iterator[Path]:
    """A fresh directory in h2's local pool (allowed), removed afterwards."""
    d = pool(lab, "h2") / f"harden-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


@pytest.fixture
def small_image(lab: Lab) -> Iterator[Path]:
    src = pool(lab, "h1") / f"harden-src-{os.getpid()}.raw"
    random_image(src, 8 * MiB, [(0, 8 * MiB)])
    yield src
    src.unlink(missing_ok=True)


def test_target_outside_the_allowed_directories_is_refused(
        lab: Lab, small_image: Path, tmp_path: Path) -> None:
    outside = Path(f"/var/tmp/vmigrate-outside-{os.getpid()}")
    outside.mkdir(exist_ok=True)
    try:
        for dst in (f"{outside}/x.raw", f"{pool(lab, 'h2')}/../escape.raw",
                    f"{pool(lab, 'h2')}//double.raw"):
            res = lab.cli("copy-disk", f"h1:{small_image}", f"h2:{dst}")
            assert res.returncode == 2, res.stderr
            assert res.stderr.startswith("error:") and "Traceback" not in res.stderr
        assert not list(outside.iterdir())
        assert not (pool(lab, "h2").parent / "escape.raw").exists()
        assert not list(pool(lab, "h2").glob("double.raw*"))
        # the inventory's transfer_dirs opens a directory on purpose
        inv = load_inventory(lab.home / "vmigrate.toml")
        h2 = inv.hosts["h2"].model_copy(update={"transfer_dirs": [outside]})
        cfg = tmp_path / "inv.toml"
        cfg.write_text(dump_inventory(inv.model_copy(update={"hosts": {**inv.hosts,
                                                                        "h2": h2}})))
        res = lab.cli("--config", str(cfg), "copy-disk", f"h1:{small_image}",
                      f"h2:{outside / 'x.raw'}")
        assert res.returncode == 0, res.stderr
        assert sha256(outside / "x.raw") == sha256(small_image)
    finally:
        subprocess.run(["rm", "-rf", str(outside)], check=False)


def test_a_symlink_planted_at_the_partial_path_is_refused(
        lab: Lab, small_image: Path, h2_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 4096)
    before = sha256(victim)
    dst = h2_dir / "x.raw"
    # a journal that matches the image, so a receiver that follows links would resume
    # into the link's target
    g = Geometry(small_image.stat().st_size, CHUNK_SIZE, "raw")
    j, _ = Journal.open(Path(str(dst) + JOURNAL_SUFFIX), g, {CHUNK_SIZE: zero_id(CHUNK_SIZE)})
    j.record(0, b"x" * 32)
    j.sync()
    j.close()
    partial = Path(str(dst) + PARTIAL_SUFFIX)
    partial.symlink_to(victim)
    res = lab.cli("copy-disk", f"h1:{small_image}", f"h2:{dst}")
    assert res.returncode == 2, res.stderr
    assert sha256(victim) == before
    assert partial.is_symlink() and os.readlink(partial) == str(victim)
    assert not dst.exists()


RACER = r"""
import os, socket, sys, time
addr, port = sys.argv[1], int(sys.argv[2])
socks = []
idle = socket.create_connection((addr, port), timeout=5)      # says nothing
socks.append(idle)
junk = socket.create_connection((addr, port), timeout=5)      # not our protocol
junk.sendall(os.urandom(512))
socks.append(junk)
fake = socket.create_connection((addr, port), timeout=5)      # ours, but no key
fake.sendall(b"VMXFER\0\x02\x01" + os.urandom(16))
fake.sendall(bytes([1, 0, 0, 0, 0, 0, 0, 40]) + os.urandom(40))
socks.append(fake)
print("connected", flush=True)
time.sleep(60)
"""


def _receiver_port(lab: Lab, dst: Path, deadline: float) -> int:
    """The port the receiver writing ``dst`` listens on, in h2's namespace."""
    ns = host_netns(lab.home, "h2", lab.name)
    while time.monotonic() < deadline:
        pids = [p for p in _pids_with(str(dst)) if "receive" in p[1]]
        if pids:
            out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnpH"],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                if any(f"pid={pid}," in line for pid, _ in pids):
                    return int(line.split()[3].rsplit(":", 1)[1])
        time.sleep(0.02)
    raise AssertionError("the receiver did not listen")


def _pids_with(text: str) -> list[tuple[int, list[str]]]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if text in argv and "transfer" in argv:
            out.append((int(pid), argv))
    return out


def test_connections_racing_the_sender_do_not_stop_the_copy(
        lab: Lab, small_image: Path, h2_dir: Path, tmp_path: Path) -> None:
    """Three connections from another host reach the receiver before the real sender
    (whose start is held back 1.5 s): the copy completes all the same."""
    inv = load_inventory(lab.home / "vmigrate.toml")
    slow_start = ["sh", "-c", 'sleep 1.5; exec "$@"', "sh", *inv.hosts["h1"].vmigrate_command]
    h1 = inv.hosts["h1"].model_copy(update={"vmigrate_command": slow_start})
    cfg = tmp_path / "inv.toml"
    cfg.write_text(dump_inventory(inv.model_copy(update={"hosts": {**inv.hosts, "h1": h1}})))
    dst = h2_dir / "raced.raw"
    proc = lab.popen("--config", str(cfg), "copy-disk", f"h1:{small_image}", f"h2:{dst}",
                     "--json")
    racer = None
    try:
        port = _receiver_port(lab, dst, time.monotonic() + 30)
        addr = inv.hosts["h2"].migration_address
        assert addr is not None
        racer = subprocess.Popen(
            ["ip", "netns", "exec", host_netns(lab.home, "h1", lab.name), sys.executable,
             "-c", RACER, addr, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        assert racer.stdout is not None
        assert racer.stdout.readline().strip() == "connected", racer.stderr
        assert not [p for p in _pids_with(str(small_image)) if p[1][0] != "sh"], \
            "the sender started before the racer"
        out, err = proc.communicate(timeout=120)
    finally:
        for p in (proc, racer):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["verified"] == "full"
    assert sha256(dst) == sha256(small_image)


def _journal_chunks(path: Path) -> int:
    try:
        return max(0, (path.stat().st_size - 100) // 49)
    except FileNotFoundError:
        return 0


def test_link_cut_during_a_cold_copy_fails_in_30s_and_the_rerun_resumes(
        lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    size = 128 * MiB
    src = pool(lab, "h1") / "cut-boot.raw"
    boot_sector_image(src)
    with src.open("r+b") as f:  # random data after the boot sector: nothing compresses
        f.truncate(size)
        f.seek(4096)
        f.write(os.urandom(MiB - 4096))
        for _ in range(size // MiB - 1):
            f.write(os.urandom(MiB))
    digest = sha256(src)
    guest.append("cutcold")
    res = lab.cli("vm", "create", "cutcold", "--host", "h1", "--memory", "64M",
                  "--disk", f"{src},format=raw", "--no-nic")
    assert res.returncode == 0, res.stderr
    wait_for_console(lab, "cutcold", BOOT_MARK, timeout=60)
    slow_links("200mbit")  # about 5 s for the copy: time to cut it in the middle
    journal = pool(lab, "h2") / f"cutcold-disk0.raw{JOURNAL_SUFFIX}"
    rx0 = link_bytes(lab.home, "h2", lab.name)[0]
    proc = lab.popen("migrate", "cutcold", "--to", "h2", "--mode", "cold", "--json",
                     "--shutdown-timeout", "3")
    cut_at = None
    try:
        deadline = time.monotonic() + 120
        while _journal_chunks(journal) < size // MiB // 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the copy did not start"
            time.sleep(0.02)
        link_down(lab.home, "h2", lab.name)
        cut_at = time.monotonic()
        out, err = proc.communicate(timeout=120)
        failed_after = time.monotonic() - cut_at
        rx1 = link_bytes(lab.home, "h2", lab.name)[0] - rx0
        # both transfer ends are gone too
        assert not _pids_with(str(src)), "the sender outlived the failure"
        assert not [p for p in _cmdlines() if any("cutcold-disk0" in a for a in p)
                    and "transfer" in p]
        report = json.loads(out)
        print(f"job ended {failed_after:.1f}s after the cut: {report['status']}: "
              f"{report.get('error')}")
        assert proc.returncode == 1, err[-2000:]
        assert report["status"] == "failed"
        assert failed_after <= 30.0
        assert vm_host(lab, "cutcold") == "h1"
        listing = lab.cli_json("vm", "list")
        assert isinstance(listing, list)
        assert next(v["state"] for v in listing if v["name"] == "cutcold") == "running"
        held = _journal_chunks(journal)
        assert Path(str(journal).replace(JOURNAL_SUFFIX, PARTIAL_SUFFIX)).exists()
        time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        link_up(lab.home, "h2", lab.name)

    rx_b = link_bytes(lab.home, "h2", lab.name)[0]
    res = lab.cli("migrate", "cutcold", "--to", "h2", "--mode", "cold", "--json",
                  "--shutdown-timeout", "3", timeout=300)
    rx2 = link_bytes(lab.home, "h2", lab.name)[0] - rx_b
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["status"] == "completed" and vm_host(lab, "cutcold") == "h2"
    (disk,) = report["disks"]
    assert sha256(Path(disk["target"])) == digest
    # resent: what crossed the link in the first run and had to cross again, in image
    # bytes (the link's bytes per data byte measured on the rerun)
    per_byte = rx2 / max(1, disk["data_bytes"])
    resent = rx1 / per_byte - disk["skipped_bytes"]
    print(f"held {held} chunks after the cut; rerun: data {disk['data_bytes']}, skipped "
          f"{disk['skipped_bytes']}, link {rx1}+{rx2} bytes ({per_byte:.3f}/byte); resent "
          f"{resent / MiB:.2f} MiB = {100 * resent / size:.2f} % of the image")
    assert disk["skipped_bytes"] >= size // 3
    assert resent <= 0.02 * size
    wait_for_console(lab, "cutcold", BOOT_MARK, timeout=60)
