"""The hash-chained, signed, append-only audit log (``$VMIGRATE_HOME/audit.jsonl``).

One JSON object per line, written in canonical form (keys sorted, no spaces,
UTF-8), fields in this order of meaning:

``v``      format version: 2 (signed); 1 (unsigned, written before signing) is still read
``seq``    1 for the first record, then +1 per line
``ts``     ISO-8601 UTC time of the append, e.g. ``2025-01-31T12:00:00.123456Z``
``job``    migration job id, or null
``event``  what happened: ``phase``, ``decision`` ...
``data``   an object with the details
``prev``   hex SHA-256 of the previous record's line (without its newline);
           64 zeros for the first record
``key``    (v2) fingerprint of the controller key that signed it (see :mod:`.keys`)
``hash``   hex SHA-256 of the canonical JSON of this record without ``hash`` and ``sig``
``sig``    (v2) base64 Ed25519 signature of the canonical JSON of this record without
           ``sig`` (so it covers ``hash`` and everything else)

A record's **line hash** (SHA-256 of its line) is what the next record's ``prev`` holds;
the line hash of a job's ``end`` record is the job's **head**, kept in the job's row and
report and by the hosts that took part (witnesses, see :mod:`.witness`).

Tampering shows in :func:`verify`: an edited record fails its ``hash`` or its signature;
a removed, inserted or moved record breaks ``seq`` or ``prev``; a record signed by any
key but the controller's is named; an unsigned (v1) record after a signed one is a
downgrade and refused. Someone holding the controller's private key can still rewrite
and re-sign the whole chain, and removing records at the *end* leaves a valid prefix:
both show only against a head kept elsewhere, which :func:`verify` takes as ``claims``
(the job rows' heads, the hosts' witnesses) and names the first record that disagrees.

Several processes may append at once: :meth:`AuditLog.append` holds an
exclusive ``flock`` on the file while it reads the last line and writes its
own, then ``fsync`` s.

A crash in the middle of an append can leave a *torn tail*: a partial last line
without its newline (a record whose ``append`` never returned, so it was never
acknowledged). Nothing is appended after a torn tail (the chain is never extended
from a broken record); :func:`verify` reports it with ``torn`` set, and
:func:`check_appendable` lets a caller find out before it starts work that needs
the log. :func:`repair` mends exactly that case and nothing else: under the same
lock, it cuts the file after its last newline and appends a signed ``audit-repair``
record (how many bytes were removed and their SHA-256), so the repair itself is
evidence in the chain. Damage anywhere else (an edited, removed or inserted
record) is tampering and is never repaired.

Reading errors (permissions, I/O) raise :class:`~vmigrate.errors.AuditUnreadableError`:
a log that cannot be read is not evidence of tampering, and says so by its own class.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmigrate.audit.keys import (
    PublicKey,
    SigningKey,
    decode_signature,
    is_fingerprint,
    load_public_key,
    load_signing_key,
)
from vmigrate.errors import AuditUnreadableError, StoreError

#: the version this code writes
VERSION = 2
#: the versions it reads (1: unsigned, before signing)
VERSIONS = (1, 2)
GENESIS = "0" * 64
#: records are numbered below this (what a SQLite integer holds)
MAX_SEQ = 2**63
_FIELDS_V1 = ("data", "event", "hash", "job", "prev", "seq", "ts", "v")
_FIELDS = {1: _FIELDS_V1, 2: tuple(sorted((*_FIELDS_V1, "key", "sig")))}
_TAIL_CHUNK = 8192


def _canonical(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit log (``key`` and ``sig`` are None in a v1 record)."""

    v: int
    seq: int
    ts: str
    job: str | None
    event: str
    data: dict[str, Any]
    prev: str
    hash: str
    key: str | None = None
    sig: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"v": self.v, "seq": self.seq, "ts": self.ts, "job": self.job,
               "event": self.event, "data": self.data, "prev": self.prev, "hash": self.hash}
        if self.v >= 2:
            out.update(key=self.key, sig=self.sig)
        return out

    def line(self) -> str:
        """The record as written (canonical JSON, no newline)."""
        return _canonical(self.as_dict())

    @property
    def line_hash(self) -> str:
        """Hex SHA-256 of :meth:`line`: the next record's ``prev``, and a head."""
        return _sha256(self.line())

    @property
    def signed(self) -> bool:
        return self.v >= 2

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.ts.replace("Z", "+00:00"))

    def signed_text(self) -> str:
        """What ``sig`` signs: the canonical JSON of the record without ``sig``."""
        body = self.as_dict()
        body.pop("sig", None)
        return _canonical(body)


def _is_hex64(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def _parse(line: str) -> tuple[AuditRecord | None, str | None]:
    """A record from one line, or the reason the line is not one (format only: not its
    hash, signature or place in the chain). Never raises."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not valid JSON (truncated or edited)"
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    version = obj.get("v")
    if isinstance(version, bool) or version not in VERSIONS:
        return None, (f"unknown format version {str(version)[:20]!r} (this vmigrate reads "
                      f"{', '.join(map(str, VERSIONS))})")
    assert isinstance(version, int)
    if tuple(sorted(obj)) != _FIELDS[version]:
        return None, f"fields {sorted(obj)[:12]} are not those of format v{version}"
    seq, ts, job, event, data = obj["seq"], obj["ts"], obj["job"], obj["event"], obj["data"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq < MAX_SEQ:
        return None, "seq is not a positive 63-bit integer"
    if not isinstance(ts, str):
        return None, "ts is not a string"
    try:
        datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None, f"ts {ts[:40]!r} is not an ISO-8601 time"
    if job is not None and not isinstance(job, str):
        return None, "job is neither a string nor null"
    if not isinstance(event, str) or not event:
        return None, "event is not a non-empty string"
    if not isinstance(data, dict):
        return None, "data is not an object"
    if not _is_hex64(obj["prev"]) or not _is_hex64(obj["hash"]):
        return None, "prev/hash are not 64 lowercase hex digits"
    key = sig = None
    if version >= 2:
        key, sig = obj["key"], obj["sig"]
        if not is_fingerprint(key):
            return None, "key is not a key fingerprint (SHA256:...)"
        if decode_signature(sig) is None:
            return None, "sig is not a base64 Ed25519 signature"
    record = AuditRecord(v=version, seq=seq, ts=ts, job=job, event=event, data=data,
                         prev=obj["prev"], hash=obj["hash"], key=key, sig=sig)
    try:
        record.line().encode()
    except ValueError:  # a lone surrogate, an infinite float: no canonical form
        return None, "has no canonical form (invalid string or number)"
    return record, None


def _expected_hash(record: AuditRecord) -> str:
    body = record.as_dict()
    del body["hash"]
    body.pop("sig", None)
    return _sha256(_canonical(body))


def _signature_ok(record: AuditRecord, key: PublicKey) -> bool:
    sig = decode_signature(record.sig)
    return sig is not None and key.verifies(sig, record.signed_text().encode())


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
                   job: str | None, key: SigningKey) -> AuditRecord:
    """Chain one signed record to the file open in ``fd``, whose exclusive lock the
    caller holds."""
    last = _last_record(fd, path)
    if last is None:
        seq, prev = 1, GENESIS
    else:
        seq, prev = last[0].seq + 1, _sha256(last[1])
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    draft = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                        prev=prev, hash="", key=key.fingerprint)
    hashed = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                         prev=prev, hash=_expected_hash(draft), key=key.fingerprint)
    record = AuditRecord(v=VERSION, seq=seq, ts=ts, job=job, event=event, data=body,
                         prev=prev, hash=hashed.hash, key=key.fingerprint,
                         sig=key.sign(hashed.signed_text().encode()))
    payload = (record.line() + "\n").encode()
    written = os.write(fd, payload)
    if written != len(payload):
        raise StoreError(f"audit log {path}: short write ({written} bytes)")
    os.fsync(fd)
    return record


def check_appendable(path: Path, *, key_dir: Path | None = None) -> None:
    """Raise :class:`StoreError` unless a record could be appended to the log now.

    Cheap: reads only the end of the file. Refuses a torn tail and a last line that
    is not a record (the message names the file and says to run ``vmigrate audit
    verify`` / ``vmigrate audit repair``), a file this process cannot open for
    writing, and a signing key that cannot be read (:class:`AuditUnreadableError`).
    Creates the controller's signing key in ``key_dir`` (default: the log's directory)
    at first use. An absent or empty file is appendable. Does not check the chain
    (that is :func:`verify`) and never modifies the file.
    """
    load_signing_key(key_dir if key_dir is not None else path.parent)
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
    """Appends signed records to one audit log file, chained to the ones before.

    Safe with several processes appending to the same file at once. The signing key
    lives in ``key_dir`` (default: the log's directory) and is created at the first
    append. The records this object appended are remembered per job
    (:meth:`job_records`), for the job's witnesses.
    """

    def __init__(self, path: Path, *, key_dir: Path | None = None) -> None:
        self.path = path
        self.key_dir = key_dir if key_dir is not None else path.parent
        self._key: SigningKey | None = None
        self._jobs: dict[str, list[tuple[int, str]]] = {}

    def signing_key(self) -> SigningKey:
        """The controller's key (loaded once, created at first use)."""
        if self._key is None:
            self._key = load_signing_key(self.key_dir)
        return self._key

    def append(self, event: str, data: Mapping[str, Any], *,
               job: str | None = None) -> AuditRecord:
        """Append one signed record and return it once it is on disk (fsync'd).

        ``data`` must be JSON-serialisable with string keys; other objects (paths,
        enums) are stored as their ``str()``. Raises :class:`StoreError` if the
        file cannot be written, its last record is unreadable (nothing is
        appended then: the chain is never extended from a broken tail) or the key
        cannot be loaded or created, and ``ValueError`` for NaN/infinite floats or
        strings that are not text in ``data`` (nothing is written). On any failure
        the file is as it was, except that a write interrupted by a crash may leave
        a partial last line, which :func:`verify` reports and :func:`repair` removes.
        """
        if not event:
            raise ValueError("audit event must be a non-empty string")
        # normalise data first: what is hashed must be what reads back
        body = json.loads(json.dumps(dict(data), default=str, allow_nan=False))
        _canonical({"e": event, "j": job, "d": body}).encode()  # ValueError: not text
        key = self.signing_key()
        fd = _open_for_append(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            record = _append_locked(fd, self.path, event, body, job, key)
        except OSError as exc:
            raise StoreError(f"cannot append to audit log {self.path}: {exc}") from exc
        finally:
            os.close(fd)  # also releases the lock
        if job is not None:
            self._jobs.setdefault(job, []).append((record.seq, record.line_hash))
        return record

    def job_records(self, job: str) -> list[tuple[int, str]]:
        """(seq, line hash) of every record of ``job`` this object appended, in order."""
        return list(self._jobs.get(job, ()))


@dataclass(frozen=True)
class Claim:
    """What someone else holds about the log: record ``seq``'s line hashes to ``hash``.

    Claims come from the job rows of the store (each job's head) and from the hosts'
    witnesses (a job's head and the records they were shown); ``where`` says where the
    claim is kept, for the message that names a disagreement.
    """

    seq: int
    hash: str
    where: str
    job: str | None = None
    #: this claim is a job's head (its ``end`` record) rather than one of its records
    head: bool = True
    #: the host that keeps it (a witness), None for the controller's own store; of two
    #: claims naming the same record, a host's is reported
    host: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`."""

    ok: bool
    #: records read (all of them when ok; the good ones before first_bad otherwise)
    records: int
    #: 1-based line number (= seq) of the first bad record
    first_bad: int | None = None
    reason: str | None = None
    #: the only damage is an incomplete last line after a valid chain (see :func:`repair`)
    torn: bool = False
    #: the fingerprint of the controller key the signatures were checked against
    key: str | None = None
    #: good records signed with it, and unsigned ones (format v1, before signing)
    signed: int = 0
    unsigned: int = 0
    #: claims (job heads, witnesses) checked, and where the one that disagrees is kept
    claims_checked: int = 0
    witness: str | None = None
    #: the first claim that disagrees: the record it vouches for differs or is missing
    disagrees: Claim | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad": self.first_bad,
                "reason": self.reason, "torn": self.torn, "key": self.key,
                "signed": self.signed, "unsigned": self.unsigned,
                "claims_checked": self.claims_checked, "witness": self.witness}


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without newline, ended with a newline)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            ended = raw.endswith(b"\n")
            text = raw[:-1] if ended else raw
            yield number, text.decode("utf-8", errors="replace"), ended


@dataclass
class _Walk:
    """How far the chain walk got."""

    count: int = 0
    signed: int = 0
    unsigned: int = 0
    first_bad: int | None = None
    reason: str | None = None
    torn: bool = False
    #: line hashes of the records some claim names
    hashes: dict[int, str] = field(default_factory=dict)


def _check_record(number: int, text: str, record: AuditRecord, prev_line: str | None,
                  walk: _Walk, key: PublicKey | None) -> str | None:
    """Why the parsed record on line ``number`` is bad, or None."""
    if text != record.line():
        return "line is not in canonical form"
    if record.hash != _expected_hash(record):
        return "hash does not match the record (record altered)"
    if record.seq != number:
        return f"seq {record.seq} on line {number} (record removed, inserted or moved)"
    expected_prev = GENESIS if prev_line is None else _sha256(prev_line)
    if record.prev != expected_prev:
        return "prev does not match the previous line (chain broken)"
    if not record.signed:
        if walk.signed:
            return ("unsigned (format v1) record after signed ones: records were replaced "
                    "by unsigned copies")
        return None
    if key is None:
        return (f"signed by key {record.key}, but the controller has no audit key to check "
                "it against (its key files were removed, or this is another controller's "
                "log: give its public key with --key)")
    if record.key != key.fingerprint:
        return (f"signed by another key ({record.key}; the controller's key is "
                f"{key.fingerprint})")
    if not _signature_ok(record, key):
        return "signature does not verify (record altered or forged)"
    return None


def _walk(path: Path, key: PublicKey | None, wanted: set[int]) -> _Walk:
    walk = _Walk()
    prev_line: str | None = None
    try:
        for number, text, ended in _lines(path):
            if not ended:
                walk.first_bad, walk.torn = number, True
                walk.reason = "last line is incomplete (no newline): torn write or cut"
                return walk
            record, why = _parse(text)
            if record is not None:
                why = _check_record(number, text, record, prev_line, walk, key)
            if record is None or why is not None:
                walk.first_bad, walk.reason = number, why
                return walk
            if number in wanted:
                walk.hashes[number] = _sha256(text)
            prev_line = text
            walk.count += 1
            if record.signed:
                walk.signed += 1
            else:
                walk.unsigned += 1
    except FileNotFoundError:
        return walk
    except OSError as exc:
        raise AuditUnreadableError(f"cannot read audit log {path}: {exc}") from exc
    return walk


def _disagreement(claims: Sequence[Claim], walk: _Walk) -> tuple[Claim, str] | None:
    """The claim naming the lowest record that disagrees with the log, and why."""
    found: list[tuple[int, Claim, str]] = []
    for claim in claims:
        if claim.seq <= walk.count:
            if walk.hashes.get(claim.seq) != claim.hash:
                what = "the head of job " if claim.head else "a record of job "
                found.append((claim.seq, claim, (
                    f"record {claim.seq} differs from what {claim.where} holds "
                    f"({what}{claim.job or '?'}): the log was rewritten at or before it")))
        elif walk.first_bad is None or walk.torn:
            found.append((walk.count + 1, claim, (
                f"record {walk.count + 1} is missing: the log ends after record "
                f"{walk.count}, but {claim.where} holds record {claim.seq} (job "
                f"{claim.job or '?'}): records were removed from the end")))
    if not found:
        return None
    _seq, claim, why = min(found, key=lambda f: (f[0], f[1].host is None, f[1].where))
    return claim, why


def verify(path: Path, *, key: PublicKey | None = None, key_dir: Path | None = None,
           claims: Sequence[Claim] = ()) -> VerifyResult:
    """Check the whole chain: format, version, hashes, ``seq`` and ``prev`` links,
    signatures, and the ``claims`` others hold about it.

    Signatures are checked against ``key``, else the controller's public key in
    ``key_dir`` (default: the log's directory); with neither, the first signed record
    fails. An absent or empty file is a valid log of 0 records (unless a claim names a
    record). A file whose only damage is an incomplete last line comes back with
    ``torn`` set (:func:`repair` mends it). The first bad record is the lower of the
    first one that breaks the chain and the first one a claim disagrees with (a
    different line hash, or missing: the log was cut).

    Reading errors (the log's or the key's) raise :class:`AuditUnreadableError`; the
    file is never modified.
    """
    if key is None:
        key = load_public_key(key_dir if key_dir is not None else path.parent)
    fingerprint = key.fingerprint if key is not None else None
    walk = _walk(path, key, {c.seq for c in claims})
    bad = _disagreement(claims, walk)
    if bad is not None:
        claim, why = bad
        seq = min(claim.seq, walk.count + 1)
        if walk.first_bad is None or seq <= walk.first_bad:
            return VerifyResult(False, min(walk.count, seq - 1), seq, why, key=fingerprint,
                                signed=walk.signed, unsigned=walk.unsigned,
                                claims_checked=len(claims), witness=claim.where,
                                disagrees=claim)
    if walk.first_bad is not None:
        return VerifyResult(False, walk.count, walk.first_bad, walk.reason, torn=walk.torn,
                            key=fingerprint, signed=walk.signed, unsigned=walk.unsigned,
                            claims_checked=len(claims))
    return VerifyResult(True, walk.count, key=fingerprint, signed=walk.signed,
                        unsigned=walk.unsigned, claims_checked=len(claims))


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


def repair(path: Path, *, key_dir: Path | None = None,
           claims: Sequence[Claim] = ()) -> RepairResult:
    """Remove a torn tail (an incomplete last line) and record the repair in the chain.

    Holds the exclusive lock :meth:`AuditLog.append` takes, checks the whole file
    under it (signatures and ``claims`` included), and only if its sole damage is an
    incomplete last line (what :func:`verify` reports as ``torn``): cuts the file just
    after its last newline, ``fsync`` s, then appends an ``audit-repair`` record signed
    by the controller's key (in ``key_dir``, default the log's directory) through the
    normal chained append, with data ``removed_bytes``, ``removed_sha256`` (hex SHA-256
    of the removed bytes) and ``records_kept``.

    Raises :class:`StoreError` and changes nothing when the log is intact (absent,
    empty or a valid chain: nothing to repair) or damaged in any other way (an
    altered, removed or inserted record, a bad signature, a claim that disagrees is
    tampering and is never repaired). If the repair record cannot be written after the
    cut, :class:`StoreError` says so and names the removed bytes' SHA-256; the file
    then holds the intact records only.
    """
    key_dir = key_dir if key_dir is not None else path.parent
    key = load_signing_key(key_dir)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        raise StoreError(f"audit log {path} does not exist: nothing to repair") from None
    except OSError as exc:
        raise AuditUnreadableError(f"cannot open audit log {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = verify(path, key=key.public, claims=claims)
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
            record = _append_locked(fd, path, REPAIR_EVENT, data, None, key)
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

    Checks each line's format and version, not the chain nor the signatures (that is
    :func:`verify`); raises :class:`StoreError` naming the first line that is not a
    record, :class:`AuditUnreadableError` when the file cannot be read.
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
        raise AuditUnreadableError(f"cannot read audit log {path}: {exc}") from exc
    return records


def parse_line(line: str) -> AuditRecord:
    """One record from its line (format only); :class:`StoreError` if it is not one."""
    record, why = _parse(line)
    if record is None:
        raise StoreError(f"not an audit record: {why}")
    return record


__all__ = ["GENESIS", "REPAIR_EVENT", "VERSION", "VERSIONS", "AuditLog", "AuditRecord",
           "Claim", "RepairResult", "VerifyResult", "check_appendable", "parse_line", "read",
           "repair", "verify"]
