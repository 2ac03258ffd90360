"""The signed, hash-chained audit log: appends, keys, tamper detection against the chain,
the signatures and what others hold (job heads, host witnesses), v1 logs, concurrency,
the CLI, and fuzzing of everything that parses records."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.queues
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from vmigrate.audit import (
    GENESIS,
    PRIVATE_NAME,
    PUBLIC_NAME,
    REPAIR_EVENT,
    VERSION,
    AuditLog,
    Claim,
    PublicKey,
    SigningKey,
    check_appendable,
    load_public_key,
    load_signing_key,
    parse_line,
    read,
    repair,
    verify,
)
from vmigrate.audit.log import AuditRecord
from vmigrate.audit.witness import Witness, witness_path
from vmigrate.cli._common import CTX
from vmigrate.cli.audit import app
from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import (
    AuditUnreadableError,
    HostUnreachableError,
    StoreError,
    UserError,
    VmigrateError,
)
from vmigrate.hosts import Host, LocalHost, open_host
from vmigrate.migration.job import Timing
from vmigrate.qemu.spec import DiskSpec, NicSpec, VMSpec
from vmigrate.service.migrations import MigrationRequest, MigrationService
from vmigrate.service.witness import scan, store_claims, witness_claims, write_witnesses
from vmigrate.store import Store
from vmigrate.testing.fakehv import FakeCluster


def canonical(obj: dict[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rehash(obj: dict[str, object]) -> dict[str, object]:
    """Recompute a record's own hash, as a careful forger without the key would (the
    signature stays the old one)."""
    body = {k: v for k, v in obj.items() if k not in ("hash", "sig")}
    return {**obj, "hash": hashlib.sha256(canonical(body).encode()).hexdigest()}


def make_log(path: Path, n: int = 10) -> list[AuditRecord]:
    log = AuditLog(path)
    return [log.append("phase", {"phase": f"p{i}", "i": i}, job=f"job{i % 2}")
            for i in range(n)]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write(path: Path, content: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in content))


def test_chain_of_many(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    records = make_log(path, 200)
    assert records[0].prev == GENESIS and records[0].seq == 1
    assert [r.seq for r in records] == list(range(1, 201))
    assert verify(path).ok and verify(path).records == 200
    assert read(path) == records
    assert [r.seq for r in read(path, job="job1")] == list(range(2, 201, 2))
    # prev is the hash of the previous line as written
    raw = lines(path)
    assert records[5].prev == hashlib.sha256(raw[4].encode()).hexdigest()
    assert json.loads(raw[5])["hash"] == records[5].hash


def test_absent_and_empty_logs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert verify(path).ok and verify(path).records == 0 and read(path) == []
    path.touch()
    result = verify(path)
    assert (result.ok, result.records, result.first_bad) == (True, 0, None)


def test_data_is_normalised(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    rec = AuditLog(path).append("decision", {"path": Path("/x"), "n": [1, 2]})
    assert rec.data == {"path": "/x", "n": [1, 2]}
    assert read(path)[0] == rec and verify(path).ok
    with pytest.raises(ValueError):
        AuditLog(path).append("decision", {"bad": float("nan")})
    assert verify(path).records == 1


def _alter(raw: list[str]) -> list[str]:
    obj = json.loads(raw[4])
    obj["data"]["phase"] = "forged"
    raw[4] = canonical(obj)
    return raw


def _alter_and_rehash(raw: list[str]) -> list[str]:
    obj = json.loads(raw[4])
    obj["data"]["phase"] = "forged"
    raw[4] = canonical(rehash(obj))
    return raw


def _remove(raw: list[str]) -> list[str]:
    del raw[4]
    return raw


def _reorder(raw: list[str]) -> list[str]:
    raw[4], raw[5] = raw[5], raw[4]
    return raw


def _insert_copy(raw: list[str]) -> list[str]:
    raw.insert(4, raw[3])
    return raw


def _insert_forged(raw: list[str]) -> list[str]:
    forged = {"v": 1, "seq": 5, "ts": "2025-01-01T00:00:00.000000Z", "job": None,
              "event": "phase", "data": {"phase": "forged"},
              "prev": hashlib.sha256(raw[3].encode()).hexdigest()}
    raw.insert(4, canonical(rehash(forged)))
    return raw


def _bad_version(raw: list[str]) -> list[str]:
    obj = json.loads(raw[4])
    obj["v"] = 3
    raw[4] = canonical(rehash(obj))
    return raw


def _reformat(raw: list[str]) -> list[str]:
    raw[4] = json.dumps(json.loads(raw[4]))  # same content, not canonical
    return raw


def _blank(raw: list[str]) -> list[str]:
    raw.insert(4, "")
    return raw


@pytest.mark.parametrize(("tamper", "first_bad"), [
    (_alter, 5),
    (_alter_and_rehash, 5),     # its own hash fits; its signature does not
    (_remove, 5),
    (_reorder, 5),
    (_insert_copy, 5),
    (_insert_forged, 5),        # an unsigned (v1) record among signed ones
    (_bad_version, 5),
    (_reformat, 5),
    (_blank, 5),
])
def test_tampering_detected(tmp_path: Path, tamper: Callable[[list[str]], list[str]],
                            first_bad: int) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    write(path, tamper(lines(path)))
    result = verify(path)
    assert not result.ok
    assert result.first_bad == first_bad
    assert result.records == first_bad - 1
    assert result.reason


def test_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    result = verify(path)
    assert (result.ok, result.first_bad, result.records) == (False, 10, 9)
    # the log refuses to extend a torn tail, and leaves the file alone
    with pytest.raises(StoreError):
        AuditLog(path).append("phase", {})
    assert path.read_bytes() == data[: len(data) - 40]


def test_truncated_at_line_boundary_keeps_valid_prefix(tmp_path: Path) -> None:
    # known limit of a chain alone: dropping whole records at the end is not visible
    # (a job head or a witness shows it: see test_truncated_tail_is_named)
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    write(path, lines(path)[:7])
    assert verify(path).ok and verify(path).records == 7
    assert AuditLog(path).append("phase", {}).seq == 8
    assert verify(path).ok


def test_read_rejects_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 3)
    write(path, _bad_version([*lines(path), *lines(path)]))
    with pytest.raises(StoreError):
        read(path)


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path))
    for i in range(count):
        log.append("decision", {"worker": worker, "i": i}, job=f"w{worker}")


def test_concurrent_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify(path)
    assert result.ok and result.records == 200
    records = read(path)
    for w in range(4):
        assert [r.data["i"] for r in records if r.job == f"w{w}"] == list(range(50))


# -- CLI ----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_verify_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    assert runner.invoke(app, ["verify"]).exit_code == 0  # no log yet
    make_log(tmp_path / "audit.jsonl", 6)
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 0
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["records"] == 6

    result = runner.invoke(app, ["show", "--json", "--job", "job1", "--tail", "2"])
    assert result.exit_code == 0
    assert [r["seq"] for r in json.loads(result.stdout)] == [4, 6]
    result = runner.invoke(app, ["show"])
    assert result.exit_code == 0 and "p5" in result.stdout

    path = tmp_path / "audit.jsonl"
    write(path, _alter(lines(path)))
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 1 and "5" in result.stdout
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["ok"], report["first_bad"]) == (False, 5)


# -- torn tail: check_appendable, repair -------------------------------------------------------

TORN = b'{"data":{"phase":"p10"},"event":"pha'  # an append cut short by a crash


def make_torn(path: Path, n: int = 10) -> bytes:
    """A valid log of n records followed by a partial line; returns the intact prefix."""
    make_log(path, n)
    intact = path.read_bytes()
    path.write_bytes(intact + TORN)
    return intact


def test_torn_tail_is_refused_then_repaired(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    intact = make_torn(path)
    result = verify(path)
    assert (result.ok, result.torn, result.records, result.first_bad) == (False, True, 10, 11)
    assert result.as_dict()["torn"] is True
    with pytest.raises(StoreError):
        AuditLog(path).append("phase", {})
    with pytest.raises(StoreError):
        check_appendable(path)
    assert path.read_bytes() == intact + TORN

    done = repair(path)
    assert done.removed_bytes == len(TORN)
    assert done.removed_sha256 == hashlib.sha256(TORN).hexdigest()
    assert done.records_kept == 10
    assert done.as_dict()["record"] == done.record.as_dict()
    # the file is the intact prefix plus the repair record, which is chained to it
    assert path.read_bytes().startswith(intact)
    records = read(path)
    assert records[-1] == done.record and len(records) == 11
    assert done.record.event == REPAIR_EVENT and done.record.seq == 11
    assert done.record.data == {"removed_bytes": len(TORN),
                                "removed_sha256": hashlib.sha256(TORN).hexdigest(),
                                "records_kept": 10}
    after = verify(path)
    assert (after.ok, after.torn, after.records) == (True, False, 11)
    check_appendable(path)
    assert AuditLog(path).append("phase", {"phase": "after"}).seq == 12
    assert verify(path).ok


def test_torn_first_line_repairs_to_a_fresh_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(TORN)
    assert verify(path).torn and verify(path).records == 0
    done = repair(path)
    assert (done.records_kept, done.record.seq, done.record.prev) == (0, 1, GENESIS)
    assert verify(path).ok and verify(path).records == 1


def test_check_appendable_accepts_sound_logs(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    check_appendable(path)  # absent
    assert not path.exists()
    path.touch()
    check_appendable(path)  # empty
    make_log(path, 3)
    check_appendable(path)
    assert verify(path).records == 3


def test_check_appendable_refuses_an_unreadable_last_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 3)
    write(path, [*lines(path), "not a record"])
    with pytest.raises(StoreError):
        check_appendable(path)
    assert not verify(path).torn


def _tamper_middle(path: Path) -> None:
    write(path, _alter(lines(path)))


def _tamper_middle_and_tear(path: Path) -> None:
    write(path, _remove(lines(path)))
    with path.open("ab") as f:
        f.write(TORN)


@pytest.mark.parametrize("damage", [None, _tamper_middle, _tamper_middle_and_tear])
def test_repair_refuses_intact_and_tampered_logs(
        tmp_path: Path, damage: Callable[[Path], None] | None) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    if damage is not None:
        damage(path)
    before = path.read_bytes()
    result = verify(path)
    assert not result.torn
    with pytest.raises(StoreError):
        repair(path)
    assert path.read_bytes() == before
    assert verify(path) == result


def test_repair_refuses_an_absent_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with pytest.raises(StoreError):
        repair(path)
    assert not path.exists()


def test_cli_repair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    path = tmp_path / "audit.jsonl"
    intact = make_torn(path)
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 1 and "repair" in result.stdout
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["torn"] is True

    # no terminal (CliRunner's stdin is not a tty) and no --yes: refused, nothing changed
    result = runner.invoke(app, ["repair"])
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    assert path.read_bytes() == intact + TORN

    result = runner.invoke(app, ["repair", "--yes"])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(TORN).hexdigest() in result.stdout
    assert runner.invoke(app, ["verify"]).exit_code == 0

    # now intact: nothing to repair, exit status 1 through the StoreError
    result = runner.invoke(app, ["repair", "--yes"])
    assert isinstance(result.exception, StoreError) and result.exception.exit_code == 1


def test_cli_repair_json_and_confirmation(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    path = tmp_path / "audit.jsonl"
    intact = make_torn(path)
    result = runner.invoke(app, ["repair", "--yes", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["removed_bytes"], report["records_kept"]) == (len(TORN), 10)
    assert report["record"] == read(path)[-1].as_dict()

    # on a terminal, the operator is asked; "n" changes nothing, "y" repairs
    path.write_bytes(intact + TORN)
    monkeypatch.setattr("vmigrate.cli.audit._have_terminal", lambda: True)
    result = runner.invoke(app, ["repair"], input="n\n")
    assert result.exit_code == 1 and not isinstance(result.exception, VmigrateError)
    assert path.read_bytes() == intact + TORN
    result = runner.invoke(app, ["repair"], input="y\n")
    assert result.exit_code == 0 and verify(path).ok


def test_cli_repair_refuses_tampering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    path = tmp_path / "audit.jsonl"
    make_log(path, 10)
    _tamper_middle(path)
    before = path.read_bytes()
    result = runner.invoke(app, ["repair", "--yes"])
    assert isinstance(result.exception, StoreError) and result.exception.exit_code == 1
    assert path.read_bytes() == before


def test_cli_repair_exit_status_without_terminal(tmp_path: Path) -> None:
    # the real entry point: the refusal is one 'error:' line on stderr and exit status 2
    make_torn(tmp_path / "audit.jsonl")
    env = {**os.environ, "VMIGRATE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vmigrate", "audit", "repair"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert verify(tmp_path / "audit.jsonl").torn


# -- the controller's key ------------------------------------------------------------------------


def test_key_is_created_at_first_use_private_and_stable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    log = AuditLog(home / "audit.jsonl")
    assert load_public_key(home) is None  # nothing yet
    rec = log.append("phase", {"phase": "begin"}, job="j1")
    private, public = home / PRIVATE_NAME, home / PUBLIC_NAME
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_public_key(home)
    assert key is not None and rec.key == key.fingerprint and rec.signed and rec.v == VERSION
    assert PublicKey.load(public) == key
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", key.fingerprint)
    # the same key the next time, in another object
    assert AuditLog(home / "audit.jsonl").append("phase", {}).key == key.fingerprint
    assert load_signing_key(home).public == key
    assert verify(home / "audit.jsonl").ok


def _make_key(home: str, out: multiprocessing.queues.Queue[str]) -> None:
    out.put(load_signing_key(Path(home)).fingerprint)


def test_key_creation_races_to_one_key(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.queues.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_make_key, args=(str(tmp_path), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    prints = {queue.get(timeout=5) for _ in procs}
    key = load_public_key(tmp_path)
    assert key is not None and prints == {key.fingerprint}
    assert sorted(f.name for f in tmp_path.iterdir()) == [PRIVATE_NAME, PUBLIC_NAME]


def test_replaced_public_key_is_refused(tmp_path: Path) -> None:
    make_log(tmp_path / "audit.jsonl", 2)
    (tmp_path / PUBLIC_NAME).write_text(SigningKey.generate().public.text())
    before = (tmp_path / "audit.jsonl").read_bytes()
    with pytest.raises(AuditUnreadableError):
        AuditLog(tmp_path / "audit.jsonl").append("phase", {})
    with pytest.raises(AuditUnreadableError):
        check_appendable(tmp_path / "audit.jsonl")
    with pytest.raises(AuditUnreadableError):
        verify(tmp_path / "audit.jsonl")
    assert (tmp_path / "audit.jsonl").read_bytes() == before
    # without the private key, the public key file is what the log is checked against
    (tmp_path / PRIVATE_NAME).unlink()
    result = verify(tmp_path / "audit.jsonl")
    assert not result.ok and result.first_bad == 1


@pytest.mark.parametrize("text", ["", "ed25519", "ed25519 !!!", "rsa AAAA", "ed25519 AAAA",
                                  "ed25519 " + "A" * 44 + " extra"])
def test_public_key_parse_refuses_what_is_not_one(text: str) -> None:
    with pytest.raises(AuditUnreadableError):
        PublicKey.parse(text)


def test_unreadable_private_key(tmp_path: Path) -> None:
    (tmp_path / PRIVATE_NAME).write_text("not a key\n")
    with pytest.raises(AuditUnreadableError) as info:
        AuditLog(tmp_path / "audit.jsonl").append("phase", {})
    assert info.value.exit_code == 9
    assert not (tmp_path / "audit.jsonl").exists()


# -- signatures ------------------------------------------------------------------------------------


def resign(obj: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """A record hashed and signed again with ``key``, as one who holds it would."""
    obj = {**obj, "v": 2, "key": key.fingerprint}
    body = {k: v for k, v in obj.items() if k not in ("hash", "sig")}
    obj["hash"] = hashlib.sha256(canonical(body).encode()).hexdigest()
    signed = {k: v for k, v in obj.items() if k != "sig"}
    obj["sig"] = key.sign(canonical(signed).encode())
    return obj


def forge(path: Path, key: SigningKey,
          edit: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    """Rewrite the whole log: ``edit`` the records, then renumber, re-chain, re-hash and
    re-sign every one with ``key`` (what someone with root on the controller can do)."""
    records = edit([json.loads(line) for line in lines(path)])
    out: list[str] = []
    for i, obj in enumerate(records):
        obj = {**obj, "seq": i + 1,
               "prev": GENESIS if not out else hashlib.sha256(out[-1].encode()).hexdigest()}
        out.append(canonical(resign(obj, key)))
    write(path, out)


@dataclass
class Jobs:
    """A log with two jobs (a failed one, then a completed one) and their heads, as the
    store's job rows and the hosts' witnesses keep them."""

    path: Path
    log: AuditLog
    ends: dict[str, AuditRecord]

    def claims(self, where: str = "the job row") -> list[Claim]:
        return [Claim(seq=r.seq, hash=r.line_hash, where=f"{where} of {job}", job=job)
                for job, r in self.ends.items()]

    def witnesses(self, host: str = "h1") -> list[Claim]:
        out: list[Claim] = []
        for job, end in self.ends.items():
            w = Witness(job=job, host=host, seq=end.seq, hash=end.line_hash,
                        key=end.key or "", ts="t", records=tuple(self.log.job_records(job)))
            out += w.claims(f"the witness on host {host}")
        return out


def make_jobs(tmp_path: Path) -> Jobs:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    ends = {}
    for job, status in (("jobA", "failed"), ("jobB", "completed")):
        log.append("job", {"vm": "g1", "mode": "live"}, job=job)
        for phase in ("begin", "prepare", "perform"):
            log.append("phase", {"phase": phase}, job=job)
        log.append("decision", {"decision": "plan"})
        ends[job] = log.append("end", {"status": status}, job=job)
    return Jobs(path, log, ends)


def _completed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in records:
        if r["event"] == "end" and r["job"] == "jobA":
            r["data"]["status"] = "completed"
    return records


def test_whole_chain_rewrite_without_the_key_is_named(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    raw = lines(jobs.path)
    end = jobs.ends["jobA"].seq
    obj = json.loads(raw[end - 1])
    obj["data"]["status"] = "completed"
    raw[end - 1] = canonical(rehash(obj))
    for i in range(end, len(raw)):  # re-chain everything after it, hashes and all
        obj = json.loads(raw[i])
        obj["prev"] = hashlib.sha256(raw[i - 1].encode()).hexdigest()
        raw[i] = canonical(rehash(obj))
    write(jobs.path, raw)
    result = verify(jobs.path)
    assert (result.ok, result.first_bad, result.records) == (False, end, end - 1)
    assert result.signed == end - 1


def test_whole_chain_rewrite_resigned_with_the_key_is_named(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    forge(jobs.path, load_signing_key(tmp_path), _completed)
    end = jobs.ends["jobA"].seq
    assert verify(jobs.path).ok  # the chain and the signatures alone cannot tell
    for claims in (jobs.claims(), jobs.witnesses()):
        result = verify(jobs.path, claims=claims)
        assert (result.ok, result.first_bad, result.records) == (False, end, end - 1)
        assert result.disagrees is not None and result.disagrees.job == "jobA"
        assert result.witness == result.disagrees.where and not result.torn
    # a witness knows every record of its job: an edit before the head is named exactly
    forge(jobs.path, load_signing_key(tmp_path),
          lambda rs: [{**r, "data": {"phase": "x"}} if r["seq"] == 3 else r for r in rs])
    result = verify(jobs.path, claims=jobs.witnesses())
    assert (result.ok, result.first_bad) == (False, 3)


def test_dropped_end_record_is_named(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    end = jobs.ends["jobA"].seq
    raw = lines(jobs.path)
    write(jobs.path, raw[:end - 1] + raw[end:])  # simply removed: the chain breaks there
    result = verify(jobs.path)
    assert (result.ok, result.first_bad) == (False, end)
    # removed, and the rest renumbered, re-chained and re-signed with the key
    forge(jobs.path, load_signing_key(tmp_path), lambda rs: rs)
    assert verify(jobs.path).ok
    result = verify(jobs.path, claims=jobs.claims())
    assert (result.ok, result.first_bad) == (False, end)
    assert result.disagrees is not None and result.disagrees.job == "jobA"


def test_truncated_tail_is_named(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    raw = lines(jobs.path)
    write(jobs.path, raw[:-2])  # the last job's end record and the one before it
    assert verify(jobs.path).ok  # a valid prefix
    for claims in (jobs.claims(), jobs.witnesses("h2")):
        result = verify(jobs.path, claims=claims)
        assert (result.ok, result.first_bad, result.records) == (False, len(raw) - 1,
                                                                 len(raw) - 2)
        assert not result.torn and result.disagrees is not None
        assert result.disagrees.job == "jobB"
    # torn as well as cut: not a mere torn tail, so never repaired
    with jobs.path.open("ab") as f:
        f.write(TORN)
    result = verify(jobs.path, claims=jobs.claims())
    assert not result.ok and not result.torn and result.first_bad == len(raw) - 1
    with pytest.raises(StoreError):
        repair(jobs.path, claims=jobs.claims())


def test_record_signed_by_another_key_is_named(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    other = SigningKey.generate()
    raw = lines(jobs.path)
    raw[2] = canonical(resign(json.loads(raw[2]), other))
    for i in range(3, len(raw)):  # the chain after it re-linked with the right key
        obj = json.loads(raw[i])
        obj["prev"] = hashlib.sha256(raw[i - 1].encode()).hexdigest()
        raw[i] = canonical(resign(obj, load_signing_key(tmp_path)))
    write(jobs.path, raw)
    result = verify(jobs.path)
    assert (result.ok, result.first_bad, result.records) == (False, 3, 2)
    assert result.reason is not None and other.fingerprint in result.reason
    # the whole log signed by another key: named from the first record
    forge(jobs.path, other, lambda rs: rs)
    assert (verify(jobs.path).ok, verify(jobs.path).first_bad) == (False, 1)
    # which is the right key if it is the one given
    assert verify(jobs.path, key=other.public).ok


def test_signed_log_without_a_key_to_check_it(tmp_path: Path) -> None:
    make_log(tmp_path / "audit.jsonl", 3)
    (tmp_path / PRIVATE_NAME).unlink()
    (tmp_path / PUBLIC_NAME).unlink()
    result = verify(tmp_path / "audit.jsonl")
    assert (result.ok, result.first_bad, result.key) == (False, 1, None)


def test_forged_signature_bytes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 4)
    raw = lines(path)
    obj = json.loads(raw[1])
    obj["sig"] = base64.b64encode(bytes(64)).decode()
    raw[1] = canonical(obj)
    write(path, raw)
    assert (verify(path).ok, verify(path).first_bad) == (False, 2)


# -- format v1 ------------------------------------------------------------------------------------


def v1_log(path: Path, n: int) -> list[str]:
    """A log as vmigrate wrote it before records were signed."""
    out: list[str] = []
    for i in range(n):
        obj: dict[str, object] = {
            "v": 1, "seq": i + 1, "ts": "2025-01-31T12:00:00.000000Z", "job": "old",
            "event": "phase", "data": {"i": i},
            "prev": GENESIS if not out else hashlib.sha256(out[-1].encode()).hexdigest()}
        out.append(canonical(rehash(obj)))
    write(path, out)
    return out


def test_v1_logs_still_read_as_unsigned(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    v1_log(path, 5)
    result = verify(path)
    assert (result.ok, result.records, result.unsigned, result.signed) == (True, 5, 5, 0)
    assert [r.v for r in read(path)] == [1] * 5 and not read(path)[0].signed
    # appending goes on with signed records, chained to the old ones
    rec = AuditLog(path).append("phase", {"new": True})
    assert (rec.seq, rec.v) == (6, 2)
    result = verify(path)
    assert (result.ok, result.unsigned, result.signed) == (True, 5, 1)
    # a v1 record is still checked: its hash
    write(path, _alter(lines(path)))
    assert (verify(path).ok, verify(path).first_bad) == (False, 5)


def test_unsigned_record_after_signed_ones_is_a_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 4)
    raw = lines(path)
    obj = {k: v for k, v in json.loads(raw[3]).items() if k not in ("key", "sig")}
    raw[3] = canonical(rehash({**obj, "v": 1}))
    write(path, raw)
    result = verify(path)
    assert (result.ok, result.first_bad) == (False, 4)


# -- an unreadable log -----------------------------------------------------------------------------


def test_unreadable_log_is_its_own_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.mkdir()  # reading it fails (EISDIR), even as root
    for call in (lambda: verify(path), lambda: read(path), lambda: repair(path)):
        with pytest.raises(AuditUnreadableError) as info:
            call()
        assert info.value.exit_code == 9 and isinstance(info.value, StoreError)


def test_cli_unreadable_log_exit_status(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "audit.jsonl").mkdir()
    env = {**os.environ, "VMIGRATE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vmigrate", "audit", "verify", "--offline"],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 9, proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    for argv in (["export"], ["show"], ["repair", "--yes"]):
        result = runner.invoke(app, argv)
        assert isinstance(result.exception, AuditUnreadableError), argv
        assert result.exception.exit_code == 9
    # tampering is 1, not 9 (see also test_cli_verify_and_show)
    shutil.rmtree(tmp_path / "audit.jsonl")
    make_log(tmp_path / "audit.jsonl", 6)
    write(tmp_path / "audit.jsonl", _alter(lines(tmp_path / "audit.jsonl")))
    result = runner.invoke(app, ["verify", "--offline"])
    assert result.exit_code == 1 and result.exception is not None
    assert not isinstance(result.exception, VmigrateError)


# -- repair keeps the signatures ----------------------------------------------------------------


def test_repair_record_is_signed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_torn(path, 4)
    done = repair(path)
    key = load_public_key(tmp_path)
    assert key is not None and done.record.signed and done.record.key == key.fingerprint
    result = verify(path)
    assert (result.ok, result.signed, result.records) == (True, 5, 5)


# -- witnesses ------------------------------------------------------------------------------------


def test_witness_round_trip_and_merge(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    end = jobs.ends["jobA"]
    w = Witness(job="jobA", host="h1", seq=end.seq, hash=end.line_hash, key=end.key or "",
                ts="2025-01-31T12:00:00Z", records=tuple(jobs.log.job_records("jobA")))
    assert Witness.parse(w.to_bytes()) == w
    assert w.to_bytes().endswith(b"\n") and w.to_bytes().count(b"\n") == 1
    assert {c.seq for c in w.claims("x")} == {s for s, _ in w.records}
    later = Witness(job="jobA", host="h1", seq=end.seq + 10, hash="a" * 64, key=w.key,
                    ts="t2", records=((end.seq + 10, "a" * 64),))
    merged = later.merged(w)
    assert merged.seq == end.seq + 10 and len(merged.records) == len(w.records) + 1
    assert later.merged(None) == later
    assert witness_path("/var/lib/vmigrate/", "jobA") == \
        "/var/lib/vmigrate/audit-witness/jobA.json"
    for bad in ("../x", "", "a/b", ".hidden", "x" * 65):
        with pytest.raises(StoreError):
            witness_path("/d", bad)


def read_bytes(path: str) -> bytes:
    """A file's bytes (a plain function: the async tests read small files)."""
    return Path(path).read_bytes()


def local_inventory(tmp_path: Path, *names: str) -> Inventory:
    hosts = {}
    for n in names:
        hosts[n] = HostConfig(name=n, transport="local", data_dir=tmp_path / f"{n}-data")
    return Inventory(hosts=hosts)


async def test_witnesses_on_local_hosts(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    inv = local_inventory(tmp_path, "h1", "h2", "h3")
    for job, end in jobs.ends.items():
        written, failed = await write_witnesses(
            inv, ["h1", "h2"], job=job, seq=end.seq, hash=end.line_hash,
            key=end.key or "", records=jobs.log.job_records(job))
        assert failed == [] and len(written) == 2
        for place in written:
            host, _, file = place.partition(":")
            assert Witness.parse(read_bytes(file)).host == host
    scans = await scan(inv, skip=["h3"])
    assert [(s.host, s.state, len(s.witnesses)) for s in scans] == [
        ("h1", "ok", 2), ("h2", "ok", 2), ("h3", "skipped", 0)]
    key = load_public_key(tmp_path)
    assert key is not None
    claims, foreign = witness_claims(scans, key=key.fingerprint, jobs=[])
    assert foreign == 0 and claims
    assert verify(jobs.path, claims=claims).ok
    # another key's witnesses of unknown jobs belong to another controller
    claims, foreign = witness_claims(scans, key="SHA256:" + "A" * 43, jobs=["jobA"])
    assert foreign == 2 and {c.job for c in claims} == {"jobA"}

    forge(jobs.path, load_signing_key(tmp_path), _completed)
    claims, _ = witness_claims(scans, key=key.fingerprint, jobs=[])
    result = verify(jobs.path, claims=claims)
    assert (result.ok, result.first_bad) == (False, jobs.ends["jobA"].seq)
    assert result.witness is not None and "h1-data/audit-witness/jobA.json" in result.witness

    # a damaged witness file is reported, the others still read
    (tmp_path / "h2-data" / "audit-witness" / "jobB.json").write_text("garbage\n")
    scans = await scan(inv)
    h2 = next(s for s in scans if s.host == "h2")
    assert len(h2.witnesses) == 1 and len(h2.unreadable) == 1


class _Unreachable(LocalHost):
    async def _exec(self, argv: Sequence[str], stdin: bytes | None,
                    timeout: float | None) -> tuple[int, bytes, bytes]:
        raise HostUnreachableError(f"{self.name}: no route")


def _opener(down: set[str]) -> Callable[[HostConfig], Host]:
    def opener(cfg: HostConfig) -> Host:
        return _Unreachable(cfg.name) if cfg.name in down else open_host(cfg)
    return opener


async def test_witness_hosts_that_fail(tmp_path: Path) -> None:
    jobs = make_jobs(tmp_path)
    inv = local_inventory(tmp_path, "h1", "h2")
    end = jobs.ends["jobA"]
    written, failed = await write_witnesses(
        inv, ["h1", "h2"], job="jobA", seq=end.seq, hash=end.line_hash, key=end.key or "",
        records=[], opener=_opener({"h2"}))
    assert [w.partition(":")[0] for w in written] == ["h1"] and len(failed) == 1
    assert "h2" in failed[0]
    scans = await scan(inv, opener=_opener({"h2"}))
    assert [(s.host, s.state) for s in scans] == [("h1", "ok"), ("h2", "unreachable")]
    # a host with no witness directory has none
    scans = await scan(local_inventory(tmp_path, "h9"))
    assert (scans[0].state, scans[0].witnesses) == ("ok", [])


# -- the store keeps each job's head ---------------------------------------------------------------


def test_store_keeps_the_head_and_upgrades(tmp_path: Path) -> None:
    store = Store(tmp_path / "vmigrate.db")
    store.create_job("j1", "g1", "live", "h1", "h2", {})
    store.create_job("j2", "g2", "live", "h1", "h2", {})
    store.set_audit_head("j1", 7, "b" * 64)
    assert store.audit_heads() == {"j1": (7, "b" * 64)}
    claims = store_claims(store)
    assert [(c.seq, c.job, c.head) for c in claims] == [(7, "j1", True)]
    # a schema-4 store (no head column) is upgraded in place
    db = sqlite3.connect(tmp_path / "vmigrate.db")
    db.execute("ALTER TABLE jobs DROP COLUMN audit_head")
    db.execute("UPDATE meta SET value='4' WHERE key='version'")
    db.commit()
    db.close()
    store.close()
    store = Store(tmp_path / "vmigrate.db")
    assert store.audit_heads() == {}
    store.set_audit_head("j2", 3, "c" * 64)
    assert store.audit_heads() == {"j2": (3, "c" * 64)}
    # a head that is not one is named, not guessed at
    store._db.execute("UPDATE jobs SET audit_head='nonsense' WHERE id='j2'")
    with pytest.raises(StoreError):
        store.audit_heads()
    store.close()


# -- a migration keeps its head in the job row, the report and on its hosts ----------------------




def test_migration_keeps_its_head_and_witnesses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = "/srv/shared"
    hosts = {n: HostConfig(name=n, transport="local", data_dir=tmp_path / f"{n}-data",
                           migration_address=f"10.241.1.1{i}", pools={"shared": Path(shared)})
             for i, n in enumerate(("h1", "h2"), start=1)}
    inv = Inventory(hosts=hosts)
    cluster = FakeCluster(inv)
    store = Store(tmp_path / "vmigrate.db")
    log = AuditLog(tmp_path / "audit.jsonl")
    spec = VMSpec(name="g1", memory_mib=256, disks=(DiskSpec(path=f"{shared}/g1.raw"),),
                  nics=(NicSpec(bridge="br0", mac="52:54:00:12:34:56"),))
    store.add_vm("g1", "h1", spec.model_dump_json())
    cluster.add_vm("h1", spec, ram=256 << 20)
    service = MigrationService(inv, store, log, backend=cluster.backend(), witness_hosts=open_host,
                               timing=Timing(sample_s=0, poll_s=0, forward_retry_s=0,
                                             dest_run_wait_s=2, boot_wait_s=1,
                                             ping_wait_s=0.1, memcheck_wait_s=0.1))
    # run to its end here; the CLI below runs its own event loop
    report = asyncio.run(service.migrate(MigrationRequest(vm="g1", dest="h2", mode="live")))
    assert report.status == "completed", (report.error, report.cleanup_errors)
    last = read(log.path)[-1]
    assert last.event == "end" and report.audit_head is not None
    assert (report.audit_head.seq, report.audit_head.hash) == (last.seq, last.line_hash)
    assert store.audit_heads() == {report.job: (last.seq, last.line_hash)}
    stored = store.get_job(report.job).report
    assert stored is not None and stored["audit_head"]["seq"] == last.seq
    assert sorted(w.partition(":")[0] for w in report.audit_witnesses) == ["h1", "h2"]
    witnessed = [Witness.parse(read_bytes(w.partition(":")[2]))
                 for w in report.audit_witnesses]
    assert all(w.seq == last.seq and w.hash == last.line_hash for w in witnessed)
    assert {s for s, _ in witnessed[0].records} == {r.seq for r in read(log.path,
                                                                       job=report.job)}

    # the CLI checks the log against the job row and both hosts' witnesses
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    (tmp_path / "vmigrate.toml").write_text(
        "".join(f'[hosts.{n}]\ntransport = "local"\ndata_dir = "{tmp_path / f"{n}-data"}"\n'
                for n in ("h1", "h2")))
    monkeypatch.setattr(CTX, "config", None)
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["job_heads"] == 1 and got["claims_checked"] > 1
    assert [h["state"] for h in got["hosts"]] == ["ok", "ok"]

    # the job's end rewritten, whole chain re-signed with the controller's key
    forge(log.path, load_signing_key(tmp_path),
          lambda rs: [{**r, "data": {**r["data"], "status": "failed"}}
                      if r["event"] == "end" else r for r in rs])
    result = runner.invoke(app, ["verify", "--json", "--offline"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_bad"] == last.seq  # the job row
    store.set_audit_head(report.job, 10**6, "d" * 64)  # the store forged as well
    result = runner.invoke(app, ["verify", "--json", "--skip-host", "h2"])
    assert result.exit_code == 1
    got = json.loads(result.stdout)
    assert got["first_bad"] == last.seq and "h1-data/audit-witness" in got["witness"]
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 1 and "TAMPERED" in result.stdout
    assert "audit-witness" in result.stdout and f"record {last.seq}" in result.stdout
    # the job row and the witnesses disagree at the same record: a host's is named
    store.set_audit_head(report.job, last.seq, last.line_hash)
    got = json.loads(runner.invoke(app, ["verify", "--json"]).stdout)
    assert got["first_bad"] == last.seq and "audit-witness" in got["witness"]
    store.close()


# -- CLI: verify, export, key ---------------------------------------------------------------------


def test_cli_verify_prints_the_fingerprint_and_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    monkeypatch.setattr(CTX, "config", None)
    make_log(tmp_path / "audit.jsonl", 3)
    key = load_public_key(tmp_path)
    assert key is not None
    result = runner.invoke(app, ["verify"])
    assert result.exit_code == 0 and key.fingerprint in result.stdout
    got = json.loads(runner.invoke(app, ["verify", "--json", "--offline"]).stdout)
    assert (got["key"], got["signed"], got["unsigned"], got["offline"]) == (
        key.fingerprint, 3, 0, True)
    # an unknown host to skip is a wrong request
    result = runner.invoke(app, ["verify", "--skip-host", "nope"])
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    # another public key given: every record is signed by another key
    other = tmp_path / "other.pub"
    other.write_text(SigningKey.generate().public.text())
    result = runner.invoke(app, ["verify", "--offline", "--json", "--key", str(other)])
    assert result.exit_code == 1 and json.loads(result.stdout)["first_bad"] == 1
    result = runner.invoke(app, ["verify", "--offline", "--key", str(tmp_path / "none.pub")])
    assert isinstance(result.exception, AuditUnreadableError)


def test_cli_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    records = make_log(tmp_path / "audit.jsonl", 6)
    result = runner.invoke(app, ["export"])
    assert result.exit_code == 0
    got = result.stdout.splitlines()
    assert got == lines(tmp_path / "audit.jsonl")
    assert [parse_line(line) for line in got] == records
    result = runner.invoke(app, ["export", "--job", "job1", "--after-seq", "2"])
    assert [json.loads(x)["seq"] for x in result.stdout.splitlines()] == [4, 6]
    result = runner.invoke(app, ["export", "--since", "2999-01-01"])
    assert result.exit_code == 0 and result.stdout == ""
    result = runner.invoke(app, ["export", "--since", records[0].ts])
    assert len(result.stdout.splitlines()) == 6
    out = tmp_path / "siem.jsonl"
    result = runner.invoke(app, ["export", "--output", str(out)])
    assert result.exit_code == 0 and out.read_text().splitlines() == got
    result = runner.invoke(app, ["export", "--since", "yesterday"])
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2


def test_cli_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    got = json.loads(runner.invoke(app, ["key", "--json"]).stdout)
    assert got["fingerprint"] is None and not (tmp_path / PRIVATE_NAME).exists()
    make_log(tmp_path / "audit.jsonl", 1)
    got = json.loads(runner.invoke(app, ["key", "--json"]).stdout)
    key = load_public_key(tmp_path)
    assert key is not None and got["fingerprint"] == key.fingerprint
    assert PublicKey.parse(got["public_key"]) == key
    assert key.fingerprint in runner.invoke(app, ["key"]).stdout


# -- fuzzing: nothing but vmigrate's own errors comes out -----------------------------------------

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12)


def _record_like() -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped like records, with any field replaced by anything."""
    good: dict[str, Any] = {
        "v": 2, "seq": 1, "ts": "2025-01-31T12:00:00.000000Z", "job": None,
        "event": "phase", "data": {}, "prev": GENESIS, "hash": "0" * 64,
        "key": "SHA256:" + "A" * 43, "sig": base64.b64encode(bytes(64)).decode()}
    return st.fixed_dictionaries(
        {k: st.one_of(st.just(v), _JSONISH) for k, v in good.items()},
        optional={"extra": _JSONISH})


@FUZZ
@given(text=st.text(max_size=300) | st.builds(json.dumps, _JSONISH)
       | st.builds(canonical, _record_like()))
def test_fuzz_parse_line(text: str) -> None:
    try:
        record = parse_line(text)
    except StoreError:
        return
    assert record.v in (1, 2) and record.seq >= 1
    record.line().encode()  # a parsed record always has a canonical form


@FUZZ
@given(data=st.binary(max_size=2000) | st.lists(
    st.builds(canonical, _record_like()) | st.text(max_size=50), max_size=5).map(
        lambda ls: "\n".join(ls).encode()),
       claims=st.lists(st.builds(Claim, seq=st.integers(1, 8), hash=st.text(max_size=64),
                                 where=st.just("w")), max_size=3))
def test_fuzz_verify_any_file(tmp_path: Path, data: bytes, claims: list[Claim]) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    for key in (None, SigningKey.generate().public):
        result = verify(path, key=key, key_dir=tmp_path / "nokey", claims=claims)
        assert result.ok or (result.first_bad is not None and result.reason)
    with contextlib.suppress(StoreError):
        read(path)


_SIGNED: dict[str, bytes] = {}


def _signed_log(tmp: Path) -> bytes:
    if "log" not in _SIGNED:
        make_jobs(tmp)
        _SIGNED["log"] = (tmp / "audit.jsonl").read_bytes()
        _SIGNED["pub"] = (tmp / PUBLIC_NAME).read_bytes()
    return _SIGNED["log"]


@FUZZ
@given(pos=st.integers(0, 10**6), value=st.integers(0, 255))
def test_fuzz_any_changed_byte_is_detected(tmp_path: Path, pos: int, value: int) -> None:
    data = bytearray(_signed_log(tmp_path / "base"))
    pos %= len(data)
    assume(data[pos] != value)
    data[pos] = value
    key = PublicKey.parse(_SIGNED["pub"].decode())
    path = tmp_path / "changed.jsonl"
    path.write_bytes(bytes(data))
    result = verify(path, key=key)
    assert not result.ok and result.first_bad is not None


@FUZZ
@given(data=st.binary(max_size=500) | st.builds(json.dumps, _JSONISH).map(str.encode)
       | st.fixed_dictionaries({
           "kind": st.just("vmigrate-audit-witness") | st.text(max_size=5),
           "v": st.just(1) | _JSONISH, "job": st.just("j1") | _JSONISH,
           "host": st.just("h1") | _JSONISH, "seq": st.integers(-2, 5) | _JSONISH,
           "hash": st.just("a" * 64) | _JSONISH, "key": st.just("SHA256:" + "A" * 43) | _JSONISH,
           "ts": st.just("t") | _JSONISH,
           "records": st.lists(st.lists(st.integers(0, 3) | st.just("a" * 64), max_size=3),
                               max_size=3) | _JSONISH,
       }).map(lambda d: json.dumps(d).encode()))
def test_fuzz_witness_parse(data: bytes) -> None:
    try:
        w = Witness.parse(data)
    except StoreError:
        return
    assert Witness.parse(w.to_bytes()) == w


@FUZZ
@given(text=st.text(max_size=120))
def test_fuzz_public_key_parse(text: str) -> None:
    try:
        key = PublicKey.parse(text)
    except AuditUnreadableError:
        return
    assert PublicKey.parse(key.text()) == key
