"""The SQLite store: VM records, version checks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vmigrate.errors import ConflictError, NotFoundError, StoreError, UserError
from vmigrate.store import Store


def test_vm_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_vm("a", "h1", '{"x": 1}')
    with pytest.raises(ConflictError):
        store.add_vm("a", "h2", "{}")
    assert store.get_vm("a").host == "h1"
    store.set_vm_host("a", "h2")
    assert [r.host for r in store.list_vms()] == ["h2"]
    store.remove_vm("a")
    with pytest.raises(NotFoundError):
        store.get_vm("a")
    store.close()
    assert Store(tmp_path / "db").list_vms() == []


def test_rejects_unknown_version(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("UPDATE meta SET value='99' WHERE key='version'")
    db.commit()
    db.close()
    with pytest.raises(StoreError):
        Store(tmp_path / "db")


def test_rejects_foreign_db(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('magic', 'other')")
    db.commit()
    db.close()
    with pytest.raises(StoreError):
        Store(tmp_path / "db")


def test_jobs_lock_and_lifecycle(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    job = store.create_job("j1", "vm1", "live", "h1", "h2", {"policy": "balanced"}, pid=123)
    assert job.active and job.phase == "begin" and job.options == {"policy": "balanced"}
    with pytest.raises(ConflictError):  # the VM is locked while a job runs
        store.create_job("j2", "vm1", "live", "h1", "h2", {})
    store.set_phase("j1", "perform")
    assert store.request_cancel("j").cancel_requested  # id prefixes work
    store.end_job("j1", "cancelled", report={"status": "cancelled"}, error="by operator")
    done = store.get_job("j1")
    assert (done.status, done.phase, done.report) == ("cancelled", "perform",
                                                      {"status": "cancelled"})
    with pytest.raises(ConflictError):
        store.request_cancel("j1")
    store.create_job("j2", "vm1", "live", "h1", "h2", {})  # unlocked again
    assert [j.id for j in store.list_jobs(active=True)] == ["j2"]
    assert [j.id for j in store.list_jobs(vm="vm1")] == ["j1", "j2"]
    with pytest.raises(NotFoundError):
        store.get_job("zz")


def test_upgrades_version_1(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("DROP TABLE jobs")
    db.execute("UPDATE meta SET value='1' WHERE key='version'")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    store.create_job("j1", "vm", "live", "a", "b", {})
    assert store.get_job("j1").active


def test_upgrades_version_2_with_assessments(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("DROP TABLE assessments")
    db.execute("UPDATE meta SET value='2' WHERE key='version'")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    store.add_assessment("vm", "h1", "h2", 100.0, {"at": 100.0})
    assert store.list_assessments("vm") == [{"at": 100.0}]


def test_assessments_accumulate_in_time_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_assessment("a", "h1", "h2", 300.0, {"n": 3})
    store.add_assessment("a", "h1", None, 100.0, {"n": 1})
    store.add_assessment("a", "h1", "h3", 200.0, {"n": 2})
    store.add_assessment("b", "h1", "h2", 150.0, {"n": 9})
    assert [r["n"] for r in store.list_assessments("a")] == [1, 2, 3]
    assert [r["n"] for r in store.list_assessments("a", dest="h2")] == [3]
    assert [r["n"] for r in store.list_assessments("a", since=150.0)] == [2, 3]
    assert len(store.list_assessments()) == 4


def test_a_job_waiting_for_an_operator_keeps_its_vm_locked(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.create_job("j1", "vm1", "live", "h1", "h2", {}, state='{"phase": "perform"}')
    assert store.get_job("j1").state == '{"phase": "perform"}'
    store.save_state("j1", "finish", '{"phase": "finish"}')
    job = store.get_job("j1")
    assert (job.phase, job.state) == ("finish", '{"phase": "finish"}')
    store.end_job("j1", "needs-operator", error="split")
    job = store.get_job("j1")
    assert job.locks_vm and not job.active
    with pytest.raises(ConflictError):  # nothing else may start for the VM
        store.create_job("j2", "vm1", "live", "h1", "h2", {})
    store.reopen_job("j1", 42)  # job recover drives it again
    job = store.get_job("j1")
    assert job.active and job.controller_pid == 42
    store.end_job("j1", "completed")
    store.create_job("j2", "vm1", "live", "h1", "h2", {})


def test_upgrades_version_3_with_a_state_column(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.create_job("old", "vm", "live", "a", "b", {})
    store.end_job("old", "completed")
    store.close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("ALTER TABLE jobs DROP COLUMN state")
    db.execute("UPDATE meta SET value='3' WHERE key='version'")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    assert store.get_job("old").state is None  # jobs of older versions keep no state
    store.create_job("new", "vm", "live", "a", "b", {}, state="{}")
    assert store.get_job("new").state == "{}"


# -- host states (issue 14) ----------------------------------------------------------------


def test_host_state_set_at_run_time_overrides_the_inventory(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    eff = store.effective_host_state("h1", "active")
    assert (eff.state, eff.source, eff.since, eff.reason) == ("active", "inventory", None, "")
    assert store.get_host_state("h1") is None
    rec = store.set_host_state("h1", "maintenance", "disk swap", since=1000.0)
    assert (rec.host, rec.state, rec.since, rec.reason) == ("h1", "maintenance", 1000.0,
                                                            "disk swap")
    assert store.get_host_state("h1") == rec
    eff = store.effective_host_state("h1", "active")
    assert (eff.state, eff.source, eff.since) == ("maintenance", "store", 1000.0)
    # activate: the operator's word wins over a declared maintenance too
    store.set_host_state("h1", "active", "")
    assert store.effective_host_state("h1", "maintenance").state == "active"
    store.set_host_state("h2", "draining")
    store.close()
    store = Store(tmp_path / "db")  # durable
    assert set(store.list_host_states()) == {"h1", "h2"}
    assert store.clear_host_state("h1") is True
    assert store.clear_host_state("h1") is False
    assert store.effective_host_state("h1", "maintenance").source == "inventory"
    h2 = store.get_host_state("h2")
    assert h2 is not None and h2.as_dict()["state"] == "draining"


@pytest.mark.parametrize(("host", "state", "reason"), [
    ("h1", "gone", ""), ("h1", "Active", ""), ("a;b", "active", ""), ("", "active", ""),
    ("h1", "maintenance", "a\nb"), ("h1", "maintenance", "x" * 501),
])
def test_host_state_refuses_what_is_not_one(tmp_path: Path, host: str, state: str,
                                            reason: str) -> None:
    store = Store(tmp_path / "db")
    with pytest.raises(UserError):
        store.set_host_state(host, state, reason)
    assert store.list_host_states() == {}


def test_upgrades_version_5_with_host_states(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_vm("vm", "h1", "{}")
    store.close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute("DROP TABLE host_states")
    db.execute("UPDATE meta SET value='5' WHERE key='version'")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    assert [v.name for v in store.list_vms()] == ["vm"]
    store.set_host_state("h1", "maintenance", "upgrade")
    assert store.get_host_state("h1") is not None
    store.close()
    db = sqlite3.connect(tmp_path / "db")
    assert db.execute("SELECT value FROM meta WHERE key='version'").fetchone() == ("7",)
    db.close()
