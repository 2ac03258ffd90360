"""Witnesses: what a host that took part in a job keeps about the audit log.

After a job ends, the controller gives each host of the job (source and destination) a
small file, ``<data_dir>/audit-witness/<job>.json``: one canonical JSON line with

``kind``     ``vmigrate-audit-witness``; ``v`` 1
``job``      the job id
``host``     the host that keeps it
``seq``      the job's head: the seq of its last record (its ``end``)
``hash``     the head's line hash (SHA-256 of the record's line)
``key``      the fingerprint of the key that signed the log
``ts``       when it was written
``records``  ``[[seq, line hash], ...]``: every record of the job the host was shown
             (the head included), in order

A later run of the same job (``job recover``, ``job resolve``) replaces the file with
the latest head and the union of the records. ``vmigrate audit verify`` reads the
witnesses back and checks the log against them (:meth:`Witness.claims`): a log
rewritten and re-signed by someone holding the controller's key, or cut at the end,
no longer matches what the hosts hold, and the first record that disagrees is named
with the host and the file that hold it.

This module is the format only (pure); the host I/O is in
:mod:`vmigrate.service.witness`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from vmigrate.audit.keys import is_fingerprint
from vmigrate.audit.log import MAX_SEQ, Claim
from vmigrate.errors import StoreError

KIND = "vmigrate-audit-witness"
WITNESS_VERSION = 1
#: the directory under a host's data_dir
WITNESS_DIR = "audit-witness"
_FIELDS = ("hash", "host", "job", "key", "kind", "records", "seq", "ts", "v")
#: job ids that make a safe file name
_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: at most this many records in one witness (a job appends far fewer)
MAX_RECORDS = 100_000


def witness_dir(data_dir: str) -> str:
    return f"{data_dir.rstrip('/') or ''}/{WITNESS_DIR}"


def witness_path(data_dir: str, job: str) -> str:
    """Where a host keeps its witness of ``job``; :class:`StoreError` for a job id that
    is not a plain file name."""
    if not _JOB_RE.fullmatch(job):
        raise StoreError(f"job id {job[:80]!r} cannot name a witness file")
    return f"{witness_dir(data_dir)}/{job}.json"


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < MAX_SEQ


@dataclass(frozen=True)
class Witness:
    """One host's witness of one job (see the module doc)."""

    job: str
    host: str
    seq: int
    hash: str
    key: str
    ts: str
    records: tuple[tuple[int, str], ...]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "v": WITNESS_VERSION, "job": self.job, "host": self.host,
                "seq": self.seq, "hash": self.hash, "key": self.key, "ts": self.ts,
                "records": [[s, h] for s, h in self.records]}

    def to_bytes(self) -> bytes:
        """The file's content: one canonical JSON line."""
        return (json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
                + "\n").encode()

    def claims(self, where: str) -> list[Claim]:
        """What this witness vouches for, as claims :func:`~vmigrate.audit.verify`
        checks: the head, and each record it was shown."""
        out = [Claim(seq=self.seq, hash=self.hash, where=where, job=self.job, head=True,
                     host=self.host)]
        out += [Claim(seq=s, hash=h, where=where, job=self.job, head=False, host=self.host)
                for s, h in self.records if (s, h) != (self.seq, self.hash)]
        return out

    def merged(self, older: Witness | None) -> Witness:
        """This witness with the records of an older one of the same job kept too (a
        record seen twice keeps its newer hash)."""
        if older is None or older.job != self.job:
            return self
        seen = dict(older.records)
        seen.update(self.records)
        records = tuple(sorted(seen.items()))[-MAX_RECORDS:]
        return Witness(job=self.job, host=self.host, seq=self.seq, hash=self.hash,
                       key=self.key, ts=self.ts, records=records)

    @classmethod
    def parse(cls, data: bytes | str, *, where: str = "witness") -> Witness:
        """A witness from a file's content; :class:`StoreError` naming ``where`` if it
        is not one."""
        def bad(why: str) -> StoreError:
            return StoreError(f"{where} is not an audit witness: {why}")

        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else data
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise bad("not JSON") from exc
        if not isinstance(obj, dict):
            raise bad("not a JSON object")
        if obj.get("kind") != KIND:
            raise bad("no witness kind")
        version = obj.get("v")
        if isinstance(version, bool) or version != WITNESS_VERSION:
            raise bad(f"unknown version {str(version)[:20]!r}")
        if tuple(sorted(obj)) != _FIELDS:
            raise bad("wrong fields")
        job, host, ts = obj["job"], obj["host"], obj["ts"]
        if not isinstance(job, str) or not _JOB_RE.fullmatch(job):
            raise bad("job is not a job id")
        if not isinstance(host, str) or not isinstance(ts, str):
            raise bad("host/ts are not strings")
        if not _is_seq(obj["seq"]) or not _is_hash(obj["hash"]):
            raise bad("seq/hash are not a record number and a SHA-256")
        if not is_fingerprint(obj["key"]):
            raise bad("key is not a key fingerprint")
        raw = obj["records"]
        if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
            raise bad("records is not a list of [seq, hash]")
        records: list[tuple[int, str]] = []
        for item in raw:
            if (not isinstance(item, list) or len(item) != 2 or not _is_seq(item[0])
                    or not _is_hash(item[1])):
                raise bad("records is not a list of [seq, hash]")
            records.append((item[0], item[1]))
        return cls(job=job, host=host, seq=obj["seq"], hash=obj["hash"], key=obj["key"],
                   ts=ts, records=tuple(records))
