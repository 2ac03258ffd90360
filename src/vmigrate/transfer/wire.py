"""The transfer stream's wire format (version 1).

A session is one byte stream each way (an SSH channel or a TCP connection).

Preamble, in clear::

    sender   -> receiver: b"VMXFER\\0" | version u8 | cipher id u8 | salt 16 bytes
    receiver -> sender:   b"VMXFER\\0" | version u8 | status u8 (0 ok, 1 bad version,
                                                              2 unknown cipher)

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
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Protocol

from vmigrate.errors import TransferError, TransferIntegrityError
from vmigrate.transfer.crypto import CIPHER_NAMES, CIPHERS, AuthError, FrameCipher

MAGIC: Final = b"VMXFER\0"
VERSION: Final = 1
PREAMBLE = struct.Struct(">7sBB16s")
REPLY = struct.Struct(">7sBB")
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


class ByteReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


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
    """One session's framed, encrypted stream in one direction each way."""

    def __init__(self, reader: ByteReader, writer: ByteWriter, cipher: FrameCipher,
                 *, me: int) -> None:
        self.reader = reader
        self.writer = writer
        self.cipher = cipher
        self.me = me
        self.peer = RECEIVER if me == SENDER else SENDER
        self.sent_seq = 0
        self.recv_seq = 0
        self.wire_out = 0
        self.wire_in = 0

    def seal(self, kind: Kind, payload: bytes, *, meta: bytes = b"", flags: int = 0
             ) -> tuple[int, bytes]:
        """Allocate the next sequence number and build the frame's bytes.

        Frames must be written in the order they were sealed."""
        seq = self.sent_seq
        self.sent_seq += 1
        sealed_len = len(payload) + 16
        header = HEADER.pack(kind, flags, len(meta), sealed_len)
        aad = struct.pack(">BQ", self.me, seq) + header + meta
        sealed = self.cipher.seal(self.me, seq, aad, payload)
        return seq, header + meta + sealed

    async def send_raw(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise TransferError("the other end closed the transfer stream") from exc
        self.wire_out += len(data)

    async def send(self, kind: Kind, payload: bytes, *, meta: bytes = b"", flags: int = 0
                   ) -> int:
        seq, data = self.seal(kind, payload, meta=meta, flags=flags)
        await self.send_raw(data)
        return seq

    async def send_json(self, kind: Kind, obj: dict[str, Any]) -> int:
        return await self.send(kind, json.dumps(obj).encode())

    async def read_frame(self) -> Frame:
        """The next frame, not yet opened. Raises :class:`TransferError` on EOF and
        :class:`TransferIntegrityError` on a header no sender of ours writes."""
        head = await read_exactly(self.reader, HEADER.size)
        kind, flags, meta_len, sealed_len = HEADER.unpack(head)
        if kind not in Kind._value2member_map_ or sealed_len > MAX_SEALED or sealed_len < 16:
            raise TransferIntegrityError(
                f"altered stream: frame header type={kind} length={sealed_len} is not valid"
            )
        body = await read_exactly(self.reader, meta_len + sealed_len)
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
        """A control frame's JSON; a control frame that fails to authenticate ends
        the session with :class:`TransferIntegrityError`."""
        try:
            obj = json.loads(self.open(frame))
        except AuthError as exc:
            raise TransferIntegrityError(
                f"altered stream: a {frame.kind.name} frame does not authenticate"
            ) from exc
        except ValueError as exc:
            raise TransferIntegrityError(f"{frame.kind.name} frame is not JSON") from exc
        if not isinstance(obj, dict):
            raise TransferIntegrityError(f"{frame.kind.name} frame is not a JSON object")
        return obj


async def read_exactly(reader: ByteReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except (EOFError, ConnectionError, OSError) as exc:  # IncompleteReadError is an EOFError
        raise TransferError("the other end closed the transfer stream") from exc


def preamble(cipher: str, salt: bytes) -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, CIPHERS[cipher], salt)


async def read_preamble(reader: ByteReader) -> tuple[int, str | None, bytes]:
    """(version, cipher name or None if unknown, salt); TransferIntegrityError when
    the stream is not ours at all."""
    raw = await read_exactly(reader, PREAMBLE.size)
    magic, version, cipher_id, salt = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise TransferIntegrityError("not a vmigrate transfer stream (bad magic)")
    return version, CIPHER_NAMES.get(cipher_id), salt


def reply(status: int) -> bytes:
    return REPLY.pack(MAGIC, VERSION, status)


async def read_reply(reader: ByteReader) -> None:
    raw = await read_exactly(reader, REPLY.size)
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
