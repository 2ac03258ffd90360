"""Locks that hold, on real lab hosts: while a live migration is in perform, the
controller's own VM commands and a second controller (another VMIGRATE_HOME, its own
store, the same inventory) are refused with exit status 2 naming the job, and the
migration completes.

One small idle guest and one migration (its bandwidth capped so that perform lasts
long enough for the refusals), all on the session's lab.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import start_guest, vm_pid_on
from tests.e2e.test_vms import qemu_pids
from vmigrate.service.hostlock import LOCK_NAME, parse_lock
from vmigrate.store import Store

pytestmark = pytest.mark.lab

VM = "lock1"


def other_controller(lab: Lab, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``vmigrate ARGS`` as a second controller: its own home and store, the lab's
    inventory."""
    env = dict(os.environ)
    env["VMIGRATE_HOME"] = str(home)
    env["VMIGRATE_CONFIG"] = str(lab.home / "vmigrate.toml")
    return subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def running_job(lab: Lab) -> tuple[str, str] | None:
    """The id and phase of the running job of VM, read from the first controller's
    store."""
    store = Store(lab.home / "vmigrate.db")
    try:
        jobs = [j for j in store.list_jobs(vm=VM) if j.active]
    finally:
        store.close()
    return (jobs[-1].id, jobs[-1].phase) if jobs else None


def test_locks_hold_while_a_migration_performs(lab: Lab, tmp_path: Path) -> None:
    other = tmp_path / "controller-b"
    start_guest(lab, VM, "idle", memory="128M")
    migration: subprocess.Popen[str] | None = None
    try:
        # the second controller knows the VM too (defined, not started: no host touched)
        res = other_controller(lab, other, "vm", "create", VM, "--host", "h1",
                               "--workload", "idle", "--memory", "128M", "--no-start")
        assert res.returncode == 0, res.stderr
        migration = lab.popen("migrate", VM, "--to", "h2", "--policy", "balanced",
                              "--bandwidth", "6M", "--json")
        deadline = time.monotonic() + 60
        job = running_job(lab)
        while (job is None or job[1] != "perform") and time.monotonic() < deadline:
            assert migration.poll() is None, migration.communicate()
            time.sleep(0.1)
            job = running_job(lab)
        assert job is not None and job[1] == "perform", job
        job_id = job[0]
        lock = lab.inventory.host("h1").data_dir / "vms" / VM / LOCK_NAME
        holder = parse_lock(lock.read_text())
        assert holder.job == job_id

        # this controller's own VM command: refused, naming the job
        res = lab.cli("vm", "destroy", VM)
        assert res.returncode == 2, (res.returncode, res.stderr)
        assert job_id in res.stderr
        # the second controller: refused before anything starts, naming the holder
        res = other_controller(lab, other, "migrate", VM, "--to", "h2", "--json")
        assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
        assert job_id in res.stderr and res.stdout == ""
        store = Store(other / "vmigrate.db")
        try:
            assert store.list_jobs() == []
        finally:
            store.close()
        res = other_controller(lab, other, "vm", "destroy", VM)
        assert res.returncode == 2, (res.returncode, res.stderr)
        assert job_id in res.stderr
        # the refusals changed nothing: the same job still performs and holds the lock
        assert running_job(lab) == (job_id, "perform"), "perform ended: raise the cap"
        assert parse_lock(lock.read_text()) == holder

        out, err = migration.communicate(timeout=180)
        assert migration.returncode == 0, err
        report = json.loads(out)
        assert (report["job"], report["status"]) == (job_id, "completed")
        assert report["verification"]["dest_running"] is True
        assert vm_pid_on(lab, "h2", VM) is not None and vm_pid_on(lab, "h1", VM) is None
        # released at the end: the VM is the operator's again
        assert not (lab.inventory.host("h2").data_dir / "vms" / VM / LOCK_NAME).exists()
        assert not lock.exists()
    finally:
        if migration is not None and migration.poll() is None:
            migration.terminate()  # our own child, by its PID: it rolls back
            migration.wait(timeout=120)
        lab.cli("vm", "destroy", VM)
    assert vm_pid_on(lab, "h1", VM) is None and vm_pid_on(lab, "h2", VM) is None
    assert qemu_pids(lab) == []
