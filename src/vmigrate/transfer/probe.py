"""Host-side measurements for ``vmigrate assess``: the migration link's usable
bandwidth, and how well a disk's data compresses.

They run as ``vmigrate transfer probe-sink``, ``probe-send`` and ``sample`` on the
hosts, and speak like the transfer ends (:mod:`vmigrate.transfer.agent`): JSON
event lines on stderr (``listening``, ``done``, ``error``), exit status 0 on
success.

* The link probe sends incompressible bytes over one TCP connection for a
  fixed time. The *receiver* counts what arrived, after a warm-up (slow start,
  the shaper's initial burst), so the figure is what a long stream gets.
* The sample reads up to ``chunks`` chunks spread evenly over a disk's
  allocated data, counts those that are all zeros (the transfer engine sends
  nothing for them) and zstd-compresses the rest at the engine's middle level.
  The ratio is bytes the engine would send / allocated bytes read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import zstandard

from vmigrate.errors import TransferError, UserError
from vmigrate.transfer.agent import _split_hostport, emit
from vmigrate.transfer.disks import Range, open_source

#: seconds at the start of a probe that are not counted (slow start, tbf burst)
WARMUP_S = 0.3
#: zstd level for the sample: the engine's level when neither CPU nor link is short
SAMPLE_LEVEL = 3
SAMPLE_CHUNK = 1 << 20


async def sink(listen: str, seconds: float) -> None:
    """Accept one connection on ``listen`` and count what arrives for ``seconds``
    (plus the warm-up); emit ``done`` with ``bytes``, ``seconds`` and ``rate``."""
    host, port = _split_hostport(listen)
    arrived: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted, t_begin, t_first, t_last = 0, 0.0, 0.0, 0.0
        try:
            while True:
                data = await reader.read(1 << 20)
                now = time.monotonic()
                if not data:
                    break
                if not t_begin:
                    t_begin = now + WARMUP_S
                if now < t_begin:
                    continue
                if not t_first:  # what arrived up to now belongs to the warm-up
                    t_first = now
                    continue
                counted, t_last = counted + len(data), now
                if now - t_first >= seconds:
                    break
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        if not arrived.done():
            arrived.set_result((counted, t_last - t_first if t_last else 0.0))

    try:
        server = await asyncio.start_server(on_conn, host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {listen}: {exc.strerror}") from exc
    async with server:
        emit("listening", port=server.sockets[0].getsockname()[1])
        try:
            counted, took = await asyncio.wait_for(arrived, seconds + 30)
        except TimeoutError:
            raise TransferError("link probe: no sender arrived in time") from None
    if took <= 0 or counted <= 0:
        raise TransferError("link probe: the sender stopped before anything was measured")
    emit("done", bytes=counted, seconds=round(took, 4), rate=counted / took)


async def send(connect: str, seconds: float) -> None:
    """Connect to a sink and send incompressible bytes until it hangs up (or
    ``seconds`` plus a margin passed); emit ``done`` with the connect time."""
    host, port = _split_hostport(connect)
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError) as exc:
        raise TransferError(f"link probe: cannot connect to {connect}: {exc}") from exc
    connect_ms = (time.monotonic() - t0) * 1000
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    block = os.urandom(1 << 20)
    sent = 0
    deadline = time.monotonic() + seconds + WARMUP_S + 5
    try:
        while time.monotonic() < deadline:
            writer.write(block)
            await writer.drain()
            sent += len(block)
    except (OSError, ConnectionError):
        pass  # the sink hung up: it has its figure
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()
    del reader
    emit("done", sent=sent, connect_ms=round(connect_ms, 3))


def _picks(ranges: list[Range], chunks: int) -> list[tuple[int, int]]:
    """Up to ``chunks`` (offset, length) pieces spread evenly over the data ranges."""
    data = [r for r in ranges if not r.zero and r.length > 0]
    total = sum(r.length for r in data)
    if total == 0 or chunks <= 0:
        return []
    step = max(SAMPLE_CHUNK, total // chunks)
    picks: list[tuple[int, int]] = []
    pos = 0  # position in the concatenated data ranges
    for r in data:
        while pos < r.length and len(picks) < chunks:
            length = min(SAMPLE_CHUNK, r.length - pos)
            picks.append((r.offset + pos, length))
            pos += step
        pos -= r.length
    return picks


async def sample(path: Path, fmt: str | None, chunks: int) -> None:
    """Emit ``done`` with ``allocated`` (bytes of data the image holds), ``sampled``
    (bytes read), ``zero`` (sampled bytes that were all zeros) and ``ratio``
    (bytes the engine would send per allocated byte, 1.0 when nothing was read)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vmsample-"))
    try:
        async with open_source(path, fmt, sock_dir=sock_dir, force_share=True) as src:
            ranges = await src.allocation()
            allocated = sum(r.length for r in ranges if not r.zero)
            cctx = zstandard.ZstdCompressor(level=SAMPLE_LEVEL)
            sampled = zero = sent = 0
            for offset, length in _picks(ranges, chunks):
                data = await src.read(offset, length)
                sampled += len(data)
                if not data.strip(b"\0"):
                    zero += len(data)
                    continue
                sent += min(len(data), len(cctx.compress(data)))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    emit("done", allocated=allocated, sampled=sampled, zero=zero,
         ratio=round(sent / sampled, 4) if sampled else 1.0)
