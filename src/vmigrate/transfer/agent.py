"""The two ends of a transfer as processes on a host (``vmigrate transfer send`` and
``vmigrate transfer receive``), started by the controller over SSH.

Contract with the controller:

* stdin's first line is the transfer key in hex (never argv, which ``ps``
  shows). With ``--stdio`` the stream follows on stdin/stdout; otherwise the
  stream is a TCP connection and the end of stdin means the controller is
  gone, so the process stops (the receiver keeps what it committed).
* stderr carries JSON lines: ``{"event": "listening", "port": N}``,
  ``{"event": "progress", ...}``, ``{"event": "done", ...}`` and
  ``{"event": "error", "error": ..., "integrity": bool}``. Other lines are logs.
* Exit status: 0 done, 1 failed (resumable), 6 integrity failure, 2 bad request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

from vmigrate.errors import TransferError, TransferIntegrityError, UserError, VmigrateError
from vmigrate.progress import Event
from vmigrate.transfer import engine
from vmigrate.transfer.crypto import parse_key
from vmigrate.transfer.disks import open_nbd, open_source
from vmigrate.transfer.engine import Manifest, SendOptions
from vmigrate.transfer.journal import Geometry

_silenced = False


def emit(event: str, **fields: Any) -> None:
    """One event line on stderr. Once nobody reads stderr any more (the controller
    died) events are dropped: the work goes on to its natural end."""
    global _silenced
    if _silenced:
        return
    try:
        sys.stderr.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silenced = True


def _progress(ev: Event) -> None:
    """A ``progress`` line: ``total`` and ``done`` image bytes, then the engine's counts
    (:meth:`vmigrate.transfer.engine.Progress.event`), as before Events existed."""
    emit("progress", total=ev.total, done=ev.done, **ev.figures)


def _grow_pipe(fd: int) -> None:
    """1 MiB pipe buffers instead of 64 KiB: a quarter of the wakeups per MiB."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ; not a pipe or over the limit: fine


async def _stdin() -> asyncio.StreamReader:
    _grow_pipe(sys.stdin.fileno())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = await _stdin()
    _grow_pipe(sys.stdout.fileno())
    w_transport, w_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(sys.stdout.fileno(), "wb", 0))
    writer = asyncio.StreamWriter(w_transport, w_protocol, reader, loop)
    return reader, writer


async def _read_key(reader: asyncio.StreamReader) -> bytes:
    return parse_key((await reader.readline()).decode(errors="replace"))


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


async def _guarded(work: Awaitable[Any], stdin: asyncio.StreamReader, *,
                   grace: float = 0.0) -> None:
    """Run ``work``; stop it when stdin closes (the controller went away), after
    ``grace`` seconds in which it may still finish (the receiver uses them to
    write what the sender had already sent)."""
    main = asyncio.ensure_future(work)
    life = asyncio.create_task(_until_eof(stdin))
    done, _ = await asyncio.wait([main, life], return_when=asyncio.FIRST_COMPLETED)
    if main not in done and grace > 0:
        done, _ = await asyncio.wait([main], timeout=grace)
    if main in done:
        life.cancel()
        main.result()
        return
    main.cancel()
    with suppress(asyncio.CancelledError):
        await main
    raise TransferError("the controller went away (stdin closed); stopped")


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"expected ADDRESS:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run(main: Callable[[], Awaitable[None]]) -> int:
    """Run an agent coroutine; report failure as an event and an exit status."""
    try:
        asyncio.run(main())  # type: ignore[arg-type]
    except TransferIntegrityError as exc:
        emit("error", error=str(exc), integrity=True)
        return 6
    except VmigrateError as exc:
        emit("error", error=str(exc), integrity=False, request=isinstance(exc, UserError))
        return exc.exit_code
    except KeyboardInterrupt:
        emit("error", error="interrupted", integrity=False)
        return 130
    except Exception as exc:  # a bug: say so in the event, with the traceback in the log
        import traceback
        traceback.print_exc()
        emit("error", error=f"internal error: {exc!r}", integrity=False)
        return 1
    return 0


async def receive(target: Path, *, listen: str | None) -> None:
    """``vmigrate transfer receive``: one session into ``target``."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vmxfer-"))
    try:
        if listen is None:
            reader, writer = await _stdio()
            key = await _read_key(reader)
            res = await engine.receive(reader, writer, key, target, sock_dir=sock_dir,
                                       progress=_progress)
            emit("done", final=res.final, resumed=res.resumed, verified=res.verified,
                 **res.progress.as_dict())
            return
        stdin = await _stdin()
        key = await _read_key(stdin)
        host, port = _split_hostport(listen)
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.get_running_loop().create_future()

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if accepted.done():
                w.close()
                return
            accepted.set_result((r, w))

        try:
            server = await asyncio.start_server(on_conn, host, port, limit=1 << 22)
        except OSError as exc:
            raise TransferError(f"cannot listen on {listen}: {exc.strerror}") from exc

        async def session() -> None:
            async with server:
                emit("listening", port=server.sockets[0].getsockname()[1])
                r, w = await asyncio.wait_for(accepted, 120)
                server.close()
                try:
                    res = await engine.receive(r, w, key, target, sock_dir=sock_dir,
                                               progress=_progress)
                finally:
                    w.close()
                emit("done", final=res.final, resumed=res.resumed, verified=res.verified,
                     **res.progress.as_dict())

        await _guarded(session(), stdin, grace=15.0)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


async def send(*, source: Path | None, source_format: str | None, nbd: str | None,
               export: str, bitmap: str | None, delta: bool, connect: str | None,
               manifest: Path | None, opts: SendOptions) -> None:
    """``vmigrate transfer send``: one session from a local image or an NBD export."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vmxfer-"))
    try:
        async with AsyncExitStack() as stack:
            if nbd is not None:
                src: Any = await stack.enter_async_context(
                    open_nbd(nbd, export, bitmap if delta else None))
            elif source is not None:
                src = await stack.enter_async_context(
                    open_source(source, source_format, sock_dir=sock_dir))
            else:
                raise UserError("give --source PATH or --nbd ADDRESS")
            g = Geometry(src.size, opts.chunk_size, opts.target_format)
            man = Manifest.load(manifest, g) if delta and manifest is not None else None
            if delta and man is None:
                raise UserError("--delta needs --manifest from the base copy")
            dirty = await src.dirty() if delta else None

            async def session(r: Any, w: Any) -> None:
                p, done, new_man = await engine.send(src, r, w, key, opts, manifest=man,
                                                     dirty=dirty, progress=_progress)
                if manifest is not None:
                    new_man.save(manifest)
                emit("done", receiver=done, **p.as_dict())

            if connect is None:
                reader, writer = await _stdio()
                key = await _read_key(reader)
                await session(reader, writer)
                return
            stdin = await _stdin()
            key = await _read_key(stdin)
            host, port = _split_hostport(connect)
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=1 << 22), 30)
            except (OSError, TimeoutError) as exc:
                raise TransferError(f"cannot connect to the receiver at {connect}: {exc}"
                                    ) from exc

            async def run_session() -> None:
                try:
                    await session(r, w)
                finally:
                    # Let the frames already written reach the receiver, which keeps
                    # them: half-close, and read until it closes too. Closing with its
                    # acks unread would send a reset, and a reset makes the receiving
                    # kernel drop what it holds.
                    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
                        w.write_eof()
                        await asyncio.wait_for(_until_eof(r), 15)
                    w.close()

            await _guarded(run_session(), stdin)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
