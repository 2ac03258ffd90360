"""The disk transfer engine end to end: real ``vmigrate`` processes, real TCP.

The first tests run both ends on loopback with a proxy of ours in between that
damages the stream; the lab tests copy between the lab hosts over the shaped
migration link and measure the bytes on that link from the kernel's counters.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_online import sha256
from vmigrate.lab.links import link_bytes

MiB = 1 << 20
VMIGRATE = [sys.executable, "-m", "vmigrate"]


def random_image(path: Path, size: int, data: list[tuple[int, int]]) -> None:
    """A thin raw image with random bytes at (offset, length) and holes elsewhere."""
    with path.open("wb") as f:
        f.truncate(size)
        for off, ln in data:
            f.seek(off)
            for pos in range(0, ln, 4 * MiB):
                f.write(os.urandom(min(4 * MiB, ln - pos)))


def events(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Proxy:
    """Forwards one TCP connection at a time to ``upstream``; ``damage(pos, buf)`` may
    alter the sender->receiver bytes (pos: offset of buf in that stream)."""

    def __init__(self, upstream: int, damage: Any) -> None:
        self.upstream = upstream
        self.damage = damage
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            client, _ = self.sock.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def pump(a: socket.socket, b: socket.socket, damaged: bool) -> None:
            pos = 0
            try:
                while data := a.recv(1 << 16):
                    if damaged:
                        data = self.damage(pos, bytearray(data))
                    pos += len(data)
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pump, args=(up, client, False), daemon=True)
        back.start()
        pump(client, up, True)
        back.join(10)

    def close(self) -> None:
        self.sock.close()


def flip_at(target: int) -> Any:
    def damage(pos: int, buf: bytearray) -> bytearray:
        if pos <= target < pos + len(buf):
            buf[target - pos] ^= 0x40
        return buf
    return damage


def flip_every(period: int, start: int) -> Any:
    def damage(pos: int, buf: bytearray) -> bytearray:
        for i in range(len(buf)):
            p = pos + i
            if p >= start and (p - start) % period == period // 2:
                buf[i] ^= 0x40
        return buf
    return damage


def run_pair(src: Path, dst: Path, *, send_key: str, recv_key: str, damage: Any = None,
             extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess[str],
                                                    subprocess.CompletedProcess[str]]:
    """One sender and one receiver on loopback, optionally through a damaging proxy."""
    recv = subprocess.Popen([*VMIGRATE, "transfer", "receive", str(dst),
                             f"--allow-dir={dst.parent}", "--listen", "127.0.0.1:0"],
                            stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    proxy = None
    try:
        assert recv.stdin and recv.stderr
        recv.stdin.write(recv_key + "\n")
        recv.stdin.flush()
        port = None
        err_lines: list[str] = []
        while port is None:
            line = recv.stderr.readline()
            assert line, f"receiver ended: {err_lines}"
            err_lines.append(line)
            ev = json.loads(line) if line.startswith("{") else {}
            if ev.get("event") == "listening":
                port = int(ev["port"])
        if damage is not None:
            proxy = Proxy(port, damage)
            port = proxy.port
        # stdin stays open while it runs: its end would tell the sender we are gone
        sp = subprocess.Popen([*VMIGRATE, "transfer", "send", "--source", str(src),
                               "--connect", f"127.0.0.1:{port}", *extra],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        try:
            assert sp.stdin and sp.stderr
            sp.stdin.write(send_key + "\n")
            sp.stdin.flush()
            snd_err = sp.stderr.read()
            sp.wait(120)
            sp.stdin.close()
        finally:
            if sp.poll() is None:
                sp.kill()
                sp.wait()
        snd = subprocess.CompletedProcess(sp.args, sp.returncode, "", snd_err)
        recv.stdin.close()
        rest = recv.stderr.read()
        recv.wait(30)
        r = subprocess.CompletedProcess(recv.args, recv.returncode, "",
                                        "".join(err_lines) + rest)
        return snd, r
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        if proxy is not None:
            proxy.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src.raw"
    random_image(src, 64 * MiB, [(0, 24 * MiB), (40 * MiB, 8 * MiB)])
    return src


KEY = "11" * 32
OTHER_KEY = "22" * 32


def test_clean_copy_is_identical_and_thin(image: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.raw"
    snd, rcv = run_pair(image, dst, send_key=KEY, recv_key=KEY)
    assert snd.returncode == 0, snd.stderr
    assert rcv.returncode == 0, rcv.stderr
    assert sha256(dst) == sha256(image)
    done = next(e for e in events(snd.stderr) if e.get("event") == "done")
    assert done["data_bytes"] == 32 * MiB and done["zero_bytes"] == 32 * MiB
    assert dst.stat().st_blocks * 512 < 40 * MiB
    assert not list(tmp_path.glob("*.vmxfer-*"))


def test_one_corrupted_frame_is_detected_and_resent(image: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.raw"
    # 3.5 MiB into the stream: inside the fourth chunk's encrypted payload
    snd, rcv = run_pair(image, dst, send_key=KEY, recv_key=KEY,
                        damage=flip_at(3 * MiB + MiB // 2), extra=("--compress", "off"))
    assert snd.returncode == 0, snd.stderr
    assert rcv.returncode == 0, rcv.stderr
    assert "does not authenticate" in rcv.stderr
    done = next(e for e in events(snd.stderr) if e.get("event") == "done")
    assert done["resent_bytes"] == MiB
    assert sha256(dst) == sha256(image)


def test_wrong_key_is_rejected_and_writes_nothing(image: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.raw"
    snd, rcv = run_pair(image, dst, send_key=KEY, recv_key=OTHER_KEY)
    assert rcv.returncode == 6, rcv.stderr
    assert snd.returncode != 0
    err = next(e for e in events(rcv.stderr) if e.get("event") == "error")
    assert err["integrity"] and "wrong key" in err["error"]
    assert not dst.exists()
    assert not list(tmp_path.glob("dst.raw*"))


def test_altered_stream_is_rejected_not_completed(image: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.raw"
    snd, rcv = run_pair(image, dst, send_key=KEY, recv_key=KEY,
                        damage=flip_every(256 * 1024, 2 * MiB), extra=("--compress", "off"))
    assert snd.returncode == 6, snd.stderr
    assert rcv.returncode != 0
    assert any("altered stream" in e.get("error", "") for e in events(snd.stderr))
    assert not dst.exists()


# --- in the lab, over the migration link ------------------------------------------


def journal_chunks(path: Path) -> int:
    try:
        return max(0, (path.stat().st_size - 100) // 49)
    except FileNotFoundError:
        return 0


@pytest.fixture
def lab_dir(lab: Lab) -> Iterator[Path]:
    d = lab.inventory.host("h1").pools["shared"] / f"xfer-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def wire_rx(lab: Lab) -> int:
    return link_bytes(lab.home, "h2", lab.name)[0]


@pytest.mark.lab
def test_copy_disk_killed_halfway_resumes(lab: Lab, lab_dir: Path) -> None:
    size = 256 * MiB
    src = lab_dir / "src.raw"
    random_image(src, size, [(0, size)])
    # baseline: the same copy, uninterrupted, as the link counts it
    rx0 = wire_rx(lab)
    res = lab.cli("copy-disk", f"h1:{src}", f"h2:{lab_dir / 'clean.raw'}", "--json")
    assert res.returncode == 0, res.stderr
    clean_wire = wire_rx(lab) - rx0
    assert json.loads(res.stdout)["transport"] == "tcp"

    dst = lab_dir / "dst.raw"
    journal = lab_dir / "dst.raw.vmxfer-journal"
    rx1 = wire_rx(lab)
    proc = lab.popen("copy-disk", f"h1:{src}", f"h2:{dst}", "--json")
    try:
        deadline = time.monotonic() + 120
        while journal_chunks(journal) < size // MiB // 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    at_kill = journal_chunks(journal)
    assert at_kill < size // MiB, "the copy finished before it could be killed"
    # both ends notice that the controller is gone and stop
    deadline = time.monotonic() + 30
    while any(str(dst) in " ".join(p) for p in _cmdlines()):
        assert time.monotonic() < deadline, "a transfer end outlived its controller"
        time.sleep(0.2)
    assert not dst.exists()

    res = lab.cli("copy-disk", f"h1:{src}", f"h2:{dst}", "--json")
    assert res.returncode == 0, res.stderr
    second = json.loads(res.stdout)
    total_wire = wire_rx(lab) - rx1
    assert sha256(dst) == sha256(src)
    assert second["resumed"] is True
    assert second["skipped_bytes"] >= size // 3
    resent = total_wire - clean_wire
    print(f"killed at {at_kill} chunks; wire: clean {clean_wire}, killed+resumed "
          f"{total_wire}, resent {resent} ({100 * resent / size:.2f}% of the image)")
    assert resent <= 0.02 * size


def _cmdlines() -> Iterator[list[str]]:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        yield raw.decode(errors="replace").split("\0")


@pytest.mark.lab
def test_thin_8g_image_moves_only_its_data(lab: Lab, lab_dir: Path) -> None:
    src = lab_dir / "thin.raw"
    data = [(i * 320 * MiB, 8 * MiB) for i in range(25)]  # 200 MiB in 25 runs
    random_image(src, 8 << 30, data)
    rx0 = wire_rx(lab)
    res = lab.cli("copy-disk", f"h1:{src}", f"h2:{lab_dir / 'thin-copy.raw'}", "--json")
    assert res.returncode == 0, res.stderr
    wire = wire_rx(lab) - rx0
    r = json.loads(res.stdout)
    print(f"8 GiB thin, 200 MiB data: {wire} bytes on the link, report {r}")
    assert r["data_bytes"] == 200 * MiB
    assert wire <= 1.08 * 200 * MiB
    assert sha256(lab_dir / "thin-copy.raw") == sha256(src)
    assert (lab_dir / "thin-copy.raw").stat().st_blocks * 512 <= 210 * MiB


@pytest.mark.lab
def test_copy_to_qcow2_converts(lab: Lab, lab_dir: Path) -> None:
    src = lab_dir / "conv.raw"
    random_image(src, 96 * MiB, [(0, 8 * MiB), (64 * MiB, 8 * MiB)])
    dst = lab_dir / "conv.qcow2"
    res = lab.cli("copy-disk", f"h1:{src}", f"h2:{dst}", "--format", "qcow2", "--json")
    assert res.returncode == 0, res.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(dst)],
                         capture_output=True, text=True, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dst)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["actual-size"] < 40 * MiB


def test_copy_disk_bad_input(tmp_path: Path) -> None:
    env = dict(os.environ, VMIGRATE_HOME=str(tmp_path))
    env.pop("VMIGRATE_CONFIG", None)
    res = subprocess.run([*VMIGRATE, "copy-disk", str(tmp_path / "missing.raw"),
                          str(tmp_path / "out.raw")], capture_output=True, text=True,
                         env=env, check=False)
    assert res.returncode == 2, res.stderr
    assert "missing.raw" in res.stderr
    assert not (tmp_path / "out.raw").exists()
    # an existing destination is refused and left alone
    src, dst = tmp_path / "a.raw", tmp_path / "b.raw"
    random_image(src, MiB, [(0, MiB)])
    dst.write_bytes(b"keep me")
    res = subprocess.run([*VMIGRATE, "copy-disk", str(src), str(dst)], capture_output=True,
                         text=True, env=env, check=False)
    assert res.returncode == 2, res.stderr
    assert "already exists" in res.stderr
    assert dst.read_bytes() == b"keep me"
