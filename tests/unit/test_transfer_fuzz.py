"""Fuzzing the transfer stream's parsers (frames, preamble, HELLO, STATE, ACK) and the
receiver's journal: whatever the bytes, nothing but vmigrate's own errors comes out.

The session-level tests go past authentication: the hostile peer holds the key (a
compromised or buggy end), so its frames authenticate and reach the parsers behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmigrate.errors import VmigrateError
from vmigrate.transfer import engine, journal, wire
from vmigrate.transfer.confine import open_destination
from vmigrate.transfer.crypto import FrameCipher
from vmigrate.transfer.disks import Range
from vmigrate.transfer.engine import SendOptions, _check_hello, _unpack_ids, zero_id
from vmigrate.transfer.journal import RECORD_SIZE, Geometry, Journal, RecKind

KEY = b"\x33" * 32
CHUNK = 4096
SIZE = 5 * CHUNK + 100
G = Geometry(SIZE, CHUNK, "raw")
ZEROS = {CHUNK: zero_id(CHUNK), 100: zero_id(100)}
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def run(coro: Any, limit: float = 20.0) -> Any:
    async def guarded() -> Any:
        return await asyncio.wait_for(coro, limit)
    return asyncio.run(guarded())


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> None:
        self.data += b

    async def drain(self) -> None:
        return None


class Pipe:
    """One direction of an in-memory duplex stream: what is written here is read from
    :attr:`reader`."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader()

    def write(self, b: bytes) -> None:
        if not self.reader.at_eof():
            self.reader.feed_data(b)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def close(self) -> None:
        if not self.reader.at_eof():
            self.reader.feed_eof()


# --- journal ------------------------------------------------------------------------


def journal_bytes(records: list[tuple[int, int, int, bytes]], good_crc: list[bool],
                  tail: bytes) -> bytes:
    header = json.dumps({"size": G.size, "chunk_size": G.chunk_size,
                         "format": G.fmt}).encode()
    out = bytearray(struct.pack(">8sBI", journal.MAGIC, journal.VERSION, len(header)) + header)
    for (kind, index, count, digest), ok in zip(records, good_crc, strict=False):
        rec = struct.pack(">BQI32s", kind, index, count, digest)
        out += rec + struct.pack(">I", zlib.crc32(rec) ^ (0 if ok else 1))
    return bytes(out + tail)


records = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2**64 - 1),
                             st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32))
                   | st.tuples(st.sampled_from([1, 2, 3]), st.integers(0, 6),
                               st.integers(0, 6), st.binary(min_size=32, max_size=32)),
                   max_size=12)


@FUZZ
@given(st.binary(max_size=400))
def test_journal_parse_never_raises(data: bytes) -> None:
    out = journal._parse(data, G)
    assert out is None or out[0] <= len(data)


@FUZZ
@given(records, st.lists(st.booleans(), max_size=12), st.binary(max_size=RECORD_SIZE * 2))
def test_journal_reopens_from_any_records(recs: list[tuple[int, int, int, bytes]],
                                          crcs: list[bool], tail: bytes) -> None:
    d = Path(tempfile.mkdtemp())
    try:
        path = d / "j"
        path.write_bytes(journal_bytes(recs, crcs + [True] * len(recs), tail))
        try:
            j, _resumed = Journal.open(path, G, ZEROS)
        except VmigrateError:
            return
        assert all(0 <= i < G.chunks() for i in j.chunks)
        assert j.unsynced <= set(j.chunks)
        j.close()
        # what it kept reads back the same
        j2, _ = Journal.open(path, G, ZEROS)
        assert j2.chunks == j.chunks
        j2.close()
    finally:
        shutil.rmtree(d)


@FUZZ
@given(st.binary(max_size=300))
def test_journal_open_on_any_file(data: bytes) -> None:
    d = Path(tempfile.mkdtemp())
    try:
        (d / "x.raw.vmxfer-journal").write_bytes(data)
        with open_destination(str(d / "x.raw"), [str(d)]) as dest:
            try:
                j, _ = Journal.open(dest.journal, G, ZEROS, dest=dest)
            except VmigrateError:
                return
            j.record(1, b"z" * 32)
            j.sync()
            j.close()
    finally:
        shutil.rmtree(d)


# --- frames and the preamble ------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_frame_reader_on_any_bytes(data: bytes) -> None:
    async def go() -> None:
        ch = wire.Channel(reader_of(data), Sink(), FrameCipher("aes-256-gcm", KEY, b"s" * 32),
                          me=wire.RECEIVER, stall_s=1.0)
        for _ in range(10):
            try:
                f = await ch.read_frame()
            except VmigrateError:
                return
            with contextlib.suppress(VmigrateError):
                ch.open_json(f)

    run(go())


@FUZZ
@given(st.binary(max_size=200))
def test_meta_decoders_on_any_bytes(meta: bytes) -> None:
    for decode in (wire.decode_data_meta, wire.decode_zero_meta):
        with contextlib.suppress(VmigrateError):
            decode(meta)


@FUZZ
@given(st.binary(max_size=60))
def test_preamble_and_reply_on_any_bytes(data: bytes) -> None:
    async def go() -> None:
        for parse in (wire.read_preamble, wire.read_reply):
            with contextlib.suppress(VmigrateError):
                await parse(reader_of(data), 1.0)

    run(go())


hellos = st.fixed_dictionaries({
    "size": st.integers(-5, 2**70) | json_values, "chunk_size": st.integers(0, 2**30)
    | json_values, "format": st.sampled_from(["raw", "qcow2", "vmdk"]) | json_values,
    "final": st.booleans() | json_values, "verify": st.sampled_from(["full", "journal"])
    | json_values, "delta": st.booleans() | json_values})


@FUZZ
@given(json_values | hellos)
def test_hello_check_on_any_json(obj: Any) -> None:
    try:
        h = _check_hello(obj)
    except VmigrateError:
        return
    assert h.size > 0 and h.chunk_size >= 4096 and h.format in ("raw", "qcow2")


@FUZZ
@given(st.binary(max_size=300), st.booleans(), st.integers(1, 64))
def test_state_ids_on_any_bytes(data: bytes, compress: bool, chunks: int) -> None:
    if compress:
        data = zstandard.ZstdCompressor().compress(data)
    try:
        ids = _unpack_ids(data, chunks)
    except VmigrateError:
        return
    assert all(0 <= i < chunks and len(h) == 32 for i, h in ids.items())


# --- sessions with a hostile peer that holds the key ------------------------------------


# mostly the frames a sender sends, sometimes anything
kinds = st.sampled_from([wire.Kind.DATA, wire.Kind.ZERO, wire.Kind.END, wire.Kind.PING]) \
    | st.sampled_from(list(wire.Kind)) | st.integers(0, 255)
pieces = st.lists(st.tuples(st.integers(0, 2 * CHUNK), st.integers(0, 2 * CHUNK),
                            st.booleans()), max_size=3)
data_meta = st.builds(
    lambda index, length, digest, ps: wire.encode_data_meta(index, length, digest, ps),
    st.integers(0, 8), st.sampled_from([CHUNK, 100, 0, 3 * CHUNK]),
    st.binary(min_size=32, max_size=32), pieces)
zero_meta = st.builds(lambda a, b: wire.ZERO_META.pack(a, b), st.integers(0, 2**64 - 1),
                      st.integers(0, 2**32 - 1)) | st.builds(
    lambda a, b: wire.ZERO_META.pack(a, b), st.integers(0, 7), st.integers(0, 7))
payloads = st.binary(max_size=CHUNK + 8) | st.builds(
    lambda b: zstandard.ZstdCompressor().compress(b), st.binary(max_size=CHUNK + 8)) | \
    st.builds(lambda v: json.dumps(v).encode(), json_values)
frames = st.lists(st.tuples(kinds, st.integers(0, 3), data_meta | zero_meta | st.binary(
    max_size=40), payloads), max_size=6)
good_hello = {"size": SIZE, "chunk_size": CHUNK, "format": "raw", "final": True,
              "verify": "full", "delta": False}


def seal(ch: wire.Channel, kind: int, flags: int, meta: bytes, payload: bytes) -> bytes:
    """A frame of any type byte, sealed as ``ch`` would (it authenticates)."""
    seq = ch.sent_seq
    ch.sent_seq += 1
    header = wire.HEADER.pack(kind, flags, len(meta), len(payload) + 16)
    aad = struct.pack(">BQ", ch.me, seq) + header + meta
    return header + meta + ch.cipher.seal(ch.me, seq, aad, payload)


@FUZZ
@given(st.just(good_hello) | st.just(good_hello) | hellos | json_values, frames)
def test_receiver_with_a_hostile_sender(hello: Any, script: list[Any]) -> None:
    d = Path(tempfile.mkdtemp())
    try:
        async def sender(inp: asyncio.StreamReader, out: Pipe) -> None:
            salt = os.urandom(16)
            out.write(wire.preamble("aes-256-gcm", salt))
            try:
                theirs = await wire.read_reply(inp, 1.0)
            except VmigrateError:
                out.close()
                return
            ch = wire.Channel(inp, out, FrameCipher("aes-256-gcm", KEY, salt + theirs),
                              me=wire.SENDER)
            out.write(seal(ch, wire.Kind.HELLO, 0, b"", json.dumps(hello).encode()))
            for kind, flags, meta, payload in script:
                out.write(seal(ch, kind, flags, meta, payload))
            out.close()

        async def go() -> None:
            to_rx, to_tx = Pipe(), Pipe()
            with open_destination(str(d / "x.raw"), [str(d)]) as dest:
                task = asyncio.create_task(sender(to_tx.reader, to_rx))
                with contextlib.suppress(VmigrateError):
                    await engine.receive(to_rx.reader, to_tx, KEY, dest, sock_dir=d,
                                         stall_s=1.0)
                await task

        run(go())
    finally:
        shutil.rmtree(d)


class MemSource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def allocation(self) -> list[Range]:
        return [Range(0, self.size)]

    async def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


state_payloads = st.builds(
    lambda ids: zstandard.ZstdCompressor().compress(b"".join(
        struct.pack(">Q32s", i, h) for i, h in ids)),
    st.lists(st.tuples(st.integers(0, 9), st.binary(min_size=32, max_size=32)), max_size=4))
ack_bodies = st.builds(lambda v: json.dumps(v).encode(), st.fixed_dictionaries(
    {"upto": st.integers(-1, 9) | json_values},
    optional={"nack": st.lists(st.integers(-1, 9)) | json_values,
              "whole": st.lists(st.integers(-1, 9)) | json_values}))
reply_kinds = st.sampled_from(list(wire.Kind)) | st.integers(0, 255)
ack_frames = st.tuples(st.just(wire.Kind.ACK), st.just(0), st.just(b""), ack_bodies)
replies = st.lists(
    ack_frames | ack_frames | ack_frames
    | st.tuples(st.just(wire.Kind.DONE), st.just(0), st.just(b""),
                st.builds(lambda v: json.dumps(v).encode(), json_values))
    | st.tuples(reply_kinds, st.integers(0, 1), st.binary(max_size=8),
                state_payloads | payloads),
    max_size=6)


@FUZZ
@given(replies, st.sampled_from([True, True, True, False]))
def test_sender_with_a_hostile_receiver(script: list[Any], state_first: bool) -> None:
    src = MemSource(os.urandom(SIZE))

    async def receiver(inp: asyncio.StreamReader, out: Pipe) -> None:
        try:
            _v, _c, salt = await wire.read_preamble(inp, 1.0)
        except VmigrateError:
            out.close()
            return
        ours = os.urandom(16)
        out.write(wire.reply(0, ours))
        ch = wire.Channel(inp, out, FrameCipher("aes-256-gcm", KEY, salt + ours),
                          me=wire.RECEIVER)
        if state_first:
            out.write(seal(ch, wire.Kind.STATE, 0, b"", zstandard.ZstdCompressor().compress(
                b"")))
        for kind, flags, meta, payload in script:
            out.write(seal(ch, kind, flags, meta, payload))
        out.close()

    async def go() -> None:
        to_rx, to_tx = Pipe(), Pipe()
        task = asyncio.create_task(receiver(to_rx.reader, to_tx))
        with contextlib.suppress(VmigrateError):
            await engine.send(src, to_tx.reader, to_rx, KEY,
                              SendOptions(chunk_size=CHUNK), stall_s=1.0)
        await task

    run(go())


def test_a_record_kind_that_does_not_exist_ends_the_trusted_part() -> None:
    """A hand-made case the fuzzer covers too: a valid CHUNK, then an unknown kind."""
    data = journal_bytes([(RecKind.CHUNK, 1, 1, b"a" * 32), (9, 0, 0, b"b" * 32),
                          (RecKind.CHUNK, 2, 1, b"c" * 32)], [True] * 3, b"")
    out = journal._parse(data, G)
    assert out is not None and [r[1] for r in out[1]] == [1]
