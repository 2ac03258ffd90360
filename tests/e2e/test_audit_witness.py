"""Audit witnesses on real lab hosts, over SSH: a migration leaves its head on both of its
hosts, ``audit verify`` reads them back, and a log rewritten and re-signed with the
controller's own key is caught by them.

Uses the session's lab. The rewrite is done in a ``VMIGRATE_HOME`` of its own (the lab's
inventory copied in), so the lab's audit log, used by other tests, is never changed; the
witness files that test leaves on the hosts are removed by path at the end. The migration
is the smallest there is: a boot-sector guest of 64 MiB.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.test_live import guest, migrate
from tests.e2e.test_vms import start_bootsector_vm
from vmigrate.audit import AuditLog, load_signing_key, read
from vmigrate.audit.witness import witness_path
from vmigrate.hosts import open_host
from vmigrate.service.witness import write_witnesses

pytestmark = pytest.mark.lab

__all__ = ["guest"]  # the fixture, shared with test_live


def _rewrite_resigned(path: Path, home: Path, job: str) -> int:
    """Turn ``job``'s end status into 'completed', then renumber, re-chain, re-hash and
    re-sign the whole log with the controller's key; the end record's seq."""
    from tests.unit.test_audit import forge

    end = next(r.seq for r in read(path) if r.job == job and r.event == "end")
    forge(path, load_signing_key(home),
          lambda rs: [{**r, "data": {**r["data"], "status": "completed"}}
                      if r["job"] == job and r["event"] == "end" else r for r in rs])
    return end


async def _remove(lab: Lab, job: str) -> None:
    for cfg in lab.inventory.hosts.values():
        host = open_host(cfg)
        try:
            await host.run(["rm", "-f", "--", witness_path(str(cfg.data_dir), job)],
                           check=False)
        finally:
            await host.close()


def test_witnesses_on_lab_hosts_catch_a_resigned_rewrite(lab: Lab, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(lab.home / "vmigrate.toml", home / "vmigrate.toml")
    log = AuditLog(home / "audit.jsonl")
    job = "e2ew" + secrets.token_hex(4)
    log.append("job", {"vm": "g", "source": "h1", "dest": "h2"}, job=job)
    log.append("phase", {"phase": "begin"}, job=job)
    log.append("decision", {"decision": "unrelated"})
    end = log.append("end", {"status": "failed"}, job=job)
    log.append("phase", {"phase": "later"}, job="other")
    hosts = sorted(lab.inventory.hosts)[:2]
    try:
        written, failed = asyncio.run(write_witnesses(
            lab.inventory, hosts, job=job, seq=end.seq, hash=end.line_hash,
            key=end.key or "", records=log.job_records(job)))
        assert failed == [] and sorted(w.partition(":")[0] for w in written) == hosts

        lab_home = Lab(home, lab.name, lab.inventory)
        ok = lab_home.cli("audit", "verify", "--json")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        got = json.loads(ok.stdout)
        assert [h["state"] for h in got["hosts"]] == ["ok"] * len(lab.inventory.hosts)
        assert got["claims_checked"] >= 2 * len(log.job_records(job))

        # the job's failure rewritten as a success and the whole log re-signed with the
        # controller's own key: the chain and the signatures are fine, the hosts are not
        seq = _rewrite_resigned(home / "audit.jsonl", home, job)
        assert seq == end.seq
        offline = lab_home.cli("audit", "verify", "--offline", "--json")
        assert offline.returncode == 0, offline.stdout + offline.stderr  # nothing else holds it
        bad = lab_home.cli("audit", "verify", "--json")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        got = json.loads(bad.stdout)
        assert got["first_bad"] == end.seq and not got["ok"]
        assert "audit-witness" in got["witness"] and job in got["witness"]
        assert any(f"host {h}" in got["witness"] for h in hosts)
        # one witness is enough: the other host skipped
        bad = lab_home.cli("audit", "verify", "--json", "--skip-host", hosts[0])
        assert bad.returncode == 1 and f"host {hosts[1]}" in json.loads(bad.stdout)["witness"]
    finally:
        asyncio.run(_remove(lab, job))


def test_migration_leaves_its_head_on_both_hosts(lab: Lab, guest: list[str]) -> None:
    disk = lab.inventory.host("h1").pools["shared"] / "witness-boot.raw"
    guest.append("witvm")
    start_bootsector_vm(lab, "witvm", disk)
    rc, report = migrate(lab, "witvm")
    assert rc == 0, report
    head = report["audit_head"]
    last = read(lab.home / "audit.jsonl", job=report["job"])[-1]
    assert last.event == "end" and (head["seq"], head["hash"]) == (last.seq, last.line_hash)
    places = dict(w.split(":", 1) for w in report["audit_witnesses"])
    assert sorted(places) == ["h1", "h2"], report["cleanup_errors"]
    for name, path in places.items():
        assert path == witness_path(str(lab.inventory.host(name).data_dir), report["job"])
    ok = lab.cli("audit", "verify", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    got = json.loads(ok.stdout)
    assert {h["host"]: h["state"] for h in got["hosts"]} == {"h1": "ok", "h2": "ok"}
    assert got["job_heads"] >= 1 and got["claims_checked"] > got["job_heads"]
