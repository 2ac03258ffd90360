"""The one engine at its edges, end to end: the point of no return, recovery after a
controller that died, an audit log that cannot be written, a controller whose output
goes away. Real QEMU, SSH and namespaces; the end state is asserted on both hosts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import (
    audit_size,
    guest,  # noqa: F401  (fixture)
    last_job,
    slow_links,  # noqa: F401  (fixture)
    start_guest,
    vm_host,
    vm_pid_on,
    wait_audit,
    wait_phase,
)
from tests.e2e.test_online import create, pool
from vmigrate.lab.disks import thin_raw_image
from vmigrate.lab.links import vm_link_down, vm_link_up

pytestmark = pytest.mark.lab

MiB = 1 << 20
BUSY = "memtouch:wss=96M,rate=20000"


def migrate_proc(lab: Lab, vm: str, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    """``vmigrate migrate VM --to h2 --json ARGS`` in the background (stopped by its PID)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vmigrate.cli.main", "migrate", vm, "--to", "h2", "--json",
         *args], env={**lab.env(), **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 400) -> tuple[int, str, str]:
    try:
        out, errs = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, errs


def job_report(lab: Lab, job: str) -> dict[str, Any]:
    shown = lab.cli_json("job", "show", job)
    assert isinstance(shown, dict)
    return dict(shown)


def exactly_one_guest_on(lab: Lab, vm: str, host: str) -> None:
    other = "h1" if host == "h2" else "h2"
    assert vm_pid_on(lab, host, vm) is not None and vm_pid_on(lab, other, vm) is None
    assert vm_host(lab, vm) == host
    state = lab.cli_json("vm", "show", vm)
    assert isinstance(state, dict) and state["state"] == "running"


def recover(lab: Lab, job: str) -> list[dict[str, Any]]:
    res = lab.cli("job", "recover", job, "--json", timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    done = json.loads(res.stdout)
    assert isinstance(done, list)
    return done


def test_cancel_during_postcopy_finishes_forward(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    slow_links("100mbit")
    guest.append("pcx")
    start_guest(lab, "pcx", BUSY)
    offset = audit_size(lab)
    proc = migrate_proc(lab, "pcx", "--policy", "postcopy")
    wait_audit(lab, "postcopy", offset)
    cancel = lab.cli("job", "cancel", last_job(lab, "pcx")["id"])
    assert cancel.returncode == 0, cancel.stderr
    rc, out, errs = finish(proc)
    assert rc == 0, errs[-3000:]
    report = json.loads(out)
    assert report["status"] == "completed" and report["memory"]["postcopy"] is True
    assert any("point of no return" in n for n in report["notes"]), report["notes"]
    assert report["verification"]["memcheck"] == "ok", report["verification"]
    exactly_one_guest_on(lab, "pcx", "h2")


def test_cold_destination_silent_after_boot_needs_an_operator(
    lab: Lab, guest: list[str],  # noqa: F811
) -> None:
    src = pool(lab, "h1") / "quiet1.raw"
    thin_raw_image(src, 256 * MiB, 16 * MiB, offset=128 * MiB)
    guest.append("quiet1")
    create(lab, "quiet1", [src])
    vm_link_down(lab.home, "h2", lab.name)  # the guest will boot on h2 and answer no one
    try:
        res = lab.cli("migrate", "quiet1", "--to", "h2", "--mode", "cold", "--json",
                      timeout=400)
        assert res.returncode == 5, res.stderr[-3000:]  # moved, but the checks failed
        report = json.loads(res.stdout)
        assert report["status"] == "needs-operator"
        assert report["verification"]["answers_ping"] is False
        target = Path(report["disks"][0]["target"])
        # nothing destroyed: the guest runs on h2 from its copy, the source stays down
        assert target.exists() and target.parent == pool(lab, "h2")
        assert vm_pid_on(lab, "h2", "quiet1") is not None
        assert vm_pid_on(lab, "h1", "quiet1") is None
        assert src.exists()
        job = last_job(lab, "quiet1")
        assert job["status"] == "needs-operator"
        # the VM stays locked until the job is settled
        again = lab.cli("migrate", "quiet1", "--to", "h1", "--mode", "cold")
        assert again.returncode == 2 and "locked" in again.stderr
    finally:
        vm_link_up(lab.home, "h2", lab.name)
    # the network is back: recover checks again and settles the job
    done = recover(lab, job["id"])
    assert [r["outcome"] for r in done] == ["completed"], done
    exactly_one_guest_on(lab, "quiet1", "h2")


def test_controller_killed_during_postcopy_is_recovered(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    slow_links("100mbit")
    guest.append("pck")
    start_guest(lab, "pck", BUSY)
    offset = audit_size(lab)
    proc = migrate_proc(lab, "pck", "--policy", "postcopy")
    try:
        wait_audit(lab, "point-of-no-return", offset)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)  # the controller we started, by its PID
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job = last_job(lab, "pck")
    assert job["status"] == "running"  # left behind, mid post-copy
    done = recover(lab, job["id"])
    assert [r["outcome"] for r in done] == ["completed"], done
    exactly_one_guest_on(lab, "pck", "h2")
    report = job_report(lab, job["id"])["report"]
    assert report["recovered"] is True
    assert report["verification"]["memcheck"] == "ok", report["verification"]


def test_controller_killed_right_after_qemu_completed_is_recovered(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    slow_links("200mbit")
    guest.append("sus1")
    start_guest(lab, "sus1", "memtouch:wss=64M,rate=20000")
    # the suspend policy pauses the guest to finish: the destination stays paused after
    # QEMU completes, until the controller lets it run; the controller dies first
    proc = migrate_proc(lab, "sus1", "--policy", "suspend",
                        env={"VMIGRATE_TEST_KILL_AT": "completed"})
    rc, _out, errs = finish(proc)
    assert rc == -signal.SIGKILL, errs[-3000:]
    job = last_job(lab, "sus1")
    assert job["status"] == "running"
    done = recover(lab, job["id"])
    assert [r["outcome"] for r in done] == ["completed"], done
    exactly_one_guest_on(lab, "sus1", "h2")


def test_torn_audit_tail_refuses_migrate_until_repaired(lab: Lab, guest: list[str],  # noqa: F811
                                                        ) -> None:
    guest.append("torn1")
    start_guest(lab, "torn1", "idle")
    path = lab.home / "audit.jsonl"
    with path.open("ab") as f:  # what a crash in the middle of an append leaves
        f.write(b'{"v":1,"seq":')
    try:
        res = lab.cli("migrate", "torn1", "--to", "h2", "--json")
        assert res.returncode == 1 and "audit" in res.stderr, res.stderr
        assert not [j for j in lab.cli_json("job", "list")  # type: ignore[union-attr]
                    if j["vm"] == "torn1"]
        assert vm_pid_on(lab, "h1", "torn1") is not None
        verify = lab.cli("audit", "verify", "--json")
        assert verify.returncode == 1 and json.loads(verify.stdout)["torn"] is True
    finally:
        repair = lab.cli("audit", "repair", "--yes", "--json")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert json.loads(repair.stdout)["removed_bytes"] == len(b'{"v":1,"seq":')
    assert lab.cli("audit", "verify").returncode == 0
    res = lab.cli("migrate", "torn1", "--to", "h2", "--json")
    assert res.returncode == 0, res.stderr[-3000:]


def test_migrate_outlives_the_pipe_it_writes_to(
    lab: Lab, guest: list[str], slow_links: Callable[[str], None],  # noqa: F811
) -> None:
    slow_links("200mbit")
    guest.append("pipe1")
    start_guest(lab, "pipe1", "memtouch:wss=64M,rate=10000")
    proc = migrate_proc(lab, "pipe1")
    try:
        job = wait_phase(lab, "pipe1", "perform")
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader goes away, as '| head' does
        proc.stderr.close()
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    shown = job_report(lab, job["id"])
    assert shown["status"] == "completed" and shown["report"]["status"] == "completed"
    exactly_one_guest_on(lab, "pipe1", "h2")

