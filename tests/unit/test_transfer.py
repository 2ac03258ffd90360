"""The transfer engine's logic on plain data: planning, journal, frames, crypto."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.unit.test_transfer_fuzz import Sink
from vmigrate.errors import SpecError, TransferIntegrityError, UserError
from vmigrate.service.migrations import parse_cutover
from vmigrate.transfer import wire
from vmigrate.transfer.crypto import AuthError, FrameCipher, available_ciphers, parse_key
from vmigrate.transfer.disks import Range
from vmigrate.transfer.engine import (
    Compressor,
    Manifest,
    _plan_delta,
    _plan_full,
    chunk_id,
    image_digest,
    zero_id,
)
from vmigrate.transfer.journal import RECORD_SIZE, Geometry, Journal
from vmigrate.transfer.remote import parse_place

MiB = 1 << 20


def test_plan_full_coalesces_zero_runs_and_keeps_partial_chunks() -> None:
    g = Geometry(10 * MiB + 4096, MiB, "raw")  # 11 chunks, the last one short
    alloc = [Range(0, MiB), Range(MiB, 5 * MiB + 512, zero=True),
             Range(6 * MiB + 512, 4 * MiB - 512), Range(10 * MiB, 4096, zero=True)]
    items = _plan_full(alloc, g)
    assert [(i.index, i.count, i.zero) for i in items] == [
        (0, 1, False), (1, 5, True), (6, 1, False), (7, 1, False), (8, 1, False),
        (9, 1, False), (10, 1, True)]


def test_plan_delta_splits_dirty_ranges_per_chunk() -> None:
    g = Geometry(4 * MiB, MiB, "raw")
    items = _plan_delta([Range(MiB - 4096, 8192), Range(3 * MiB, 65536)], g)
    assert [(i.index, [(p.offset, p.length) for p in i.pieces]) for i in items] == [
        (0, [(MiB - 4096, 4096)]), (1, [(0, 4096)]), (3, [(0, 65536)])]


def test_journal_reopens_with_unsynced_records_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    g = Geometry(8 * MiB, MiB, "raw")
    zeros = {MiB: zero_id(MiB)}
    path = tmp_path / "j"
    j, resumed = Journal.open(path, g, zeros)
    assert not resumed
    j.record(0, b"a" * 32)
    j.record_zeros(1, 3)
    j.sync()
    j.record(5, b"b" * 32)
    j.close()
    with path.open("ab") as f:  # a record cut off by a kill
        f.write(b"\x01" * (RECORD_SIZE - 3))
    j2, resumed = Journal.open(path, g, zeros)
    assert resumed
    assert j2.chunks == {0: b"a" * 32, 1: zero_id(MiB), 2: zero_id(MiB), 3: zero_id(MiB),
                         5: b"b" * 32}
    assert j2.unsynced == {5}
    j2.forget({5})
    j2.close()
    j3, _ = Journal.open(path, g, zeros)
    assert j3.chunks.get(5) != b"b" * 32
    j3.close()
    # another image's geometry: the journal is not trusted
    j4, resumed = Journal.open(path, Geometry(16 * MiB, MiB, "raw"), zeros)
    assert not resumed and j4.chunks == {}
    j4.close()


def test_frames_authenticate_and_bind_sequence_and_meta() -> None:
    key, salt = os.urandom(32), os.urandom(16)


    async def go() -> None:
        sink = Sink()
        tx = wire.Channel(asyncio.StreamReader(), sink, FrameCipher("aes-256-gcm", key, salt),
                          me=wire.SENDER)
        meta = wire.encode_data_meta(7, MiB, b"i" * 32, [(0, 10, False)])
        await tx.send(wire.Kind.DATA, b"0123456789", meta=meta)
        await tx.send(wire.Kind.DATA, b"second", meta=meta)
        frames = bytes(sink.data)

        def rx_over(data: bytes) -> wire.Channel:
            r = asyncio.StreamReader()
            r.feed_data(data)
            r.feed_eof()
            return wire.Channel(r, Sink(), FrameCipher("aes-256-gcm", key, salt),
                                me=wire.RECEIVER)

        rx = rx_over(frames)
        f1 = await rx.read_frame()
        assert rx.open(f1) == b"0123456789"
        assert wire.decode_data_meta(f1.meta)[0] == 7
        # the second frame read as if it were the first (replayed/reordered): rejected
        rx2 = rx_over(frames[f1.wire_size:])
        with pytest.raises(AuthError):
            rx2.open(await rx2.read_frame())
        # meta altered in flight (another chunk index): rejected
        bad = bytearray(frames)
        bad[wire.HEADER.size + 7] ^= 1
        rx3 = rx_over(bytes(bad))
        with pytest.raises(AuthError):
            rx3.open(await rx3.read_frame())
        # a header no sender writes: the stream is altered
        bad = bytearray(frames)
        bad[0] = 99
        with pytest.raises(TransferIntegrityError):
            await rx_over(bytes(bad)).read_frame()

    asyncio.run(go())


def test_wrong_key_does_not_open() -> None:
    salt = os.urandom(16)
    sealed = FrameCipher("aes-256-gcm", b"k" * 32, salt).seal(0, 0, b"aad", b"data")
    with pytest.raises(AuthError):
        FrameCipher("aes-256-gcm", b"x" * 32, salt).open(0, 0, b"aad", sealed)


@pytest.mark.skipif("sm4-gcm" not in available_ciphers(), reason="no SM4 in OpenSSL")
def test_sm4_gcm_round_trip() -> None:
    c = FrameCipher("sm4-gcm", b"k" * 32, b"s" * 16)
    assert c.open(1, 5, b"a", c.seal(1, 5, b"a", b"payload")) == b"payload"
    with pytest.raises(AuthError):
        c.open(1, 6, b"a", c.seal(1, 5, b"a", b"payload"))


def test_key_and_place_parsing() -> None:
    assert parse_key("ab" * 32) == b"\xab" * 32
    with pytest.raises(UserError):
        parse_key("xyz")
    assert parse_place("h2:/srv/a.raw").host == "h2"
    assert parse_place("/srv/a:b.raw").host is None
    with pytest.raises(SpecError):
        parse_place("h2:relative.raw")


def test_compressor_gives_up_on_random_data_and_packs_text() -> None:
    c = Compressor("auto")
    assert c.compress(os.urandom(MiB)) is None
    packed = c.compress(b"log line 42: all is well\n" * 40000)
    assert packed is not None and len(packed) < MiB // 20
    assert Compressor("off").compress(b"a" * MiB) is None


def test_manifest_round_trip_and_digest(tmp_path: Path) -> None:
    g = Geometry(3 * MiB, MiB, "raw")
    m = Manifest(g, [chunk_id(b"a"), zero_id(MiB), chunk_id(b"c")])
    m.save(tmp_path / "m")
    assert Manifest.load(tmp_path / "m", g).ids == m.ids
    assert image_digest(m.ids) != image_digest(list(reversed(m.ids)))


def test_cutover_parsing() -> None:
    assert abs(parse_cutover("+30") - (__import__("time").time() + 30)) < 2
    with pytest.raises(UserError):
        parse_cutover("soon")


@pytest.mark.parametrize("text", ["+1e400", "+nan", "+inf", "25:00", "12:60", "1e400",
                                  "-5", "+1e12", "ab:cd"])
def test_cutover_refuses_times_that_are_not_times(text: str) -> None:
    with pytest.raises(UserError):
        parse_cutover(text)
    assert parse_cutover("00:00") > 0 and parse_cutover("+0.5") > 0
