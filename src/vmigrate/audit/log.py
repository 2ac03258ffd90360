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


def _read_tail(fd: int) -> str | None:
    """The last line of the open file (without newline), or None if the file is empty.

    Raises StoreError if the file does not end with a newline (a torn write).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise StoreError("audit log ends in a partial line (torn write or tampering); "
                         "run 'vmigrate audit verify' and repair it before appending")
    pos = size - 1  # the final newline; search what is before it
    buf = b""
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        cut = buf.rfind(b"\n")
        if cut >= 0:
            return buf[cut + 1:].decode("utf-8", errors="replace")
    return buf.decode("utf-8", errors="replace")


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
        partial last line, which :func:`verify` reports.
        """
        if not event:
            raise ValueError("audit event must be a non-empty string")
        # normalise data first: what is hashed must be what reads back
        body = json.loads(json.dumps(dict(data), default=str, allow_nan=False))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open audit log {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            tail = _read_tail(fd)
            if tail is None:
                seq, prev = 1, GENESIS
            else:
                last, why = _parse(tail)
                if last is None:
                    raise StoreError(f"audit log {self.path}: last record unreadable: {why}")
                seq, prev = last.seq + 1, _sha256(tail)
            ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            draft = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                                prev=prev, hash="")
            record = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                                 prev=prev, hash=_expected_hash(draft))
            payload = (record.line() + "\n").encode()
            written = os.write(fd, payload)
            if written != len(payload):
                raise StoreError(f"audit log {self.path}: short write ({written} bytes)")
            os.fsync(fd)
            return record
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

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad": self.first_bad,
                "reason": self.reason}


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without newline, ended with a newline)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            ended = raw.endswith(b"\n")
            text = raw[:-1] if ended else raw
            yield number, text.decode("utf-8", errors="replace"), ended


def verify(path: Path) -> VerifyResult:
    """Check the whole chain: format, version, hashes, ``seq`` and ``prev`` links.

    An absent or empty file is a valid log of 0 records. Reading errors raise
    :class:`StoreError`; the file is never modified.
    """
    prev_line: str | None = None
    count = 0
    try:
        for number, text, ended in _lines(path):
            if not ended:
                return VerifyResult(False, count, number,
                                    "last line is incomplete (no newline): torn write or cut")
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
