"""A scripted NBD server on a unix socket, for tests of the NBD client's parser.

It does not speak NBD: on each connection it sends ``script`` (bytes prepared by the
test: a real handshake from :func:`handshake`, then whatever replies the test wants,
garbage included), reads and discards what the client sends, and closes the
connection ``linger`` seconds after the script is out (or when the client closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

from vmigrate.transfer import nbd

#: the meta context id the scripted handshake grants ``base:allocation``
CONTEXT_ID = 7


def _option_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", nbd.NBD_REP_MAGIC, opt, rtype, len(data)) + data


def handshake(size: int = 1 << 20, *, flags: int | None = None,
              context: str | None = "base:allocation") -> bytes:
    """What a fixed-newstyle server sends for the client's negotiation
    (:meth:`vmigrate.transfer.nbd.NbdClient.connect`): greeting, structured replies
    granted, ``context`` granted as :data:`CONTEXT_ID`, and ``NBD_OPT_GO`` with the
    export's ``size`` and transmission ``flags`` (default: writable, flush, trim, write
    zeroes)."""
    if flags is None:
        flags = (nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_SEND_FLUSH | nbd.NBD_FLAG_SEND_TRIM
                 | nbd.NBD_FLAG_SEND_WRITE_ZEROES)
    out = struct.pack(">QQH", nbd.NBD_MAGIC, nbd.NBD_IHAVEOPT,
                      nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES)
    out += _option_reply(nbd.NBD_OPT_STRUCTURED_REPLY, nbd.NBD_REP_ACK)
    if context is not None:
        out += _option_reply(nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_REP_META_CONTEXT,
                             struct.pack(">I", CONTEXT_ID) + context.encode())
        out += _option_reply(nbd.NBD_OPT_SET_META_CONTEXT, nbd.NBD_REP_ACK)
    out += _option_reply(nbd.NBD_OPT_GO, nbd.NBD_REP_INFO,
                         struct.pack(">HQH", nbd.NBD_INFO_EXPORT, size, flags))
    out += _option_reply(nbd.NBD_OPT_GO, nbd.NBD_REP_ACK)
    return out


def chunk(handle: int, ctype: int, payload: bytes, *, done: bool = True) -> bytes:
    """One structured reply chunk."""
    return struct.pack(">IHHQI", nbd.NBD_STRUCTURED_REPLY_MAGIC,
                       nbd.NBD_REPLY_FLAG_DONE if done else 0, ctype, handle,
                       len(payload)) + payload


def simple_reply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    """One simple reply (and the data of a read, under simple replies)."""
    return struct.pack(">IIQ", nbd.NBD_SIMPLE_REPLY_MAGIC, error, handle) + data


@dataclass
class ScriptedNbdServer:
    """Serve ``script`` on the unix socket ``path`` (``address`` is what the client
    connects to); use as ``async with``."""

    path: str
    script: bytes
    linger: float = 0.5
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def __aenter__(self) -> ScriptedNbdServer:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        drain = asyncio.create_task(self._discard(reader))
        self._tasks.add(drain)
        try:
            writer.write(self.script)
            with contextlib.suppress(OSError, ConnectionError):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drain), self.linger)
        finally:
            drain.cancel()
            self._tasks.discard(drain)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while await reader.read(65536):
                pass
