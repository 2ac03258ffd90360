"""The controller's side of a transfer: start both ends on their hosts, connect
them, relay progress, and turn their outcome into one result or one error.

Two ways to connect the ends:

* ``tcp``: the receiver listens on the destination's migration address and the
  sender connects to it, so the bytes take the migration network and never
  touch the controller (the default between two inventory hosts);
* ``ssh``: both ends speak on their stdin/stdout over their SSH channels and
  the controller relays the bytes, as rsync does (the default when one end is
  this machine).

Either way the stream carries its own AES-256-GCM, so the relay and the
network see only ciphertext; the key goes to each end over SSH on stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from vmigrate.config import HostConfig, Inventory
from vmigrate.errors import (
    DestinationFullError,
    SpecError,
    TransferError,
    TransferIntegrityError,
    UserError,
    VmigrateError,
)
from vmigrate.hosts import Host, HostProcess, LocalHost, open_host
from vmigrate.progress import Event, ProgressFn, guarded
from vmigrate.transfer.confine import allowed_root
from vmigrate.transfer.crypto import new_key
from vmigrate.transfer.engine import SendOptions
from vmigrate.transfer.wire import STALL_S

log = logging.getLogger(__name__)

Transport = Literal["auto", "ssh", "tcp"]
LISTEN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Place:
    """An image's place: an inventory host (None: this machine) and a path there."""

    host: str | None
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}" if self.host else self.path


def parse_place(text: str) -> Place:
    """``HOST:PATH`` or a local ``PATH`` (a colon after a slash belongs to the path)."""
    head, sep, tail = text.partition(":")
    if sep and head and "/" not in head:
        if not tail.startswith("/"):
            raise SpecError(f"{text}: a path on a host must be absolute")
        return Place(head, tail)
    return Place(None, os.path.abspath(text))


@dataclass(frozen=True)
class NbdSource:
    """A running VM's disk, exported by its QEMU on the source host."""

    address: str          # unix:/path or tcp:host:port, as seen on the source host
    export: str
    bitmap: str | None = None
    delta: bool = False   # send only what the bitmap marks dirty


@dataclass
class Outcome:
    """What both ends reported at the end."""

    sender: dict[str, Any] = field(default_factory=dict)
    receiver: dict[str, Any] = field(default_factory=dict)
    transport: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        s = self.sender
        return {
            "transport": self.transport, "seconds": round(self.seconds, 3),
            "image_bytes": s.get("total"), "data_bytes": s.get("data_bytes"),
            "zero_bytes": s.get("zero_bytes"), "skipped_bytes": s.get("skipped_bytes"),
            "resent_bytes": s.get("resent_bytes"), "wire_bytes": s.get("wire_bytes"),
            "verified": self.receiver.get("verified"),
            "resumed": self.receiver.get("resumed"), "final": self.receiver.get("final"),
        }


def _progress_event(fields: dict[str, Any]) -> Event:
    """A sender's ``progress`` line as an Event: image bytes ``done`` of ``total``, its
    other numbers (``wire_bytes``, ``data_bytes`` ...) in ``figures``; what is not a
    number is left out."""

    def whole(value: object) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    figures = {k: v for k, v in fields.items() if k not in ("done", "total")
               and isinstance(v, int | float) and not isinstance(v, bool)}
    return Event(done=whole(fields.get("done")), total=whole(fields.get("total")),
                 figures=figures)


class _End:
    """One running end and what it said on stderr."""

    def __init__(self, name: str, proc: HostProcess, on_progress: ProgressFn | None,
                 *, listens: bool = False) -> None:
        self.name = name
        self.proc = proc
        self.on_progress = on_progress
        self.done: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not listens:
            self.listening.set_result(0)
        self.logs: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                break
            try:
                ev = json.loads(line)
                kind = ev.pop("event")
            except (ValueError, KeyError, TypeError, AttributeError):
                text = line.decode(errors="replace").rstrip()
                self.logs = ([*self.logs, text])[-20:]
                log.debug("%s: %s", self.name, text)
                continue
            if kind == "progress" and self.on_progress:
                self.on_progress(_progress_event(ev))
            elif kind == "listening" and not self.listening.done():
                self.listening.set_result(int(ev["port"]))
            elif kind == "refused":  # a connection that did not prove it holds the key
                log.warning("%s: refused a connection from %s: %s", self.name,
                            ev.get("peer"), ev.get("reason"))
            elif kind == "done":
                self.done = ev
            elif kind == "error":
                self.error = ev
        if not self.listening.done():
            self.listening.set_exception(self.failure("ended before listening"))

    def failure(self, fallback: str) -> VmigrateError:
        if self.error is not None:
            msg = f"{self.name}: {self.error.get('error')}"
            if self.error.get("request"):  # a bad request (target exists, bad path ...)
                return UserError(msg)
            if self.error.get("space"):  # ENOSPC on the receiver: the partial copy is kept
                return DestinationFullError(msg)
            cls = TransferIntegrityError if self.error.get("integrity") else TransferError
            return cls(msg)
        tail = "; ".join(self.logs[-3:])
        return TransferError(f"{self.name}: {fallback}" + (f" ({tail})" if tail else ""))


def _command(cfg: HostConfig | None) -> list[str]:
    return list(cfg.vmigrate_command) if cfg is not None else [sys.executable, "-m", "vmigrate"]


async def _pipe(src: Any, dst: Any) -> None:
    while True:
        data = await src.read(1 << 20)
        if not data:
            with contextlib.suppress(OSError, ConnectionError):
                dst.write_eof()
            return
        dst.write(data)
        await dst.drain()


async def _listening_at(end: _End, addr: str) -> str:
    """``ADDRESS:PORT`` where ``end`` (started with ``--listen addr:0``) accepts."""
    try:
        port = await asyncio.wait_for(end.listening, LISTEN_TIMEOUT_S)
    except TimeoutError as exc:
        raise TransferError(f"the {end.name} did not start listening") from exc
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def sender_args(opts: SendOptions) -> list[str]:
    args = ["--target-format", opts.target_format, "--chunk-size", str(opts.chunk_size),
            "--cipher", opts.cipher, "--compress", opts.compress, "--verify", opts.verify,
            "--window", str(opts.window)]
    if opts.bandwidth:
        args += ["--bandwidth", str(int(opts.bandwidth))]
    if not opts.final:
        args.append("--no-final")
    return args


def allowed_dirs(cfg: HostConfig) -> list[Path]:
    """Where a transfer may write on host ``cfg``: its pools and its ``transfer_dirs``."""
    return [*cfg.pools.values(), *cfg.transfer_dirs]


def receiver_args(dst: str, allowed: list[Path], opts: SendOptions) -> list[str]:
    """The receiver's own decisions, on its command line: where it may write (checked
    here first: a :class:`UserError` before anything starts) and whether it may
    replace an existing target."""
    allowed_root(dst, allowed)
    args = [dst, *(f"--allow-dir={d}" for d in allowed)]
    if opts.overwrite:
        args.append("--overwrite")
    return args


async def copy(inv: Inventory, src: Place | tuple[str, NbdSource], dst: Place,
               opts: SendOptions, *, transport: Transport = "auto",
               source_format: str | None = None, manifest: str | None = None,
               progress: ProgressFn | None = None,
               hosts: dict[str, Host] | None = None) -> Outcome:
    """Copy an image (or, from an :class:`NbdSource`, a running VM's disk) to ``dst``.

    ``progress`` gets an :class:`~vmigrate.progress.Event` about four times a second:
    image bytes ``done`` of ``total``, and the sender's counts in ``figures``
    (``wire_bytes``, ``data_bytes``, ``zero_bytes``, ``skipped_bytes``,
    ``resent_bytes``, ``seconds``); a callback that raises is switched off.

    Raises :class:`TransferError` when it fails (rerunning resumes) and
    :class:`TransferIntegrityError` when the stream or the copy does not verify."""
    src_host_name = src[0] if isinstance(src, tuple) else src.host
    progress = guarded(progress) if progress is not None else None
    opened: list[Host] = []
    hosts = dict(hosts or {})

    def host_of(name: str | None) -> tuple[Host, HostConfig | None]:
        if name is None:
            return LocalHost("local"), None
        cfg = inv.host(name)
        if name not in hosts:
            hosts[name] = open_host(cfg)
            opened.append(hosts[name])
        return hosts[name], cfg

    s_host, s_cfg = host_of(src_host_name)
    d_host, d_cfg = host_of(dst.host)
    if transport == "auto":
        transport = "tcp" if (s_cfg and d_cfg and s_cfg.migration_address
                              and d_cfg.migration_address) else "ssh"
    if transport == "tcp" and d_cfg is not None and not d_cfg.migration_address:
        raise UserError(f"host {d_cfg.name} has no migration_address for --transport tcp")
    if not PurePosixPath(dst.path).is_absolute():
        raise SpecError(f"{dst}: the destination path must be absolute")
    # an inventory host: its pools and transfer_dirs; this machine (no host): the
    # destination's directory, written as whoever runs the command, like cp
    allowed = allowed_dirs(d_cfg) if d_cfg is not None else \
        [Path(os.path.dirname(dst.path))]
    recv_args = receiver_args(dst.path, allowed, opts)

    send_argv = [*_command(s_cfg), "transfer", "send", *sender_args(opts)]
    if isinstance(src, tuple):
        nbd = src[1]
        send_argv += ["--nbd", nbd.address, "--export", nbd.export]
        if nbd.bitmap:
            send_argv += ["--bitmap", nbd.bitmap]
        if nbd.delta:
            send_argv.append("--delta")
    else:
        send_argv += ["--source", src.path]
        if source_format:
            send_argv += ["--source-format", source_format]
    if manifest:
        send_argv += ["--manifest", manifest]
    recv_argv = [*_command(d_cfg), "transfer", "receive", *recv_args]

    key_line = new_key().hex().encode() + b"\n"
    ends: list[_End] = []
    relays: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    try:
        if transport == "tcp":
            addr = d_cfg.migration_address if d_cfg and d_cfg.migration_address else "127.0.0.1"
            recv = _End("receiver", await d_host.spawn([*recv_argv, "--listen", f"{addr}:0"]),
                        None, listens=True)
            ends.append(recv)
            recv.proc.stdin.write(key_line)
            await recv.proc.stdin.drain()
            where = await _listening_at(recv, addr)
            snd = _End("sender", await s_host.spawn([*send_argv, "--connect", where]),
                       progress)
            ends.append(snd)
            snd.proc.stdin.write(key_line)
            await snd.proc.stdin.drain()
        else:
            recv = _End("receiver", await d_host.spawn([*recv_argv, "--stdio"]), None)
            ends.append(recv)
            snd = _End("sender", await s_host.spawn([*send_argv, "--stdio"]), progress)
            ends.append(snd)
            for e in ends:
                e.proc.stdin.write(key_line)
            relays = [asyncio.create_task(_pipe(snd.proc.stdout, recv.proc.stdin)),
                      asyncio.create_task(_pipe(recv.proc.stdout, snd.proc.stdin))]
        statuses = await _settle(snd, recv)
        await asyncio.gather(snd.reader, recv.reader)
        if statuses != [0, 0] or snd.done is None or recv.done is None:
            # the receiver's account of an integrity failure is the one to show
            for e in (recv, snd):
                if e.error and e.error.get("integrity"):
                    raise e.failure("")
            # then a wrong request or a full destination: the cause, not its echo at the
            # other end ("the other end closed the transfer stream")
            for e in (snd, recv):
                if e.error and (e.error.get("request") or e.error.get("space")):
                    raise e.failure("")
            for e in (recv, snd):
                if e.error:
                    raise e.failure("")
            bad, status = (snd, statuses[0]) if statuses[0] != 0 else (recv, statuses[1])
            raise bad.failure(f"exited with status {status}")
        out = Outcome(snd.done, recv.done, transport, time.monotonic() - t0)
        for e in ends:
            with contextlib.suppress(OSError, ConnectionError):
                e.proc.stdin.write_eof()
        return out
    finally:
        for r in relays:
            r.cancel()
        for e in ends:
            if e.done is None and e.error is None:
                e.proc.kill()
            e.reader.cancel()
        for h in opened:
            with contextlib.suppress(Exception):
                await h.close()


#: once one end exited, how long the other may take before it is told to stop
#: (stdin closed: it keeps what it committed) and, after as long again, killed
OTHER_END_S = STALL_S + 10.0


async def _settle(snd: _End, recv: _End) -> list[int]:
    """Both ends' exit statuses. Each end has deadlines of its own; this bounds the
    wait for the second once the first exited (a receiver still listening for a
    sender that failed, an end on a host that hangs)."""
    waits = {e: asyncio.ensure_future(e.proc.wait()) for e in (snd, recv)}
    try:
        await asyncio.wait(waits.values(), return_when=asyncio.FIRST_COMPLETED)
        for e, w in waits.items():
            if w.done():
                continue
            done, _ = await asyncio.wait([w], timeout=OTHER_END_S)
            if done:
                continue
            log.warning("the %s did not stop %gs after the other end: stopping it",
                        e.name, OTHER_END_S)
            with contextlib.suppress(OSError, ConnectionError, RuntimeError):
                e.proc.stdin.write_eof()
            done, _ = await asyncio.wait([w], timeout=OTHER_END_S)
            if not done:
                e.proc.kill()
                await asyncio.wait([w], timeout=10)
        return [w.result() if w.done() else -1 for w in waits.values()]
    finally:
        for w in waits.values():
            w.cancel()


async def _finish(end: _End, what: str) -> dict[str, Any]:
    status = await end.proc.wait()
    await end.reader
    if status != 0 or end.done is None:
        raise end.failure(f"{what} exited with status {status}")
    return end.done


async def probe_link(src: Host, src_cfg: HostConfig, dst: Host, dst_cfg: HostConfig,
                     *, seconds: float = 2.0) -> dict[str, Any]:
    """Measure the migration link from ``src`` to ``dst``: one TCP stream of
    incompressible bytes for ``seconds``, counted on the receiver after a warm-up.
    Returns ``{"rate": bytes/s, "seconds", "bytes", "connect_ms"}``. Raises
    :class:`UserError` when a host has no migration address, :class:`TransferError`
    when the probe fails; no process is left running either way."""
    for cfg in (src_cfg, dst_cfg):
        if not cfg.migration_address:
            raise UserError(f"host {cfg.name} has no migration_address in the inventory")
    addr = dst_cfg.migration_address
    assert addr is not None
    ends: list[_End] = []
    try:
        sink = _End("link probe sink", await dst.spawn(
            [*_command(dst_cfg), "transfer", "probe-sink", "--listen", f"{addr}:0",
             "--seconds", str(seconds)]), None, listens=True)
        ends.append(sink)
        where = await _listening_at(sink, addr)
        sender = _End("link probe sender", await src.spawn(
            [*_command(src_cfg), "transfer", "probe-send", "--connect", where,
             "--seconds", str(seconds)]), None)
        ends.append(sender)
        got, sent = await asyncio.wait_for(
            asyncio.gather(_finish(sink, "the sink"), _finish(sender, "the sender")),
            seconds + 60)
        return {"rate": float(got["rate"]), "seconds": float(got["seconds"]),
                "bytes": int(got["bytes"]), "connect_ms": float(sent["connect_ms"])}
    except TimeoutError as exc:
        raise TransferError("the link probe did not finish in time") from exc
    finally:
        for e in ends:
            if e.done is None and e.error is None:
                e.proc.kill()
            e.reader.cancel()


async def sample_disk(host: Host, cfg: HostConfig, path: str, fmt: str | None = None,
                      *, chunks: int = 32) -> dict[str, Any]:
    """Sample a disk image on ``host`` (see :func:`vmigrate.transfer.probe.sample`):
    ``{"allocated", "sampled", "zero", "ratio"}``. Reads only."""
    argv = [*_command(cfg), "transfer", "sample", path, "--chunks", str(chunks)]
    if fmt:
        argv += ["--format", fmt]
    end = _End("disk sample", await host.spawn(argv), None)
    try:
        return await asyncio.wait_for(_finish(end, "the sampler"), 120)
    except TimeoutError as exc:
        raise TransferError(f"sampling {path} on {cfg.name} did not finish in time") from exc
    finally:
        if end.done is None and end.error is None:
            end.proc.kill()
        end.reader.cancel()
