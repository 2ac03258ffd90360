"""An asyncio NBD client (fixed newstyle negotiation) and a ``qemu-nbd`` launcher.

Written from the NBD protocol specification
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md); no
third-party NBD library.

What the client negotiates, in order:

1. the fixed newstyle greeting (``NBD_FLAG_C_FIXED_NEWSTYLE``, plus
   ``NBD_FLAG_C_NO_ZEROES`` when offered);
2. ``NBD_OPT_STRUCTURED_REPLY`` (sparse reads and block status need it);
3. ``NBD_OPT_SET_META_CONTEXT`` for the contexts the caller asked for (every
   one of them must be granted, or :meth:`NbdClient.connect` fails);
4. ``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE`` (falling back to
   ``NBD_OPT_EXPORT_NAME`` on a server that does not know ``GO``).

Requests are pipelined: any number of coroutines may call one client at once.
Each request gets a handle and a future; one reader task reads the replies in
whatever order the server sends them and completes the futures. Everything
read from the wire is checked (magic numbers, handles, chunk types and lengths,
offsets inside the request); a violation breaks the connection, and every
pending and later call then raises :class:`~vmigrate.errors.NbdError`.

:func:`serve_image` exports a local image with ``qemu-nbd`` for the duration
of an ``async with`` block; :class:`NbdServer` is the same thing as an object
(it exposes the PID, which fault tests need).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import shutil
import signal
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vmigrate.errors import EnvironmentError_, NbdError, StateError, UserError

__all__ = [
    "NBD_STATE_DIRTY",
    "NBD_STATE_HOLE",
    "NBD_STATE_ZERO",
    "ClientState",
    "Extent",
    "NbdClient",
    "NbdError",
    "NbdServer",
    "serve_image",
]

log = logging.getLogger(__name__)

# --- protocol constants (names as in the specification) ---------------------

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
NBD_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_OLD_MAGIC = 0x00420281861253
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_SET_META_CONTEXT = 10

# option replies
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
_REP_ERRORS = {
    NBD_REP_FLAG_ERROR | 1: "NBD_REP_ERR_UNSUP",
    NBD_REP_FLAG_ERROR | 2: "NBD_REP_ERR_POLICY",
    NBD_REP_FLAG_ERROR | 3: "NBD_REP_ERR_INVALID",
    NBD_REP_FLAG_ERROR | 4: "NBD_REP_ERR_PLATFORM",
    NBD_REP_FLAG_ERROR | 5: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_FLAG_ERROR | 6: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_FLAG_ERROR | 7: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_FLAG_ERROR | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_FLAG_ERROR | 9: "NBD_REP_ERR_TOO_BIG",
}

# NBD_OPT_GO information types
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8

# commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
_CMD_NAMES = {0: "read", 1: "write", 2: "disc", 3: "flush", 4: "trim", 6: "write_zeroes",
              7: "block_status"}

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3

# structured reply
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2
_REPLY_TYPE_ERROR_BIT = 1 << 15

#: base:allocation flags
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
#: qemu:dirty-bitmap:NAME flag
NBD_STATE_DIRTY = 1

#: error values on the wire (fixed by the protocol, equal to Linux errno values)
NBD_ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
                   75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}

#: payload limit when the server states none (the specification's default)
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
#: largest request without payload (trim, write zeroes, block status): 32-bit
#: length, kept below 2**31 and 1 MiB aligned so any power-of-two minimum fits
MAX_NOPAYLOAD_REQUEST = (1 << 31) - (1 << 20)
#: option replies during the handshake are small; anything larger is garbage
_MAX_OPTION_REPLY = 1 << 20
#: an NBD string (export or context name) is at most 4096 bytes
_MAX_STRING = 4096
#: a block status chunk larger than this is garbage (qemu sends <= 1 MiB)
_MAX_STATUS_CHUNK = 64 << 20

_STRUCT_REQUEST = struct.Struct(">IHHQQI")
_STRUCT_SIMPLE_TAIL = struct.Struct(">IQ")  # after the 4-byte magic
_STRUCT_CHUNK_TAIL = struct.Struct(">HHQI")  # after the 4-byte magic


@dataclass(frozen=True)
class Extent:
    """A run of bytes with the same block status flags.

    For ``base:allocation``: bit 0 :data:`NBD_STATE_HOLE`, bit 1
    :data:`NBD_STATE_ZERO`. For ``qemu:dirty-bitmap:NAME``: bit 0
    :data:`NBD_STATE_DIRTY`.
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class ClientState(enum.Enum):
    """Where an :class:`NbdClient` is in its life."""

    CONNECTING = "connecting"  # handshake in progress
    READY = "ready"  # negotiated; requests may be sent
    CLOSING = "closing"  # NBD_CMD_DISC sent; waiting for the server to hang up
    CLOSED = "closed"  # closed by the caller
    BROKEN = "broken"  # the connection failed or the server broke the protocol


class _ProtocolViolation(Exception):
    """The server sent something the protocol does not allow (internal)."""


@dataclass(eq=False)
class _Request:
    """One request in flight; completed by the reader task."""

    cmd: int
    offset: int
    length: int
    future: asyncio.Future[None]
    buffer: bytearray | None = None
    covered: list[tuple[int, int]] = field(default_factory=list)
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: NbdError | None = None


def _observe(fut: asyncio.Future[None]) -> None:
    # A split request may fail in several pieces while the caller awaits the
    # first; marking every exception retrieved keeps asyncio from logging them.
    if not fut.cancelled():
        fut.exception()


def _errno_error(what: str, errno: int, message: str = "") -> NbdError:
    name = NBD_ERRNO_NAMES.get(errno, f"errno {errno}")
    text = f"{what}: server replied {name}"
    if message:
        text += f" ({message})"
    return NbdError(text, errno=errno, errno_name=name)


def _parse_address(address: str) -> tuple[str, str, int]:
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        raise UserError(f"NBD address {address!r} is neither unix:PATH nor tcp:HOST:PORT")
    if kind == "unix":
        return "unix", rest, 0
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"NBD address {address!r} is not tcp:HOST:PORT")
        return "tcp", host.strip("[]"), int(port)
    raise UserError(f"NBD address {address!r} is neither unix:PATH nor tcp:HOST:PORT")


class NbdClient:
    """One NBD connection to one export.

    Attributes describe the export as negotiated: :attr:`size` in bytes,
    :attr:`read_only`, :attr:`can_flush`, :attr:`can_write_zeroes`,
    :attr:`can_trim`, :attr:`can_fua`, :attr:`can_multi_conn`,
    :attr:`structured` (structured replies on), block size constraints
    (:attr:`min_block`, :attr:`preferred_block`, :attr:`max_block`) and
    :attr:`contexts` (the granted meta context names).

    The server's minimum block size is reported, not enforced: a caller
    addressing an export with ``min_block > 1`` keeps its requests aligned.
    """

    size: int
    read_only: bool
    can_flush: bool
    can_write_zeroes: bool
    can_trim: bool
    can_fua: bool
    can_multi_conn: bool
    structured: bool
    min_block: int
    preferred_block: int
    max_block: int

    def __init__(self, address: str, export: str) -> None:
        # use connect(); the constructor only sets empty fields
        self.address = address
        self.export = export
        self.state = ClientState.CONNECTING
        self.size = 0
        self.transmission_flags = 0
        self.read_only = True
        self.can_flush = self.can_write_zeroes = self.can_trim = False
        self.can_fua = self.can_multi_conn = self.structured = False
        self.min_block, self.preferred_block, self.max_block = 1, 4096, DEFAULT_MAX_BLOCK
        self._context_ids: dict[str, int] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, _Request] = {}
        self._handles = itertools.count(1)
        self._reader_task: asyncio.Task[None] | None = None
        self._failure: NbdError | None = None

    # --- connecting --------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: str,
        export: str = "",
        *,
        meta_contexts: Sequence[str] = ("base:allocation",),
        timeout: float = 30.0,
    ) -> NbdClient:
        """Connect to ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``) and negotiate.

        Every context in ``meta_contexts`` must be granted by the server.
        Raises :class:`UserError` for a malformed address and :class:`NbdError`
        when the server cannot be reached within ``timeout``, refuses the
        export or a context, or speaks garbage; after a failure no socket is
        left open.
        """
        kind, where, port = _parse_address(address)
        for name in meta_contexts:
            if not name or len(name.encode()) > _MAX_STRING:
                raise UserError(f"meta context name {name!r} is empty or too long")
        if len(export.encode()) > _MAX_STRING:
            raise UserError("NBD export name longer than 4096 bytes")
        client = cls(address, export)
        try:
            async with asyncio.timeout(timeout):
                if kind == "unix":
                    reader, writer = await asyncio.open_unix_connection(where)
                else:
                    reader, writer = await asyncio.open_connection(where, port)
                    sock = writer.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client._reader, client._writer = reader, writer
                await client._handshake(list(meta_contexts))
        except TimeoutError as exc:
            await client._abort_connect()
            raise NbdError(f"NBD {address}: no answer within {timeout:g} s") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            await client._abort_connect()
            raise NbdError(f"NBD {address}: cannot connect: {exc}") from exc
        except _ProtocolViolation as exc:
            await client._abort_connect()
            raise NbdError(f"NBD {address}: bad handshake: {exc}") from exc
        except BaseException:
            await client._abort_connect()
            raise
        client.state = ClientState.READY
        client._reader_task = asyncio.get_running_loop().create_task(
            client._read_loop(), name=f"nbd-reader {address}")
        log.debug("NBD %s export %r: size %d flags %#x contexts %s", address, export,
                  client.size, client.transmission_flags, client.contexts)
        return client

    async def _abort_connect(self) -> None:
        self.state = ClientState.BROKEN
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    @property
    def contexts(self) -> list[str]:
        """Names of the meta contexts the server granted."""
        return list(self._context_ids)

    async def _recv(self, n: int) -> bytes:
        assert self._reader is not None
        return await self._reader.readexactly(n)

    def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)

    async def _handshake(self, contexts: list[str]) -> None:
        magic, second = struct.unpack(">QQ", await self._recv(16))
        if magic != NBD_MAGIC:
            raise _ProtocolViolation(f"greeting magic {magic:#x} is not NBDMAGIC")
        if second == NBD_OLD_MAGIC:
            raise _ProtocolViolation("server speaks the oldstyle protocol")
        if second != NBD_IHAVEOPT:
            raise _ProtocolViolation(f"greeting magic {second:#x} is not IHAVEOPT")
        (hflags,) = struct.unpack(">H", await self._recv(2))
        if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
            raise _ProtocolViolation("server does not offer fixed newstyle negotiation")
        cflags = NBD_FLAG_C_FIXED_NEWSTYLE | (hflags & NBD_FLAG_NO_ZEROES)
        no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        self._send(struct.pack(">I", cflags))

        self._send_option(NBD_OPT_STRUCTURED_REPLY, b"")
        rtype, _ = await self._option_reply(NBD_OPT_STRUCTURED_REPLY)
        if rtype == NBD_REP_ACK:
            self.structured = True
        elif not rtype & NBD_REP_FLAG_ERROR:
            raise _ProtocolViolation(f"unexpected reply {rtype} to NBD_OPT_STRUCTURED_REPLY")

        if contexts:
            await self._set_meta_contexts(contexts)

        export = self.export.encode()
        go = struct.pack(">I", len(export)) + export + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE)
        got_export = False
        block_size: tuple[int, int, int] | None = None
        self._send_option(NBD_OPT_GO, go)
        while True:
            rtype, data = await self._option_reply(NBD_OPT_GO)
            if rtype == NBD_REP_ACK:
                break
            if rtype == NBD_REP_INFO:
                if len(data) < 2:
                    raise _ProtocolViolation("NBD_REP_INFO shorter than its type")
                (info,) = struct.unpack(">H", data[:2])
                if info == NBD_INFO_EXPORT:
                    if len(data) != 12:
                        raise _ProtocolViolation("NBD_INFO_EXPORT of wrong length")
                    size, tflags = struct.unpack(">QH", data[2:])
                    self._set_export(size, tflags)
                    got_export = True
                elif info == NBD_INFO_BLOCK_SIZE:
                    if len(data) != 14:
                        raise _ProtocolViolation("NBD_INFO_BLOCK_SIZE of wrong length")
                    block_size = struct.unpack(">III", data[2:])
                continue  # other information (name, description) is not needed
            if rtype == NBD_REP_ERR_UNSUP:
                await self._export_name(export, no_zeroes)
                got_export = True
                break
            raise self._option_refused("NBD_OPT_GO", rtype, data)
        if not got_export:
            raise _ProtocolViolation("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        if block_size is not None:
            self._set_block_size(*block_size)

    def _send_option(self, opt: int, data: bytes) -> None:
        self._send(struct.pack(">QII", NBD_IHAVEOPT, opt, len(data)) + data)

    async def _option_reply(self, opt: int) -> tuple[int, bytes]:
        """Read one reply to option ``opt``: its type and payload."""
        magic, ropt, rtype, length = struct.unpack(">QIII", await self._recv(20))
        if magic != NBD_REP_MAGIC:
            raise _ProtocolViolation(f"option reply magic {magic:#x}")
        if ropt != opt:
            raise _ProtocolViolation(f"reply to option {ropt} while waiting for {opt}")
        if length > _MAX_OPTION_REPLY:
            raise _ProtocolViolation(f"option reply of {length} bytes")
        return rtype, (await self._recv(length) if length else b"")

    def _option_refused(self, name: str, rtype: int, data: bytes) -> Exception:
        if not rtype & NBD_REP_FLAG_ERROR:
            return _ProtocolViolation(f"unexpected reply type {rtype} to {name}")
        why = _REP_ERRORS.get(rtype, f"error {rtype & ~NBD_REP_FLAG_ERROR}")
        text = data.decode("utf-8", "replace").strip()
        return NbdError(f"NBD {self.address} export {self.export!r}: {name} refused: "
                        f"{why}{': ' + text if text else ''}")

    async def _set_meta_contexts(self, contexts: list[str]) -> None:
        if not self.structured:
            raise NbdError(f"NBD {self.address}: server has no structured replies, so no "
                           f"meta contexts ({', '.join(contexts)})")
        export = self.export.encode()
        body = struct.pack(">I", len(export)) + export + struct.pack(">I", len(contexts))
        for name in contexts:
            raw = name.encode()
            body += struct.pack(">I", len(raw)) + raw
        granted: dict[str, int] = {}
        self._send_option(NBD_OPT_SET_META_CONTEXT, body)
        while True:
            rtype, data = await self._option_reply(NBD_OPT_SET_META_CONTEXT)
            if rtype == NBD_REP_ACK:
                break
            if rtype != NBD_REP_META_CONTEXT:
                raise self._option_refused("NBD_OPT_SET_META_CONTEXT", rtype, data)
            if len(data) < 5 or len(data) > 4 + _MAX_STRING:
                raise _ProtocolViolation("NBD_REP_META_CONTEXT of impossible length")
            (ctx_id,) = struct.unpack(">I", data[:4])
            name = data[4:].decode("utf-8", "replace")
            if name not in contexts or ctx_id in granted.values():
                raise _ProtocolViolation(f"server granted unasked context {name!r} "
                                         f"or reused id {ctx_id}")
            granted[name] = ctx_id
        missing = [c for c in contexts if c not in granted]
        if missing:
            raise NbdError(f"NBD {self.address} export {self.export!r} does not offer meta "
                           f"context(s) {', '.join(missing)}")
        self._context_ids = {c: granted[c] for c in contexts}

    async def _export_name(self, export: bytes, no_zeroes: bool) -> None:
        # old servers: NBD_OPT_EXPORT_NAME has no reply header, only export data
        self._send_option(NBD_OPT_EXPORT_NAME, export)
        size, tflags = struct.unpack(">QH", await self._recv(10))
        if not no_zeroes:
            await self._recv(124)
        self._set_export(size, tflags)

    def _set_export(self, size: int, tflags: int) -> None:
        if size >= 1 << 63:
            raise _ProtocolViolation(f"export size {size} is not a valid offset")
        if not tflags & NBD_FLAG_HAS_FLAGS:
            tflags = 0
        self.size = size
        self.transmission_flags = tflags
        self.read_only = bool(tflags & NBD_FLAG_READ_ONLY)
        self.can_flush = bool(tflags & NBD_FLAG_SEND_FLUSH)
        self.can_fua = bool(tflags & NBD_FLAG_SEND_FUA)
        self.can_trim = bool(tflags & NBD_FLAG_SEND_TRIM)
        self.can_write_zeroes = bool(tflags & NBD_FLAG_SEND_WRITE_ZEROES)
        self.can_multi_conn = bool(tflags & NBD_FLAG_CAN_MULTI_CONN)

    def _set_block_size(self, minimum: int, preferred: int, maximum: int) -> None:
        def pow2(v: int) -> bool:
            return v > 0 and v & (v - 1) == 0

        if not (pow2(minimum) and minimum <= 64 * 1024 and pow2(preferred)
                and preferred >= minimum and maximum >= minimum and maximum % minimum == 0):
            raise _ProtocolViolation(f"impossible block sizes {minimum}/{preferred}/{maximum}")
        self.min_block, self.preferred_block = minimum, preferred
        # payloads are split at the server's maximum, and never above 32 MiB
        cap = min(maximum, DEFAULT_MAX_BLOCK)
        self.max_block = cap - cap % minimum

    # --- sending -----------------------------------------------------------

    def _check_usable(self) -> None:
        if self.state is ClientState.BROKEN:
            raise NbdError(f"NBD {self.address}: connection is broken: {self._failure}")
        if self.state is not ClientState.READY:
            raise StateError(f"NBD {self.address}: client is {self.state.value}")

    def _submit(self, cmd: int, flags: int, offset: int, length: int,
                payload: bytes | memoryview | None = None) -> _Request:
        """Queue one request on the socket (synchronously, so frames never interleave)."""
        self._check_usable()
        assert self._writer is not None
        handle = next(self._handles)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_observe)
        req = _Request(cmd, offset, length, fut,
                       buffer=bytearray(length) if cmd == NBD_CMD_READ else None)
        self._pending[handle] = req
        self._writer.write(_STRUCT_REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, handle,
                                                offset, length))
        if payload is not None:
            self._writer.write(payload)
        return req

    async def _drain(self) -> None:
        assert self._writer is not None
        try:
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            # the reader task sees the same failure and fails the pending requests
            raise NbdError(f"NBD {self.address}: send failed: {exc}") from exc

    async def _run(self, cmd: int, flags: int, offset: int, length: int,
                   payload: bytes | memoryview | None = None) -> _Request:
        req = self._submit(cmd, flags, offset, length, payload)
        await self._drain()
        await req.future
        return req

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UserError(f"NBD range [{offset}, +{length}) outside the export of "
                            f"{self.size} bytes")

    def _check_writable(self) -> None:
        if self.read_only:
            raise StateError(f"NBD {self.address} export {self.export!r} is read-only")

    def _pieces(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        return [(pos, min(limit, offset + length - pos))
                for pos in range(offset, offset + length, limit)]

    # --- public I/O ----------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; holes come back as zeros.

        Longer reads are split at :attr:`max_block` and sent pipelined. Raises
        :class:`UserError` outside the export and :class:`NbdError` on a server
        error (``errno_name`` set) or a lost connection; nothing is returned
        then.
        """
        self._check_range(offset, length)
        if length == 0:
            self._check_usable()
            return b""
        reqs = [self._submit(NBD_CMD_READ, 0, pos, n)
                for pos, n in self._pieces(offset, length, self.max_block)]
        await self._drain()
        for req in reqs:
            await req.future
        if len(reqs) == 1:
            assert reqs[0].buffer is not None
            return bytes(reqs[0].buffer)
        return b"".join(bytes(r.buffer) for r in reqs if r.buffer is not None)

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (split at :attr:`max_block`, pipelined).

        ``fua`` asks for the data to be on stable storage when this returns
        (a flush follows when the server has no FUA). After an
        :class:`NbdError` any part of the range may or may not be written.
        """
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self._check_writable()
        if not view:
            self._check_usable()
            return
        flags = NBD_CMD_FLAG_FUA if fua and self.can_fua else 0
        reqs = [self._submit(NBD_CMD_WRITE, flags, pos, n, view[pos - offset:pos - offset + n])
                for pos, n in self._pieces(offset, len(view), self.max_block)]
        await self._drain()
        for req in reqs:
            await req.future
        if fua and not self.can_fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros.

        With ``may_trim`` the server may deallocate the range (keeps a thin
        target thin); without it ``NBD_CMD_FLAG_NO_HOLE`` asks it to allocate.
        A server without ``WRITE_ZEROES`` gets zero-filled writes instead.
        After an :class:`NbdError` any part of the range may or may not be
        zeroed.
        """
        self._check_range(offset, length)
        self._check_writable()
        if length == 0:
            self._check_usable()
            return
        if not self.can_write_zeroes:
            zeros = bytes(min(length, self.max_block))
            for pos, n in self._pieces(offset, length, self.max_block):
                await self.write(pos, zeros[:n])
            return
        flags = 0 if may_trim else NBD_CMD_FLAG_NO_HOLE
        reqs = [self._submit(NBD_CMD_WRITE_ZEROES, flags, pos, n)
                for pos, n in self._pieces(offset, length, MAX_NOPAYLOAD_REQUEST)]
        await self._drain()
        for req in reqs:
            await req.future

    async def trim(self, offset: int, length: int) -> None:
        """Tell the server ``[offset, offset+length)`` is no longer needed.

        Advisory: the range then reads as anything. A server without TRIM
        makes this a no-op.
        """
        self._check_range(offset, length)
        self._check_writable()
        self._check_usable()
        if length == 0 or not self.can_trim:
            return
        reqs = [self._submit(NBD_CMD_TRIM, 0, pos, n)
                for pos, n in self._pieces(offset, length, MAX_NOPAYLOAD_REQUEST)]
        await self._drain()
        for req in reqs:
            await req.future

    async def flush(self) -> None:
        """Make every completed write durable (a no-op when the server has no
        write cache, i.e. does not offer FLUSH)."""
        self._check_usable()
        if self.can_flush:
            await self._run(NBD_CMD_FLUSH, 0, 0, 0)

    async def block_status(self, offset: int, length: int,
                           context: str = "base:allocation") -> list[Extent]:
        """Extents covering exactly ``[offset, offset+length)``, in order.

        Adjacent extents with equal flags are merged. Raises :class:`UserError`
        for a context not negotiated at connect or a range outside the export,
        :class:`NbdError` on a server error or lost connection.
        """
        return [e async for e in self._status(offset, length, context)]

    async def extents(self, context: str = "base:allocation") -> AsyncIterator[Extent]:
        """Extents of the whole export, in order (see :meth:`block_status`)."""
        async for extent in self._status(0, self.size, context):
            yield extent

    async def _status(self, offset: int, length: int, context: str) -> AsyncIterator[Extent]:
        ctx_id = self._context_ids.get(context)
        if ctx_id is None:
            raise UserError(f"meta context {context!r} was not negotiated (have: "
                            f"{', '.join(self._context_ids) or 'none'})")
        self._check_range(offset, length)
        self._check_usable()
        pos, end = offset, offset + length
        held: Extent | None = None
        while pos < end:
            want = min(end - pos, MAX_NOPAYLOAD_REQUEST)
            req = await self._run(NBD_CMD_BLOCK_STATUS, 0, pos, want)
            descriptors = req.status.get(ctx_id)
            if descriptors is None:
                raise NbdError(f"NBD {self.address}: block status reply lacks context "
                               f"{context!r}")
            stop = pos + want
            for elen, eflags in descriptors:
                take = min(elen, stop - pos)  # the last extent may run past the request
                if held is not None and held.flags == eflags:
                    held = Extent(held.offset, held.length + take, eflags)
                else:
                    if held is not None:
                        yield held
                    held = Extent(pos, take, eflags)
                pos += take
                if pos >= stop:
                    break
        if held is not None:
            yield held

    # --- the reader task -----------------------------------------------------

    async def _read_loop(self) -> None:
        failure: NbdError
        try:
            while True:
                try:
                    head = await self._recv(4)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    break  # clean EOF between replies
                (magic,) = struct.unpack(">I", head)
                if magic == NBD_SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == NBD_STRUCTURED_REPLY_MAGIC and self.structured:
                    await self._chunk()
                else:
                    raise _ProtocolViolation(f"reply magic {magic:#x}")
            if self.state is ClientState.CLOSING:
                failure = NbdError(f"NBD {self.address}: connection closed by the client")
            else:
                failure = NbdError(f"NBD {self.address}: server closed the connection")
        except asyncio.CancelledError:
            failure = NbdError(f"NBD {self.address}: connection closed by the client")
            self._fail(failure)
            raise
        except (OSError, asyncio.IncompleteReadError) as exc:
            failure = NbdError(f"NBD {self.address}: connection lost: {exc!r}")
        except _ProtocolViolation as exc:
            failure = NbdError(f"NBD {self.address}: protocol violation: {exc}")
        self._fail(failure)

    def _fail(self, failure: NbdError) -> None:
        """End the connection: fail every pending request with ``failure``."""
        if self.state is ClientState.CLOSING:
            self.state = ClientState.CLOSED
        elif self.state is ClientState.READY:
            self.state = ClientState.BROKEN
            self._failure = failure
            log.warning("%s", failure)
        pending, self._pending = self._pending, {}
        for req in pending.values():
            if not req.future.done():
                req.future.set_exception(NbdError(str(failure)))
        if self._writer is not None:
            self._writer.close()

    def _take(self, handle: int) -> _Request:
        req = self._pending.get(handle)
        if req is None:
            raise _ProtocolViolation(f"reply for unknown handle {handle}")
        return req

    def _complete(self, handle: int, req: _Request) -> None:
        del self._pending[handle]
        if req.future.done():  # the caller gave up (cancelled)
            return
        if req.error is not None:
            req.future.set_exception(req.error)
        else:
            req.future.set_result(None)

    def _what(self, req: _Request) -> str:
        return (f"NBD {self.address} {_CMD_NAMES.get(req.cmd, req.cmd)} "
                f"[{req.offset}, +{req.length})")

    async def _simple_reply(self) -> None:
        error, handle = _STRUCT_SIMPLE_TAIL.unpack(await self._recv(_STRUCT_SIMPLE_TAIL.size))
        req = self._take(handle)
        if error:
            req.error = _errno_error(self._what(req), error)
        elif req.cmd == NBD_CMD_READ:
            if self.structured:
                raise _ProtocolViolation("simple reply with data to a read under structured "
                                         "replies")
            assert req.buffer is not None
            req.buffer[:] = await self._recv(req.length)
        elif req.cmd == NBD_CMD_BLOCK_STATUS:
            raise _ProtocolViolation("simple success reply to block status")
        self._complete(handle, req)

    async def _chunk(self) -> None:
        flags, ctype, handle, length = _STRUCT_CHUNK_TAIL.unpack(
            await self._recv(_STRUCT_CHUNK_TAIL.size))
        req = self._take(handle)
        if ctype == NBD_REPLY_TYPE_NONE:
            if length != 0 or not flags & NBD_REPLY_FLAG_DONE:
                raise _ProtocolViolation("NBD_REPLY_TYPE_NONE with payload or not final")
        elif ctype == NBD_REPLY_TYPE_OFFSET_DATA:
            await self._chunk_data(req, length)
        elif ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != NBD_CMD_READ or length != 12:
                raise _ProtocolViolation("misplaced or malformed NBD_REPLY_TYPE_OFFSET_HOLE")
            offset, size = struct.unpack(">QI", await self._recv(12))
            self._cover(req, offset, size)  # the buffer is zero-filled already
        elif ctype == NBD_REPLY_TYPE_BLOCK_STATUS:
            await self._chunk_status(req, length)
        elif ctype & _REPLY_TYPE_ERROR_BIT:
            await self._chunk_error(req, ctype, length)
        else:
            raise _ProtocolViolation(f"unknown reply chunk type {ctype}")
        if flags & NBD_REPLY_FLAG_DONE:
            if req.error is None:
                self._check_complete(req)
            self._complete(handle, req)

    def _cover(self, req: _Request, offset: int, size: int) -> None:
        if size == 0 or offset < req.offset or offset + size > req.offset + req.length:
            raise _ProtocolViolation(f"read chunk [{offset}, +{size}) outside the request "
                                     f"[{req.offset}, +{req.length})")
        req.covered.append((offset, size))

    async def _chunk_data(self, req: _Request, length: int) -> None:
        if req.cmd != NBD_CMD_READ or length <= 8 or length > req.length + 8:
            raise _ProtocolViolation("misplaced or malformed NBD_REPLY_TYPE_OFFSET_DATA")
        (offset,) = struct.unpack(">Q", await self._recv(8))
        size = length - 8
        self._cover(req, offset, size)
        data = await self._recv(size)
        assert req.buffer is not None
        start = offset - req.offset
        req.buffer[start:start + size] = data

    async def _chunk_status(self, req: _Request, length: int) -> None:
        if (req.cmd != NBD_CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8
                or length > _MAX_STATUS_CHUNK):
            raise _ProtocolViolation("misplaced or malformed NBD_REPLY_TYPE_BLOCK_STATUS")
        raw = await self._recv(length)
        (ctx_id,) = struct.unpack(">I", raw[:4])
        if ctx_id not in self._context_ids.values() or ctx_id in req.status:
            raise _ProtocolViolation(f"block status for unknown or repeated context {ctx_id}")
        descriptors = list(struct.iter_unpack(">II", raw[4:]))
        covered = 0
        for i, (elen, _) in enumerate(descriptors):
            if elen == 0:
                raise _ProtocolViolation("block status extent of length 0")
            if covered >= req.length:
                raise _ProtocolViolation(f"block status extent {i} lies past the request")
            covered += elen
        req.status[ctx_id] = descriptors

    async def _chunk_error(self, req: _Request, ctype: int, length: int) -> None:
        if length < 6 or length > 6 + 65535 + 8:
            raise _ProtocolViolation(f"error chunk of length {length}")
        raw = await self._recv(length)
        errno, mlen = struct.unpack(">IH", raw[:6])
        tail = length - 6 - mlen
        if errno == 0 or tail < 0 or (ctype == NBD_REPLY_TYPE_ERROR and tail != 0) or (
                ctype == NBD_REPLY_TYPE_ERROR_OFFSET and tail != 8):
            raise _ProtocolViolation(f"malformed error chunk (type {ctype}, errno {errno})")
        message = raw[6:6 + mlen].decode("utf-8", "replace")
        if ctype == NBD_REPLY_TYPE_ERROR_OFFSET:
            (where,) = struct.unpack(">Q", raw[6 + mlen:])
            if not req.offset <= where < req.offset + max(req.length, 1):
                raise _ProtocolViolation(f"error offset {where} outside the request")
            message = f"at offset {where}{': ' + message if message else ''}"
        if req.error is None:  # the first error is the one reported
            req.error = _errno_error(self._what(req), errno, message)

    def _check_complete(self, req: _Request) -> None:
        if req.cmd == NBD_CMD_READ and self.structured:
            pos = req.offset
            for offset, size in sorted(req.covered):
                if offset != pos:
                    raise _ProtocolViolation(f"read reply chunks overlap or leave a gap at "
                                             f"{min(offset, pos)}")
                pos += size
            if pos != req.offset + req.length:
                raise _ProtocolViolation(f"read reply ends at {pos}, short of the request")
        elif req.cmd == NBD_CMD_BLOCK_STATUS and not req.status:
            raise _ProtocolViolation("block status reply without any extents")

    # --- closing -------------------------------------------------------------

    async def close(self, timeout: float = 10.0) -> None:
        """Send ``NBD_CMD_DISC`` and close the connection; idempotent.

        Requests already sent get their replies if the server sends them
        within ``timeout``; any still pending then fail with
        :class:`NbdError`. Afterwards the client is ``CLOSED`` (or stays
        ``BROKEN``) and no socket or task is left behind.
        """
        if self.state is ClientState.READY and self._writer is not None:
            self.state = ClientState.CLOSING
            try:
                self._writer.write(_STRUCT_REQUEST.pack(
                    NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, next(self._handles), 0, 0))
                await self._writer.drain()
                if self._writer.can_write_eof():
                    self._writer.write_eof()
            except (OSError, RuntimeError):
                pass  # the server is gone already; the reader task notices
        task = self._reader_task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.state in (ClientState.READY, ClientState.CLOSING):
            self.state = ClientState.CLOSED
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


# --- qemu-nbd -------------------------------------------------------------------

#: sun_path holds 108 bytes including the terminating NUL
_MAX_SOCKET_PATH = 107
_STDERR_KEEP = 64 * 1024


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class NbdServer:
    """A ``qemu-nbd`` child process exporting one image on a unix socket.

    Start it with :meth:`start`, stop it with :meth:`stop` (or use
    :func:`serve_image`). Only the PID this object started is ever signalled.
    """

    def __init__(self, proc: asyncio.subprocess.Process, socket_path: Path,
                 argv: list[str]) -> None:
        self.proc = proc
        self.socket_path = socket_path
        self.argv = argv
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def stderr(self) -> str:
        """What qemu-nbd wrote to stderr so far (the last 64 KiB)."""
        return self._stderr.decode("utf-8", "replace")

    @classmethod
    async def start(
        cls,
        path: str | Path,
        fmt: str,
        socket_path: str | Path,
        *,
        read_only: bool = True,
        bitmap: str | None = None,
        cache: str = "writeback",
        shared: int = 8,
        export: str = "",
        timeout: float = 10.0,
        force_share: bool = False,
    ) -> NbdServer:
        """Start ``qemu-nbd`` and wait until its socket accepts connections.

        Writable exports get ``--discard=unmap --detect-zeroes=unmap`` so
        zeroed ranges are deallocated. Raises :class:`EnvironmentError_` when
        qemu-nbd is not installed, :class:`UserError` for a socket path too
        long, :class:`NbdError` (with qemu-nbd's stderr) when it exits or does
        not listen within ``timeout``; no process is left running then.
        """
        binary = shutil.which("qemu-nbd")
        if binary is None:
            raise EnvironmentError_("qemu-nbd not found: install qemu-utils")
        sock = Path(socket_path)
        if len(str(sock).encode()) > _MAX_SOCKET_PATH:
            raise UserError(f"socket path {sock} longer than {_MAX_SOCKET_PATH} bytes")
        argv = [binary, f"--socket={sock}", f"--format={fmt}", f"--shared={shared}",
                "--persistent", f"--cache={cache}", f"--export-name={export}"]
        if read_only:
            argv.append("--read-only")
            if force_share:  # a running QEMU holds the image's write lock
                argv.append("--force-share")
        else:
            argv += ["--discard=unmap", "--detect-zeroes=unmap"]
        if bitmap is not None:
            argv.append(f"--bitmap={bitmap}")
        argv.append(str(path))
        _unlink(sock)  # a stale socket would be mistaken for the new server
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise NbdError(f"cannot run {binary}: {exc}") from exc
        server = cls(proc, sock, argv)
        server._stderr_task = asyncio.get_running_loop().create_task(server._collect())
        try:
            await server._wait_listening(timeout)
        except BaseException:
            await server.stop()
            raise
        log.debug("qemu-nbd pid %d serves %s on %s", proc.pid, path, sock)
        return server

    async def _collect(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self._stderr += chunk
            del self._stderr[:-_STDERR_KEEP]

    async def _wait_listening(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc.returncode is not None:
                if self._stderr_task is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self._stderr_task), 2)
                raise NbdError(f"qemu-nbd exited {self.proc.returncode}: "
                               f"{self.stderr.strip() or 'no error output'}")
            try:
                _, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError:
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if loop.time() > deadline:
                raise NbdError(f"qemu-nbd (pid {self.pid}) did not listen on "
                               f"{self.socket_path} within {timeout:g} s: {self.stderr.strip()}")
            await asyncio.sleep(0.02)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop the process (SIGTERM, SIGKILL after ``grace`` s), reap it and
        remove the socket. Idempotent; safe after the process died."""
        try:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), grace)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.kill()
                    await self.proc.wait()
        except asyncio.CancelledError:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            raise
        finally:
            if self._stderr_task is not None and not self._stderr_task.done():
                self._stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._stderr_task
            _unlink(self.socket_path)


@asynccontextmanager
async def serve_image(
    path: str | Path,
    fmt: str,
    socket_path: str | Path,
    *,
    read_only: bool = True,
    bitmap: str | None = None,
    cache: str = "writeback",
    shared: int = 8,
    force_share: bool = False,
) -> AsyncIterator[str]:
    """Export ``path`` with qemu-nbd for the ``async with`` block; yields ``unix:SOCKET``.

    See :meth:`NbdServer.start` for options and errors. On exit the server
    is stopped and reaped and the socket removed, whatever happened inside.
    """
    server = await NbdServer.start(path, fmt, socket_path, read_only=read_only,
                                   bitmap=bitmap, cache=cache, shared=shared,
                                   force_share=force_share)
    try:
        yield server.address
    finally:
        await server.stop()
