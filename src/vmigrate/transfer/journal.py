"""The receiver's journal: which chunks of a partial copy hold which content.

File ``<target>.vmxfer-journal``::

    b"VMXJRNL\\0" | version u8 | header_len u32 | header JSON
    records: kind u8 | index u64 | count u32 | hash 32 | crc32 u32

Kinds: ``CHUNK`` (chunk ``index`` now holds content ``hash``), ``ZEROS``
(``count`` chunks from ``index`` hold zeros), ``SYNC`` (the target and every
record before this one are on stable storage). Records are appended after
the chunk was written, without waiting; :meth:`Journal.commit` makes the
target and the journal durable and writes ``SYNC``.

On reopening, records before the last ``SYNC`` are trusted. Records after it
survived a process kill but maybe not a power loss, so the caller re-checks
those chunks against the target (:attr:`Journal.unsynced`) before trusting
them. A torn last record is cut off.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from vmigrate.errors import ConflictError, TransferError
from vmigrate.transfer.confine import Destination

MAGIC: Final = b"VMXJRNL\0"
VERSION: Final = 1
_HEAD = struct.Struct(">8sBI")
_REC = struct.Struct(">BQI32s")
_CRC = struct.Struct(">I")
RECORD_SIZE: Final = _REC.size + _CRC.size


class RecKind(IntEnum):
    CHUNK = 1
    ZEROS = 2
    SYNC = 3


@dataclass(frozen=True)
class Geometry:
    """What a journal belongs to; a journal for other geometry is discarded."""

    size: int
    chunk_size: int
    fmt: str

    def chunks(self) -> int:
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


class Journal:
    """Append-only record of committed chunks, opened by :meth:`open`."""

    def __init__(self, path: Path, geometry: Geometry, fd: int,
                 dest: Destination | None = None) -> None:
        self.path = path
        self._dest = dest
        self.geometry = geometry
        self._fd = fd
        #: chunk index -> content hash (ZERO_HASH-like values for zero chunks)
        self.chunks: dict[int, bytes] = {}
        #: chunk indexes whose records came after the last SYNC
        self.unsynced: set[int] = set()
        self._zero_hash: dict[int, bytes] = {}
        self._pending = bytearray()

    @classmethod
    def open(cls, path: Path, geometry: Geometry, zero_hash: dict[int, bytes], *,
             dest: Destination | None = None) -> tuple[Journal, bool]:
        """Open or create the journal; (journal, resumed). A journal that is for other
        geometry or unreadable is replaced by a fresh one (resumed is False).

        With ``dest`` the journal is its :attr:`Destination.journal_name`, opened
        relative to its directory; either way it is opened with ``O_NOFOLLOW`` and
        must be a regular file with one link (:class:`ConflictError` otherwise,
        the file left as it is). Raises :class:`TransferError` when it cannot be
        read or written."""
        fd = dest.open_file(dest.journal_name, create=True) if dest is not None \
            else _open_own(path)
        try:
            existing = _read_all(fd, _max_journal(geometry))
            parsed = _parse(existing, geometry) if existing else None
            if parsed is None:
                os.ftruncate(fd, 0)
                header = json.dumps({"size": geometry.size, "chunk_size": geometry.chunk_size,
                                     "format": geometry.fmt}).encode()
                os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, len(header)) + header, 0)
                os.lseek(fd, 0, os.SEEK_END)
                os.fsync(fd)
                j = cls(path, geometry, fd, dest)
                j._zero_hash = zero_hash
                return j, False
            end, records = parsed
            os.ftruncate(fd, end)
            os.lseek(fd, end, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise TransferError(f"cannot write journal {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        j = cls(path, geometry, fd, dest)
        j._zero_hash = zero_hash
        for kind, index, count, digest in records:
            if kind == RecKind.SYNC:
                j.unsynced.clear()
                continue
            for i in range(index, index + count):
                j.chunks[i] = digest if kind == RecKind.CHUNK else zero_hash[geometry.chunk_len(i)]
                j.unsynced.add(i)
        return j, True

    def zero_hash(self, index: int) -> bytes:
        return self._zero_hash[self.geometry.chunk_len(index)]

    def record(self, index: int, digest: bytes) -> None:
        self.chunks[index] = digest
        self._append(RecKind.CHUNK, index, 1, digest)

    def record_zeros(self, index: int, count: int) -> None:
        for i in range(index, index + count):
            self.chunks[i] = self.zero_hash(i)
        self._append(RecKind.ZEROS, index, count, bytes(32))

    def forget(self, indexes: set[int]) -> None:
        """Drop chunks (found wrong): they will be sent again."""
        for i in indexes:
            # a record whose id matches no content supersedes the old one
            self._append(RecKind.CHUNK, i, 1, b"\xff" * 32)
            self.chunks.pop(i, None)
            self.unsynced.discard(i)

    def _append(self, kind: RecKind, index: int, count: int, digest: bytes) -> None:
        rec = _REC.pack(kind, index, count, digest)
        self._pending += rec + _CRC.pack(zlib.crc32(rec))
        if len(self._pending) >= 64 * RECORD_SIZE:
            self.flush()

    def flush(self) -> None:
        """Hand pending records to the OS (survives a kill, not a power loss)."""
        if self._pending:
            os.write(self._fd, bytes(self._pending))
            self._pending.clear()

    def sync(self) -> None:
        """Call after the target is durable: every record so far becomes trusted."""
        self._append(RecKind.SYNC, 0, 0, bytes(32))
        self.flush()
        os.fsync(self._fd)
        self.unsynced.clear()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        self.close()
        if self._dest is not None:
            self._dest.unlink(self._dest.journal_name)
        else:
            self.path.unlink(missing_ok=True)

    def state(self) -> dict[int, bytes]:
        return dict(self.chunks)


def _open_own(path: Path) -> int:
    """``path`` opened read-write (created 0600) without following a link; it must be a
    regular file with one link."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConflictError(f"journal {path} is a symbolic link: refused") from exc
        raise TransferError(f"cannot open journal {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ConflictError(f"journal {path} is not a regular file of its own: refused")
    os.set_blocking(fd, True)
    return fd


def _max_journal(g: Geometry) -> int:
    """The most a journal of ``g`` can sensibly hold (records of a few resumes)."""
    return _HEAD.size + 4096 + RECORD_SIZE * (4 * g.chunks() + 100_000)


def _read_all(fd: int, limit: int) -> bytes:
    """The file's bytes; empty when it is larger than ``limit`` (not trusted at all)."""
    size = os.fstat(fd).st_size
    if size > limit:
        return b""
    out = bytearray()
    while len(out) < size:
        part = os.pread(fd, size - len(out), len(out))
        if not part:
            break
        out += part
    return bytes(out)


def _parse(data: bytes, geometry: Geometry
           ) -> tuple[int, list[tuple[int, int, int, bytes]]] | None:
    """(end of the valid part, records) or None when the journal is not usable.

    Never raises: any bytes give an answer (a torn or corrupt tail is cut off)."""
    if len(data) < _HEAD.size:
        return None
    magic, version, hlen = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or _HEAD.size + hlen > len(data):
        return None
    try:
        header: Any = json.loads(data[_HEAD.size:_HEAD.size + hlen])
    except (ValueError, RecursionError):
        return None
    if header != {"size": geometry.size, "chunk_size": geometry.chunk_size,
                  "format": geometry.fmt}:
        return None
    pos = _HEAD.size + hlen
    records = []
    total = geometry.chunks()
    while pos + RECORD_SIZE <= len(data):
        rec = data[pos:pos + _REC.size]
        (crc,) = _CRC.unpack_from(data, pos + _REC.size)
        if zlib.crc32(rec) != crc:
            break
        kind, index, count, digest = _REC.unpack(rec)
        if kind == RecKind.CHUNK:
            ok = count == 1 and index < total
        elif kind == RecKind.ZEROS:
            ok = count >= 1 and index + count <= total
        else:
            ok = kind == RecKind.SYNC and index == 0 and count == 0
        if not ok:
            break
        records.append((kind, index, count, digest))
        pos += RECORD_SIZE
    return pos, records
