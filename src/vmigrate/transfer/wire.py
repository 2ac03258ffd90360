"""The transfer stream's wire format (version 2).

A session is one byte stream each way (an SSH channel or a TCP connection).

Preamble, in clear::

    sender   -> receiver: b"VMXFER\\0" | version u8 | cipher id u8 | salt 16 bytes
    receiver -> sender:   b"VMXFER\\0" | version u8 | status u8 (0 ok, 1 bad version,
                                                              2 unknown cipher)
                          | salt 16 bytes (only with status 0)

The session's sub-key is derived from the transfer key and both salts, so a
sender's frames replayed on another connection do not authenticate there: the
receiver takes a connection as its sender only once its HELLO frame
authenticates under that connection's sub-key (proof that it holds the key).

Then frames, in both directions::

    type u8 | flags u8 | meta_len u16 | sealed_len u32 | meta | sealed

``meta`` travels in clear but is authenticated; ``sealed`` is the payload
encrypted with the session cipher, tag included. The associated data is
``direction u8 | seq u64 | header | meta``; ``seq`` counts the frames of one
direction from 0 and is never sent, so a dropped, replayed or reordered frame
fails like a corrupted one.

Data frames carry a chunk of the fixed chunk grid: ``meta`` holds the chunk
index, its length and BLAKE3 hash and the pieces being written (a whole chunk,
or only its dirty parts in an incremental round), so offset and hash are bound
in as associated data; the payload is the pieces' bytes, zstd-compressed when
flag ``COMPRESSED`` is set.

Deadlines: every read and every write of a session has one (:data:`STALL_S`):
a read fails when no byte arrived for that long, a write when the bytes waiting
to leave did not shrink for that long (:class:`~vmigrate.errors.TransferStalledError`).
Each end sends an empty ``PING`` frame when it has sent nothing for
:data:`HEARTBEAT_S` (while it verifies, syncs or waits for acknowledgements),
so a live but busy peer is never taken for a cut link. TCP connections also get
keepalive probes and ``TCP_USER_TIMEOUT`` (:func:`tune_socket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Protocol

from vmigrate.errors import TransferError, TransferIntegrityError, TransferStalledError
from vmigrate.transfer.crypto import CIPHER_NAMES, CIPHERS, AuthError, FrameCipher

log = logging.getLogger(__name__)

MAGIC: Final = b"VMXFER\0"
VERSION: Final = 2
PREAMBLE = struct.Struct(">7sBB16s")
REPLY = struct.Struct(">7sBB")
SALT_BYTES: Final = 16
#: no byte moved for this long on a read or a write: the stream is taken as cut
STALL_S: Final = 15.0
#: an end that sent nothing for this long sends a PING
HEARTBEAT_S: Final = 3.0
HEADER = struct.Struct(">BBHI")
MAX_META: Final = 65535
MAX_SEALED: Final = 64 << 20
SENDER, RECEIVER = 0, 1  # direction bytes

FLAG_COMPRESSED: Final = 1


class Kind(IntEnum):
    HELLO = 1   # s->r JSON: what is sent and how
    STATE = 2   # r->s binary: chunks the receiver already holds (resume)
    DATA = 3    # s->r chunk pieces
    ZERO = 4    # s->r a run of all-zero chunks
    ACK = 5     # r->s JSON: frames written, frames that failed to authenticate
    END = 6     # s->r binary: digest and per-chunk hashes of the source
    DONE = 7    # r->s JSON: outcome
    ERROR = 8   # either, JSON: why the sender of it gives up
    PING = 9    # either, empty: I am alive (skipped by the reader once it authenticates)


class ByteReader(Protocol):
    async def read(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


@dataclass(frozen=True)
class Frame:
    kind: Kind
    flags: int
    meta: bytes
    sealed: bytes
    seq: int

    @property
    def wire_size(self) -> int:
        return HEADER.size + len(self.meta) + len(self.sealed)


DATA_META = struct.Struct(">QI32sH")  # chunk index, chunk length, hash, piece count
PIECE = struct.Struct(">IIB")          # offset in chunk, length, 1 = zeros
ZERO_META = struct.Struct(">QI")       # first chunk index, count


def encode_data_meta(index: int, length: int, digest: bytes,
                     pieces: list[tuple[int, int, bool]]) -> bytes:
    return DATA_META.pack(index, length, digest, len(pieces)) + b"".join(
        PIECE.pack(off, ln, 1 if zero else 0) for off, ln, zero in pieces
    )


def decode_zero_meta(meta: bytes) -> tuple[int, int]:
    """(first chunk index, count) of a ZERO frame."""
    if len(meta) != ZERO_META.size:
        raise TransferIntegrityError("zero frame's meta has the wrong size")
    first, count = ZERO_META.unpack(meta)
    return int(first), int(count)


def decode_data_meta(meta: bytes) -> tuple[int, int, bytes, list[tuple[int, int, bool]]]:
    if len(meta) < DATA_META.size:
        raise TransferIntegrityError("data frame too short")
    index, length, digest, count = DATA_META.unpack_from(meta)
    if len(meta) != DATA_META.size + count * PIECE.size:
        raise TransferIntegrityError("data frame's piece list has the wrong size")
    pieces = []
    for i in range(count):
        off, ln, zero = PIECE.unpack_from(meta, DATA_META.size + i * PIECE.size)
        if off + ln > length:
            raise TransferIntegrityError("a piece lies outside its chunk")
        pieces.append((off, ln, bool(zero)))
    return index, length, digest, pieces


class Channel:
    """One session's framed, encrypted stream in one direction each way.

    Every read and write has a deadline of ``stall_s`` seconds without progress
    (:class:`TransferStalledError`); after one, :attr:`stalled` is set and the
    stream is not to be used again."""

    def __init__(self, reader: ByteReader, writer: ByteWriter, cipher: FrameCipher,
                 *, me: int, stall_s: float = STALL_S) -> None:
        self.reader = reader
        self.writer = writer
        self.cipher = cipher
        self.me = me
        self.peer = RECEIVER if me == SENDER else SENDER
        self.stall_s = stall_s
        self.sent_seq = 0
        self.recv_seq = 0
        self.wire_out = 0
        self.wire_in = 0
        self.last_send = time.monotonic()
        self.stalled = False
        self._draining = 0

    def seal(self, kind: Kind, payload: bytes, *, meta: bytes = b"", flags: int = 0
             ) -> tuple[int, bytes]:
        """Allocate the next sequence number and build the frame's bytes.

        Frames must be written in the order they were sealed: write them with
        :meth:`send_raw` before the next ``await``."""
        seq = self.sent_seq
        self.sent_seq += 1
        sealed_len = len(payload) + 16
        header = HEADER.pack(kind, flags, len(meta), sealed_len)
        aad = struct.pack(">BQ", self.me, seq) + header + meta
        sealed = self.cipher.seal(self.me, seq, aad, payload)
        return seq, header + meta + sealed

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` (at once, before any ``await``), then wait until the stream
        takes it, under the write deadline."""
        try:
            self.writer.write(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise TransferError("the other end closed the transfer stream") from exc
        self.wire_out += len(data)
        self.last_send = time.monotonic()
        self._draining += 1
        try:
            await drain(self.writer, self.stall_s)
        except TransferStalledError:
            self.stalled = True
            raise
        finally:
            self._draining -= 1

    async def send(self, kind: Kind, payload: bytes, *, meta: bytes = b"", flags: int = 0
                   ) -> int:
        seq, data = self.seal(kind, payload, meta=meta, flags=flags)
        await self.send_raw(data)
        return seq

    async def send_json(self, kind: Kind, obj: dict[str, Any]) -> int:
        return await self.send(kind, json.dumps(obj).encode())

    async def keepalive(self, every: float | None = None) -> None:
        """Send a PING whenever nothing was sent for ``every`` seconds (default
        :data:`HEARTBEAT_S`, at most a fifth of the deadline); runs until cancelled,
        and ends quietly when the stream fails (the reads and writes of the session
        report that)."""
        if every is None:
            every = min(HEARTBEAT_S, self.stall_s / 5)
        try:
            while True:
                await asyncio.sleep(max(0.05, self.last_send + every - time.monotonic()))
                if time.monotonic() - self.last_send >= every and not self._draining:
                    await self.send(Kind.PING, b"")
        except TransferError as exc:
            log.debug("keepalive stopped: %s", exc)

    async def read_frame(self) -> Frame:
        """The next frame that is not a PING, not yet opened. PINGs that authenticate
        are skipped; one that does not is returned like any frame that does not
        authenticate. Raises :class:`TransferError` on EOF,
        :class:`TransferStalledError` after the read deadline and
        :class:`TransferIntegrityError` on a header no sender of ours writes."""
        while True:
            frame = await self._read_one()
            if frame.kind != Kind.PING:
                return frame
            try:
                self.open(frame)
            except AuthError:
                return frame

    async def _read_one(self) -> Frame:
        try:
            head = await read_exactly(self.reader, HEADER.size, self.stall_s)
            kind, flags, meta_len, sealed_len = HEADER.unpack(head)
            if kind not in Kind._value2member_map_ or sealed_len > MAX_SEALED \
                    or sealed_len < 16:
                raise TransferIntegrityError(
                    f"altered stream: frame header type={kind} length={sealed_len} is not "
                    "valid"
                )
            body = await read_exactly(self.reader, meta_len + sealed_len, self.stall_s)
        except TransferStalledError:
            self.stalled = True
            raise
        seq = self.recv_seq
        self.recv_seq += 1
        self.wire_in += HEADER.size + len(body)
        return Frame(Kind(kind), flags, body[:meta_len], body[meta_len:], seq)

    def open(self, frame: Frame) -> bytes:
        """The frame's payload; :class:`AuthError` if it does not authenticate."""
        header = HEADER.pack(frame.kind, frame.flags, len(frame.meta), len(frame.sealed))
        aad = struct.pack(">BQ", self.peer, frame.seq) + header + frame.meta
        return self.cipher.open(self.peer, frame.seq, aad, frame.sealed)

    def open_json(self, frame: Frame) -> dict[str, Any]:
        """A control frame's JSON object; a control frame that fails to authenticate
        or is not a JSON object ends the session with :class:`TransferIntegrityError`."""
        try:
            obj = json.loads(self.open(frame))
        except AuthError as exc:
            raise TransferIntegrityError(
                f"altered stream: a {frame.kind.name} frame does not authenticate"
            ) from exc
        except (ValueError, RecursionError) as exc:
            raise TransferIntegrityError(f"{frame.kind.name} frame is not JSON") from exc
        if not isinstance(obj, dict):
            raise TransferIntegrityError(f"{frame.kind.name} frame is not a JSON object")
        return obj


async def read_exactly(reader: ByteReader, n: int, stall_s: float = STALL_S) -> bytes:
    """``n`` bytes; :class:`TransferError` at EOF, :class:`TransferStalledError` when
    no byte arrived for ``stall_s`` seconds."""
    buf = bytearray()
    while len(buf) < n:
        try:
            async with asyncio.timeout(stall_s):
                part = await reader.read(n - len(buf))
        except TimeoutError as exc:
            raise TransferStalledError(
                f"the transfer stream stalled: no byte arrived for {stall_s:g} s (link cut "
                "or the other end hung)") from exc
        except (ConnectionError, OSError) as exc:
            raise TransferError("the other end closed the transfer stream") from exc
        if not part:
            raise TransferError("the other end closed the transfer stream")
        buf += part
    return bytes(buf)


async def drain(writer: ByteWriter, stall_s: float = STALL_S) -> None:
    """Wait until ``writer`` took what was written; :class:`TransferStalledError` when
    the bytes waiting to leave did not shrink for ``stall_s`` seconds,
    :class:`TransferError` when the stream closed."""
    transport = getattr(writer, "transport", None)

    def waiting() -> int | None:
        try:
            return int(transport.get_write_buffer_size()) if transport is not None else None
        except (AttributeError, RuntimeError):
            return None

    last_size, last_move = waiting(), time.monotonic()
    while True:
        try:
            async with asyncio.timeout(min(1.0, stall_s)):
                await writer.drain()
            return
        except TimeoutError:
            size, now = waiting(), time.monotonic()
            if size is not None and last_size is not None and size < last_size:
                last_size, last_move = size, now
            elif now - last_move >= stall_s:
                raise TransferStalledError(
                    f"the transfer stream stalled: nothing could be sent for {stall_s:g} s "
                    "(link cut or the other end hung)") from None
        except (ConnectionError, OSError, RuntimeError) as exc:
            raise TransferError("the other end closed the transfer stream") from exc


def tune_socket(writer: Any, stall_s: float = STALL_S) -> None:
    """TCP keepalive (probes after 5 s idle, every 2 s, 4 of them) and a
    ``TCP_USER_TIMEOUT`` of ``stall_s``: the kernel itself drops a connection whose
    peer stopped answering. No-op for what is not a TCP socket."""
    sock = writer.get_extra_info("socket") if hasattr(writer, "get_extra_info") else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4), 5),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5), 2),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6), 4),
            (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", 18), int(stall_s * 1000))]
    for level, name, value in opts:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, name, value)


def preamble(cipher: str, salt: bytes) -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, CIPHERS[cipher], salt)


async def read_preamble(reader: ByteReader, stall_s: float = STALL_S
                        ) -> tuple[int, str | None, bytes]:
    """(version, cipher name or None if unknown, salt); TransferIntegrityError when
    the stream is not ours at all."""
    raw = await read_exactly(reader, PREAMBLE.size, stall_s)
    magic, version, cipher_id, salt = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise TransferIntegrityError("not a vmigrate transfer stream (bad magic)")
    return version, CIPHER_NAMES.get(cipher_id), salt


def reply(status: int, salt: bytes = b"") -> bytes:
    """The receiver's answer to a preamble: with status 0, its own salt follows."""
    return REPLY.pack(MAGIC, VERSION, status) + (salt if status == 0 else b"")


async def read_reply(reader: ByteReader, stall_s: float = STALL_S) -> bytes:
    """The receiver's salt, once it accepted the preamble; :class:`TransferError`
    when it refused it, :class:`TransferIntegrityError` when it is not ours."""
    raw = await read_exactly(reader, REPLY.size, stall_s)
    magic, version, status = REPLY.unpack(raw)
    if magic != MAGIC:
        raise TransferIntegrityError("the receiver does not speak the vmigrate transfer stream")
    if status == 1:
        raise TransferError(f"the receiver does not know stream version {VERSION} "
                            f"(it speaks {version}); install the same vmigrate on both hosts")
    if status == 2:
        raise TransferError("the receiver's crypto library lacks the chosen cipher")
    if status != 0:
        raise TransferError(f"the receiver refused the stream (status {status})")
    if version != VERSION:
        raise TransferError(f"the receiver speaks stream version {version}, not {VERSION}")
    return await read_exactly(reader, SALT_BYTES, stall_s)
