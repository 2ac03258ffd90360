"""The hash-chained, append-only audit log (``$VMIGRATE_HOME/audit.jsonl``).

One JSON object per line, written in canonical form (keys sorted, no spaces,
UTF-8), fields in this order of meaning:

``v``      format version, 1
``seq``    1 for the first record, then +1 per line
``ts``     ISO-8601 UTC time of the append, e.g. ``2025-01-31T12:00:00.123456Z``
``job``    migration job id, or null
``event``  what happened: ``phase``, ``decision`` ...
``data``   an object with the details
``prev``   hex SHA-256 of the previous record's line (without its newline);
           64 zeros for the first record
``hash``   hex SHA-256 of the canonical JSON of this record without ``hash``

Tampering shows in :func:`verify`: an edited record fails its ``hash`` (or, if
the hash was recomputed, the next record's ``prev``); a removed, inserted or
moved record breaks ``seq`` or ``prev``. What a chain alone cannot show is the
removal of records at the *end* of the log (the remaining prefix is a valid
chain); keep the latest ``hash`` elsewhere (the job report) to detect that.

Several processes may append at once: :meth:`AuditLog.append` holds an
exclusive ``flock`` on the file while it reads the last line and writes its
own, then ``fsync`` s.

A crash in the middle of an append can leave a *torn tail*: a partial last line
without its newline (a record whose ``append`` never returned, so it was never
acknowledged). Nothing is appended after a torn tail (the chain is never extended
from a broken record); :func:`verify` reports it with ``torn`` set, and
:func:`check_appendable` lets a caller find out before it starts work that needs
the log. :func:`repair` mends exactly that case and nothing else: under the same
lock, it cuts the file after its last newline and appends an ``audit-repair``
record (how many bytes were removed and their SHA-256), so the repair itself is
evidence in the chain. Damage anywhere else (an edited, removed or inserted
record) is tampering and is never repaired.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmigrate.errors import StoreError

VERSION = 1
GENESIS = "0" * 64
_FIELDS = ("data", "event", "hash", "job", "prev", "seq", "ts", "v")
_TAIL_CHUNK = 8192


def _canonical(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit log."""

    v: int
    seq: int
    ts: str
    job: str | None
    event: str
    data: dict[str, Any]
    prev: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"v": self.v, "seq": self.seq, "ts": self.ts, "job": self.job,
                "event": self.event, "data": self.data, "prev": self.prev, "hash": self.hash}

    def line(self) -> str:
        """The record as written (canonical JSON, no newline)."""
        return _canonical(self.as_dict())

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.ts.replace("Z", "+00:00"))


def _is_hex64(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _parse(line: str) -> tuple[AuditRecord | None, str | None]:
    """A record from one line, or the reason the line is not one (format only)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None, "not valid JSON (truncated or edited)"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    version = obj.get("v")
    if version != VERSION or isinstance(version, bool):
        return None, f"unknown format version {version!r} (this vmigrate reads {VERSION})"
    if tuple(sorted(obj)) != _FIELDS:
        return None, f"fields {sorted(obj)} are not {list(_FIELDS)}"
    seq, ts, job, event, data = obj["seq"], obj["ts"], obj["job"], obj["event"], obj["data"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None, "seq is not a positive integer"
    if not isinstance(ts, str):
        return None, "ts is not a string"
    try:
        datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None, f"ts {ts!r} is not an ISO-8601 time"
    if job is not None and not isinstance(job, str):
        return None, "job is neither a string nor null"
    if not isinstance(event, str) or not event:
        return None, "event is not a non-empty string"
    if not isinstance(data, dict):
        return None, "data is not an object"
    if not _is_hex64(obj["prev"]) or not _is_hex64(obj["hash"]):
        return None, "prev/hash are not 64 lowercase hex digits"
    record = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=data,
                         prev=obj["prev"], hash=obj["hash"])
    return record, None


def _expected_hash(record: AuditRecord) -> str:
    body = record.as_dict()
    del body["hash"]
    return _sha256(_canonical(body))


def _torn_message(path: Path) -> str:
    return (f"audit log {path} ends in a partial line (a write cut short by a crash, or "
            "tampering): nothing can be appended after it; run 'vmigrate audit verify' to see "
            "the damage and 'vmigrate audit repair' to remove a torn last line")


def _rfind_newline(fd: int, end: int) -> int:
    """Offset of the last newline before ``end`` in the open file, or -1 if there is none."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut
        pos = start
    return -1


def _read_tail(fd: int, path: Path) -> str | None:
    """The last line of the open file (without newline), or None if the file is empty.

    Raises StoreError if the file does not end with a newline (a torn tail).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise StoreError(_torn_message(path))
    start = _rfind_newline(fd, size - 1) + 1
    return os.pread(fd, size - 1 - start, start).decode("utf-8", errors="replace")


def _last_record(fd: int, path: Path) -> tuple[AuditRecord, str] | None:
    """The last record of the open file and its line, or None if the file is empty.

    Raises StoreError if the tail is torn or the last line is not a record: the chain
    cannot be extended from it.
    """
    tail = _read_tail(fd, path)
    if tail is None:
        return None
    last, why = _parse(tail)
    if last is None:
        raise StoreError(f"audit log {path}: last record unreadable: {why}; nothing can be "
                         "appended after it; run 'vmigrate audit verify' to see the damage "
                         "(only a torn last line can be removed, with 'vmigrate audit repair')")
    return last, tail


def _open_for_append(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open audit log {path}: {exc}") from exc


def _append_locked(fd: int, path: Path, event: str, body: dict[str, Any],
                   job: str | None) -> AuditRecord:
    """Chain one record to the file open in ``fd``, whose exclusive lock the caller holds."""
    last = _last_record(fd, path)
    if last is None:
        seq, prev = 1, GENESIS
    else:
        seq, prev = last[0].seq + 1, _sha256(last[1])
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    draft = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                        prev=prev, hash="")
    record = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                         prev=prev, hash=_expected_hash(draft))
    payload = (record.line() + "\n").encode()
    written = os.write(fd, payload)
    if written != len(payload):
        raise StoreError(f"audit log {path}: short write ({written} bytes)")
    os.fsync(fd)
    return record


def check_appendable(path: Path) -> None:
    """Raise :class:`StoreError` unless a record could be appended to the log now.

    Cheap: reads only the end of the file. Refuses a torn tail and a last line that
    is not a record (the message names the file and says to run ``vmigrate audit
    verify`` / ``vmigrate audit repair``), and a file this process cannot open for
    writing. An absent or empty file is appendable. Does not check the chain (that
    is :func:`verify`) and never modifies the file.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot open audit log {path} for appending: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # not in the middle of someone's append
        _last_record(fd, path)
    except OSError as exc:
        raise StoreError(f"cannot read audit log {path}: {exc}") from exc
    finally:
        os.close(fd)  # also releases the lock


class AuditLog:
    """Appends records to one audit log file, chained to the ones before.

    Safe with several processes appending to the same file at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, event: str, data: Mapping[str, Any], *,
               job: str | None = None) -> AuditRecord:
        """Append one record and return it once it is on disk (fsync'd).

        ``data`` must be JSON-serialisable with string keys; other objects (paths,
        enums) are stored as their ``str()``. Raises :class:`StoreError` if the
        file cannot be written or its last record is unreadable (nothing is
        appended then: the chain is never extended from a broken tail), and
        ``ValueError`` for NaN/infinite floats in ``data``. On any failure the
        file is as it was, except that a write interrupted by a crash may leave a
        partial last line, which :func:`verify` reports and :func:`repair` removes.
        """
        if not event:
            raise ValueError("audit event must be a non-empty string")
        # normalise data first: what is hashed must be what reads back
        body = json.loads(json.dumps(dict(data), default=str, allow_nan=False))
        fd = _open_for_append(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return _append_locked(fd, self.path, event, body, job)
        except OSError as exc:
            raise StoreError(f"cannot append to audit log {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # also releases the lock


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`."""

    ok: bool
    #: records read (all of them when ok; the good ones before first_bad otherwise)
    records: int
    #: 1-based line number of the first bad record
    first_bad: int | None = None
    reason: str | None = None
    #: the only damage is an incomplete last line after a valid chain (see :func:`repair`)
    torn: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad": self.first_bad,
                "reason": self.reason, "torn": self.torn}


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without newline, ended with a newline)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            ended = raw.endswith(b"\n")
            text = raw[:-1] if ended else raw
            yield number, text.decode("utf-8", errors="replace"), ended


def verify(path: Path) -> VerifyResult:
    """Check the whole chain: format, version, hashes, ``seq`` and ``prev`` links.

    An absent or empty file is a valid log of 0 records. A file whose only damage is
    an incomplete last line comes back with ``torn`` set (:func:`repair` mends it).
    Reading errors raise :class:`StoreError`; the file is never modified.
    """
    prev_line: str | None = None
    count = 0
    try:
        for number, text, ended in _lines(path):
            if not ended:
                return VerifyResult(False, count, number,
                                    "last line is incomplete (no newline): torn write or cut",
                                    torn=True)
            record, why = _parse(text)
            if record is None:
                return VerifyResult(False, count, number, why)
            if text != record.line():
                return VerifyResult(False, count, number, "line is not in canonical form")
            if record.hash != _expected_hash(record):
                return VerifyResult(False, count, number, "hash does not match the record "
                                    "(record altered)")
            if record.seq != number:
                return VerifyResult(False, count, number, f"seq {record.seq} on line {number} "
                                    "(record removed, inserted or moved)")
            expected_prev = GENESIS if prev_line is None else _sha256(prev_line)
            if record.prev != expected_prev:
                return VerifyResult(False, count, number, "prev does not match the previous "
                                    "line (chain broken)")
            prev_line = text
            count += 1
    except FileNotFoundError:
        return VerifyResult(True, 0)
    except OSError as exc:
        raise StoreError(f"cannot read audit log {path}: {exc}") from exc
    return VerifyResult(True, count)


#: the event of the record :func:`repair` appends
REPAIR_EVENT = "audit-repair"


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair` removed, and the record it appended to say so."""

    #: bytes cut off the end of the file (the incomplete last line)
    removed_bytes: int
    #: hex SHA-256 of those bytes (also in the repair record)
    removed_sha256: str
    #: complete records kept, before the repair record
    records_kept: int
    #: the ``audit-repair`` record, now the last one
    record: AuditRecord

    def as_dict(self) -> dict[str, Any]:
        return {"removed_bytes": self.removed_bytes, "removed_sha256": self.removed_sha256,
                "records_kept": self.records_kept, "record": self.record.as_dict()}


def repair(path: Path) -> RepairResult:
    """Remove a torn tail (an incomplete last line) and record the repair in the chain.

    Holds the exclusive lock :meth:`AuditLog.append` takes, checks the whole file
    under it, and only if its sole damage is an incomplete last line (what
    :func:`verify` reports as ``torn``): cuts the file just after its last newline,
    ``fsync`` s, then appends an ``audit-repair`` record through the normal chained
    append, with data ``removed_bytes``, ``removed_sha256`` (hex SHA-256 of the
    removed bytes) and ``records_kept``.

    Raises :class:`StoreError` and changes nothing when the log is intact (absent,
    empty or a valid chain: nothing to repair) or damaged in any other way (an
    altered, removed or inserted record is tampering and is never repaired). If the
    repair record cannot be written after the cut, :class:`StoreError` says so and
    names the removed bytes' SHA-256; the file then holds the intact records only.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        raise StoreError(f"audit log {path} does not exist: nothing to repair") from None
    except OSError as exc:
        raise StoreError(f"cannot open audit log {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = verify(path)
        if result.ok:
            raise StoreError(f"audit log {path} is intact ({result.records} records): "
                             "nothing to repair")
        if not result.torn:
            raise StoreError(f"audit log {path} line {result.first_bad}: {result.reason}: "
                             "this is not a torn last line but damage inside the log (possible "
                             "tampering), which is never repaired; keep the file as evidence")
        size = os.fstat(fd).st_size
        keep = _rfind_newline(fd, size) + 1
        removed = os.pread(fd, size - keep, keep)
        digest = hashlib.sha256(removed).hexdigest()
        os.ftruncate(fd, keep)
        os.fsync(fd)
        data = {"removed_bytes": len(removed), "removed_sha256": digest,
                "records_kept": result.records}
        try:
            record = _append_locked(fd, path, REPAIR_EVENT, data, None)
        except (OSError, StoreError) as exc:
            raise StoreError(f"audit log {path}: cut {len(removed)} bytes (sha256 {digest}) "
                             f"but could not record the repair: {exc}") from exc
        return RepairResult(removed_bytes=len(removed), removed_sha256=digest,
                            records_kept=result.records, record=record)
    except OSError as exc:
        raise StoreError(f"cannot repair audit log {path}: {exc}") from exc
    finally:
        os.close(fd)  # also releases the lock


def read(path: Path, *, job: str | None = None) -> list[AuditRecord]:
    """All records (only ``job`` 's if given), in order. An absent file has none.

    Checks each line's format and version, not the chain (that is :func:`verify`);
    raises :class:`StoreError` naming the first line that is not a record.
    """
    records: list[AuditRecord] = []
    try:
        for number, text, _ended in _lines(path):
            record, why = _parse(text)
            if record is None:
                raise StoreError(f"audit log {path}, line {number}: {why}")
            if job is None or record.job == job:
                records.append(record)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(f"cannot read audit log {path}: {exc}") from exc
    return records
