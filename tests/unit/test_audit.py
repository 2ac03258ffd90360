"""The hash-chained audit log: appends, tamper detection, concurrency, CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmigrate.audit import (
    GENESIS,
    REPAIR_EVENT,
    AuditLog,
    check_appendable,
    read,
    repair,
    verify,
)
from vmigrate.audit.log import AuditRecord
from vmigrate.cli.audit import app
from vmigrate.errors import StoreError, UserError, VmigrateError


def canonical(obj: dict[str, object]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rehash(obj: dict[str, object]) -> dict[str, object]:
    """Recompute a record's own hash, as a careful forger would."""
    body = {k: v for k, v in obj.items() if k != "hash"}
    return {**body, "hash": hashlib.sha256(canonical(body).encode()).hexdigest()}


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
    obj["v"] = 2
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
    (_alter_and_rehash, 6),     # its own hash fits; the next record's prev does not
    (_remove, 5),
    (_reorder, 5),
    (_insert_copy, 5),
    (_insert_forged, 6),        # a well-formed insert breaks the next link
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
    # known limit of a chain: dropping whole records at the end is not visible
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
