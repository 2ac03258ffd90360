"""A minimal QMP server on a unix socket, for unit tests of the QMP layer.

It speaks the real wire protocol (greeting, capabilities negotiation, one JSON
object per line) and answers commands from a table: a value becomes
``{"return": value}``, an :class:`Error` becomes ``{"error": ...}``, and
:data:`HANGUP` closes the connection without answering.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Error:
    """A QMP error reply."""

    cls: str
    desc: str


HANGUP = object()


@dataclass
class FakeQmpServer:
    """Serve ``replies`` on ``path``; ``received`` records every command seen."""

    path: str
    replies: dict[str, Any] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeQmpServer:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                        "package": "fake"}, "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\n")
        decoder = json.JSONDecoder()
        buf = ""
        try:
            while chunk := await reader.read(65536):
                # QMP is a stream of JSON objects, not lines: clients need not send newlines
                buf += chunk.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break  # incomplete: wait for more
                    buf = buf.lstrip()[end:]
                    if not await self._answer(msg, writer):
                        return
        finally:
            writer.close()

    async def _answer(self, msg: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        """Reply to one command; False means hang up."""
        self.received.append(msg)
        cmd = str(msg.get("execute"))
        reply: dict[str, Any]
        if cmd == "qmp_capabilities":
            reply = {"return": {}}
        else:
            value = self.replies.get(
                cmd, Error("CommandNotFound", f"The command {cmd} has not been found")
            )
            if value is HANGUP:
                return False
            if isinstance(value, Error):
                reply = {"error": {"class": value.cls, "desc": value.desc}}
            else:
                reply = {"return": value}
        if "id" in msg:
            reply["id"] = msg["id"]
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        return True
