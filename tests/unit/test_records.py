"""Unit tests for vmigrate.lab.records: the diskwrite record layout and verifier."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from vmigrate.errors import SpecError
from vmigrate.lab.records import (
    MAGIC,
    encode_diskwrite_record,
    last_acks,
    splitmix64,
    verify_diskwrite_records,
)


def _disk(path: Path, records: list[bytes], size: int = 1 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"".join(records))
    return path


def test_splitmix64_reference_value() -> None:
    # splitmix64 with state 0 yields this first output (reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("size", [512, 4096, 8192, 1 << 20])
def test_record_layout(size: int) -> None:
    rec = encode_diskwrite_record(7, size, run_id=0xABC)
    assert len(rec) == size
    magic, rsize, reserved, seq, run = struct.unpack_from("<8sIIQQ", rec)
    assert (magic, rsize, reserved, seq, run) == (MAGIC, size, 0, 7, 0xABC)
    (crc,) = struct.unpack_from("<I", rec, size - 4)
    assert crc == zlib.crc32(rec[:-4])
    (w0,) = struct.unpack_from("<Q", rec, 32)
    (w1,) = struct.unpack_from("<Q", rec, 40)
    assert w0 == splitmix64(7)
    assert w1 == splitmix64(7) ^ 0x9E3779B97F4A7C15


@pytest.mark.parametrize(("seq", "size"), [(0, 4096), (1, 100), (1, 4097), (1, 2 << 20)])
def test_encode_rejects_bad_arguments(seq: int, size: int) -> None:
    with pytest.raises(SpecError):
        encode_diskwrite_record(seq, size)


def test_verify_counts_contiguous_valid_records(tmp_path: Path) -> None:
    recs = [encode_diskwrite_record(s, 4096, run_id=5) for s in range(1, 11)]
    assert verify_diskwrite_records(_disk(tmp_path / "d", recs)) == 10


def test_verify_empty_disk(tmp_path: Path) -> None:
    assert verify_diskwrite_records(_disk(tmp_path / "d", [])) == 0
    (tmp_path / "short").write_bytes(b"VMG")
    assert verify_diskwrite_records(tmp_path / "short") == 0


def test_verify_stops_at_corruption(tmp_path: Path) -> None:
    recs = [bytearray(encode_diskwrite_record(s, 512, run_id=5)) for s in range(1, 11)]
    recs[6][200] ^= 0x01  # payload bit flip in record 7
    assert verify_diskwrite_records(_disk(tmp_path / "d", [bytes(r) for r in recs])) == 6


def test_verify_stops_at_other_run_or_gap(tmp_path: Path) -> None:
    recs = [encode_diskwrite_record(s, 512, run_id=5) for s in range(1, 6)]
    stale = [encode_diskwrite_record(s, 512, run_id=9) for s in range(6, 9)]
    assert verify_diskwrite_records(_disk(tmp_path / "a", recs + stale)) == 5
    gap = [*recs[:3], encode_diskwrite_record(5, 512, run_id=5)]
    assert verify_diskwrite_records(_disk(tmp_path / "b", gap)) == 3


def test_verify_record_with_valid_crc_but_wrong_payload(tmp_path: Path) -> None:
    good = encode_diskwrite_record(1, 512, run_id=5)
    bad = bytearray(encode_diskwrite_record(2, 512, run_id=5))
    bad[100] ^= 0xFF
    bad[-4:] = struct.pack("<I", zlib.crc32(bytes(bad[:-4])))
    assert verify_diskwrite_records(_disk(tmp_path / "d", [good, bytes(bad)])) == 1


def test_verify_full_disk(tmp_path: Path) -> None:
    recs = [encode_diskwrite_record(s, 1024, run_id=1) for s in range(1, 5)]
    path = tmp_path / "d"
    path.write_bytes(b"".join(recs))
    assert verify_diskwrite_records(path) == 4


def test_last_acks_per_device() -> None:
    console = (
        "VMIGRATE READY ip=none workload=memtouch+diskwrite+diskwrite\n"
        "DISKWRITE start dev=/dev/vda size=4096 rate=50 run=00000000000000ab capacity=16384\r\n"
        "DISKWRITE start dev=/dev/vdb size=4096 rate=20 run=00000000000000cd capacity=16384\n"
        "MEMCHECK pass=1 ok\n"
        "DISKWRITE ack=48 dev=/dev/vda\r\n"
        "DISKWRITE ack=19 dev=/dev/vdb\n"
        "[   12.345678] random: crng init done\n"
        "DISKWRITE ack=97 dev=/dev/vda\n"
        "DISKWRITE ack=40 dev=/dev/vdb\n"
    )
    assert last_acks(console) == {"/dev/vda": 97, "/dev/vdb": 40}


def test_last_acks_started_full_and_restarted() -> None:
    console = (
        "DISKWRITE start dev=/dev/vdc size=512 rate=0 run=0000000000000001 capacity=8\n"
        "DISKWRITE start dev=/dev/vdb size=4096 rate=50 run=0000000000000002 capacity=9\n"
        "DISKWRITE ack=5 dev=/dev/vdb\n"
        "DISKWRITE full ack=9 dev=/dev/vdb\n"
        "DISKWRITE ack=9 dev=/dev/vdb\n"
        "DISKWRITE start dev=/dev/vdb size=4096 rate=50 run=0000000000000003 capacity=9\n"
        "DISKWRITE ack=2 dev=/dev/vdb\n"
    )
    # vdc started but acknowledged nothing yet; vdb's restart does not lower its figure.
    assert last_acks(console) == {"/dev/vdc": 0, "/dev/vdb": 9}


def test_last_acks_ignores_other_lines() -> None:
    console = (
        "DISKWRITE ack=7\n"  # no dev=: an image from before dev= was added
        "DISKWRITE error dev=/dev/vdb: fdatasync seq=8: Input/output error\n"
        "VMIGRATE WORKLOAD EXIT kind=diskwrite status=1\n"
        "DISKWRITE ack=x dev=/dev/vdb\n"
    )
    assert last_acks(console) == {}
    assert last_acks("") == {}
