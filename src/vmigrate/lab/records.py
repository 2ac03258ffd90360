"""Host-side reading of the records the guest's ``diskwrite`` workload writes.

The layout is defined at the top of ``guest/diskwrite.c``; this module follows
it exactly.  Record ``seq`` (1, 2, 3 ...) of size ``S`` sits at byte offset
``(seq - 1) * S``:

====== ====== ==========================================================
offset size   field
====== ====== ==========================================================
0      8      magic ``b"VMGDWR01"``
8      4      u32 record size ``S``
12     4      u32 reserved, 0
16     8      u64 seq
24     8      u64 run id (the same for every record of one run)
32     S-36   payload: u64 words ``splitmix64(seq) ^ (k * GOLDEN)``
S-4    4      u32 CRC-32 (``zlib.crc32``) of bytes ``[0, S-4)``
====== ====== ==========================================================

All integers are little-endian.  A record the guest acknowledged was written
and synced; records are written one at a time in order, so every record
``1..ack`` must be present and valid afterwards.  :func:`last_acks` reads the
acknowledgements from the guest's console, one figure per device.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

from vmigrate.errors import SpecError

MAGIC = b"VMGDWR01"
HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = 32
TRAILER_SIZE = 4
MIN_RECORD_SIZE = 512
MAX_RECORD_SIZE = 1024 * 1024
GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1

_pattern_cache: dict[int, int] = {}

#: ``DISKWRITE start dev=D ...``, ``DISKWRITE ack=N dev=D``, ``DISKWRITE full ack=N dev=D``
_CONSOLE_LINE = re.compile(
    r"DISKWRITE (?:start (?P<start>dev=)|(?:full )?ack=(?P<ack>[0-9]+) dev=)(?P<dev>\S+)"
)


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser, modulo 2**64 (the same as in the guest programs)."""
    x = (x + GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _pattern(words: int) -> int:
    """The words ``k * GOLDEN`` for k < words, packed little-endian into one integer."""
    cached = _pattern_cache.get(words)
    if cached is None:
        raw = b"".join(((k * GOLDEN) & _MASK).to_bytes(8, "little") for k in range(words))
        cached = int.from_bytes(raw, "little")
        _pattern_cache[words] = cached
    return cached


def _payload(seq: int, length: int) -> bytes:
    words = (length + 7) // 8
    seed = splitmix64(seq).to_bytes(8, "little") * words
    mixed = int.from_bytes(seed, "little") ^ _pattern(words)
    return mixed.to_bytes(words * 8, "little")[:length]


def encode_diskwrite_record(seq: int, size: int = 4096, run_id: int = 1) -> bytes:
    """Return record ``seq`` exactly as the guest's ``diskwrite`` writes it.

    Raises :class:`SpecError` when ``size`` is not a multiple of 512 between
    512 and 1 MiB, or ``seq`` is not positive.
    """
    if size % 512 or not MIN_RECORD_SIZE <= size <= MAX_RECORD_SIZE:
        raise SpecError(f"record size {size} is not a multiple of 512 between 512 and 1M")
    if seq < 1:
        raise SpecError(f"record seq {seq} must be 1 or more")
    head = HEADER.pack(MAGIC, size, 0, seq, run_id & _MASK)
    body = head + _payload(seq, size - HEADER_SIZE - TRAILER_SIZE)
    return body + struct.pack("<I", zlib.crc32(body))


def _record_ok(raw: bytes, seq: int, size: int, run_id: int) -> bool:
    if len(raw) != size:
        return False
    magic, rsize, _reserved, rseq, rrun = HEADER.unpack_from(raw)
    if magic != MAGIC or rsize != size or rseq != seq or rrun != run_id:
        return False
    (crc,) = struct.unpack_from("<I", raw, size - TRAILER_SIZE)
    if zlib.crc32(raw[: size - TRAILER_SIZE]) != crc:
        return False
    return raw[HEADER_SIZE : size - TRAILER_SIZE] == _payload(
        seq, size - HEADER_SIZE - TRAILER_SIZE
    )


def verify_diskwrite_records(path: Path) -> int:
    """Return the highest ``n`` such that records 1..n in ``path`` are all valid.

    ``path`` is a raw disk image (or block device) the guest's ``diskwrite``
    wrote to.  Record 1 fixes the record size and run id; every later record
    must carry the same ones, its own seq, a matching CRC and the payload
    derived from its seq.  Returns 0 when record 1 is missing or invalid.
    Compare the result with the last ``DISKWRITE ack=`` the guest printed for
    this disk (:func:`last_acks`): it must be at least that.  Raises
    ``OSError`` when ``path`` cannot be read.
    """
    with path.open("rb") as f:
        first = f.read(HEADER_SIZE)
        if len(first) < HEADER_SIZE:
            return 0
        magic, size, _reserved, seq, run_id = HEADER.unpack(first)
        if (
            magic != MAGIC
            or seq != 1
            or size % 512
            or not MIN_RECORD_SIZE <= size <= MAX_RECORD_SIZE
        ):
            return 0
        f.seek(0)
        good = 0
        while True:
            raw = f.read(size)
            if not _record_ok(raw, good + 1, size, run_id):
                return good
            good += 1


def last_acks(console_text: str) -> dict[str, int]:
    """Device -> the highest record seq the guest's ``diskwrite`` acknowledged on it.

    ``console_text`` is what the guest printed (any part of it).  Reads the
    ``DISKWRITE ack=N dev=D`` and ``DISKWRITE full ack=N dev=D`` lines; a
    ``DISKWRITE start dev=D`` line puts ``D`` in the result with 0 until an ack
    comes.  A writer that started again (a new run) never lowers a device's
    figure: what an earlier run acknowledged was promised too.  Ack lines
    without ``dev=`` (images built before it was added) are not counted.  Every
    record ``1..n`` must be on device ``D``: compare with
    :func:`verify_diskwrite_records` on its disk.
    """
    acks: dict[str, int] = {}
    for m in _CONSOLE_LINE.finditer(console_text):
        dev = m.group("dev")
        seq = 0 if m.group("start") else int(m.group("ack"))
        acks[dev] = max(acks.get(dev, 0), seq)
    return acks
