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
* Exit status: 0 done, 1 failed (resumable), 6 integrity failure, 2 bad request,
  8 the destination is out of space (``"space": true`` in the error event; resumable).
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

from vmigrate.errors import (
    DestinationFullError,
    TransferError,
    TransferIntegrityError,
    TransferStalledError,
    UserError,
    VmigrateError,
)
from vmigrate.progress import Event
from vmigrate.transfer import engine, wire
from vmigrate.transfer.confine import Destination, open_destination
from vmigrate.transfer.crypto import parse_key
from vmigrate.transfer.disks import open_nbd, open_source
from vmigrate.transfer.engine import Hello, Manifest, SendOptions
from vmigrate.transfer.journal import Geometry
from vmigrate.transfer.wire import Channel

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
                   grace: float = 0.0, life: asyncio.Task[None] | None = None) -> None:
    """Run ``work``; stop it when stdin closes (the controller went away), after
    ``grace`` seconds in which it may still finish (the receiver uses them to
    write what the sender had already sent). ``life``: a task already reading
    stdin to its end."""
    main = asyncio.ensure_future(work)
    if life is None:
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


async def _space_mapped(main: Callable[[], Awaitable[None]]) -> None:
    """``main()``, with a full destination (ENOSPC, EDQUOT, however wrapped) raised as
    :class:`DestinationFullError`: its own event field (``space``) and exit status (8)."""
    try:
        await main()
    except Exception as exc:
        if DestinationFullError.found_in(exc) and not isinstance(exc, DestinationFullError):
            raise DestinationFullError(
                f"the destination is out of space ({exc}); the partial copy is kept: "
                "free space and rerun to resume") from exc
        raise


def run(main: Callable[[], Awaitable[None]]) -> int:
    """Run an agent coroutine; report failure as an event and an exit status."""
    try:
        asyncio.run(_space_mapped(main))
    except TransferIntegrityError as exc:
        emit("error", error=str(exc), integrity=True)
        return 6
    except VmigrateError as exc:
        emit("error", error=str(exc), integrity=False, request=isinstance(exc, UserError),
             space=isinstance(exc, DestinationFullError))
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


#: how long a listening receiver waits for a connection that authenticates
ACCEPT_S: float = 60.0
#: how long one connection may take to prove it holds the key
HANDSHAKE_S: float = 10.0
#: connections proving themselves at once; more are closed at once
MAX_PENDING: int = 64


class _Acceptor:
    """Accepts connections until one proves it holds the transfer key (its HELLO
    authenticates); every other connection is closed, whatever it sent, so nobody
    else on the network can take the receiver's one session or end it."""

    def __init__(self, key: bytes, stall_s: float) -> None:
        self.key = key
        self.stall_s = stall_s
        self.chosen: asyncio.Future[tuple[asyncio.StreamWriter, Channel, Hello]] = \
            asyncio.get_running_loop().create_future()
        self.refused = 0
        self.closing = False
        self.pending: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def on_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.closing or self.chosen.done() or len(self.pending) >= MAX_PENDING:
            w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.pending[task] = w
        peer = w.get_extra_info("peername")
        try:
            wire.tune_socket(w, self.stall_s)
            async with asyncio.timeout(HANDSHAKE_S):
                ch, hello = await engine.handshake(r, w, self.key, stall_s=self.stall_s)
        except (VmigrateError, TimeoutError, OSError) as exc:
            w.close()
            if not self.closing:
                self.refused += 1
                emit("refused", peer=str(peer), reason=str(exc) or type(exc).__name__)
            return
        finally:
            self.pending.pop(task, None)
        if self.closing or self.chosen.done():
            w.close()
            return
        self.chosen.set_result((w, ch, hello))

    def failure(self, why: str) -> VmigrateError:
        if self.refused:
            return TransferIntegrityError(
                f"{why}; {self.refused} connection(s) did not authenticate (wrong key, or "
                "not a vmigrate sender) and were closed")
        return TransferError(why)

    async def close(self) -> None:
        """Close every connection still proving itself, and wait for their handlers."""
        self.closing = True
        tasks = list(self.pending)
        for w in self.pending.values():
            w.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


async def receive(target: Path, *, allowed: list[Path], overwrite: bool,
                  listen: str | None, stall_s: float = wire.STALL_S) -> None:
    """``vmigrate transfer receive``: one session into ``target``.

    Before it reads the key or listens, the target is checked against ``allowed``
    and its directory opened (:func:`~vmigrate.transfer.confine.open_destination`),
    and an existing target (without ``overwrite``), partial copy or journal that is
    not ours is refused: a :class:`UserError` (exit 2) with nothing written.

    With ``listen``, connections are accepted until one authenticates (at most
    :data:`ACCEPT_S`); that one is the session, every other is closed."""
    with open_destination(target, allowed) as dest:
        dest.check(overwrite=overwrite)
        sock_dir = Path(tempfile.mkdtemp(prefix="vmxfer-"))
        try:
            await _receive(dest, overwrite, listen, sock_dir, stall_s)
        finally:
            shutil.rmtree(sock_dir, ignore_errors=True)


async def _receive(dest: Destination, overwrite: bool, listen: str | None, sock_dir: Path,
                   stall_s: float) -> None:
    def done(res: engine.ReceiveResult) -> None:
        emit("done", final=res.final, resumed=res.resumed, verified=res.verified,
             **res.progress.as_dict())

    if listen is None:
        reader, writer = await _stdio()
        key = await _read_key(reader)
        done(await engine.receive(reader, writer, key, dest, overwrite=overwrite,
                                  sock_dir=sock_dir, progress=_progress, stall_s=stall_s))
        return
    stdin = await _stdin()
    key = await _read_key(stdin)
    await serve(dest, key, stdin, overwrite=overwrite, listen=listen, sock_dir=sock_dir,
                stall_s=stall_s)


async def serve(dest: Destination, key: bytes, stdin: asyncio.StreamReader, *,
                overwrite: bool, listen: str, sock_dir: Path, stall_s: float) -> None:
    """Listen on ``listen``, take the first connection that authenticates as the
    session (at most :data:`ACCEPT_S` s, or until ``stdin`` ends), and receive it.
    Raises :class:`TransferIntegrityError` when connections came but none
    authenticated, :class:`TransferError` when none came."""
    host, port = _split_hostport(listen)
    acceptor = _Acceptor(key, stall_s)
    try:
        server = await asyncio.start_server(acceptor.on_conn, host, port, limit=1 << 22)
    except OSError as exc:
        raise TransferError(f"cannot listen on {listen}: {exc.strerror}") from exc
    life = asyncio.create_task(_until_eof(stdin))
    try:
        emit("listening", port=server.sockets[0].getsockname()[1])
        waiters: list[asyncio.Future[Any]] = [acceptor.chosen, life]
        await asyncio.wait(waiters, timeout=ACCEPT_S, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        life.cancel()
        raise
    finally:
        server.close()  # no new connection; the chosen one stays open
        await acceptor.close()
        if not acceptor.chosen.done():
            acceptor.chosen.cancel()
    if acceptor.chosen.cancelled():
        gone = life.done()
        life.cancel()
        if gone:
            raise acceptor.failure("the controller went away (stdin closed) before a sender "
                                   "authenticated")
        raise acceptor.failure(f"no sender authenticated within {ACCEPT_S:g} s")
    w, ch, hello = acceptor.chosen.result()
    if life.done():
        w.close()
        raise TransferError("the controller went away (stdin closed); stopped")

    async def session() -> None:
        try:
            res = await engine.receive_session(ch, hello, dest, overwrite=overwrite,
                                               sock_dir=sock_dir, progress=_progress)
        finally:
            w.close()
        emit("done", final=res.final, resumed=res.resumed, verified=res.verified,
             **res.progress.as_dict())

    await _guarded(session(), stdin, grace=15.0, life=life)


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

            wire.tune_socket(w)

            async def run_session() -> None:
                linger = 2.0
                try:
                    await session(r, w)
                except asyncio.CancelledError:
                    linger = 15.0  # the controller went away: let the receiver keep more
                    raise
                except TransferStalledError:
                    linger = 0.0  # the link is gone: nothing more will reach it
                    raise
                finally:
                    # Let the frames already written reach the receiver, which keeps
                    # them: half-close, and read until it closes too. Closing with its
                    # acks unread would send a reset, and a reset makes the receiving
                    # kernel drop what it holds.
                    if linger:
                        with contextlib.suppress(OSError, ConnectionError, TimeoutError,
                                                 RuntimeError):
                            w.write_eof()
                            await asyncio.wait_for(_until_eof(r), linger)
                        w.close()
                    else:
                        w.transport.abort()

            await _guarded(run_session(), stdin)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
