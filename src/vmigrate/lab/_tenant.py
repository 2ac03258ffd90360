"""The two ends of lab tenant traffic, run in a host's namespace by
:class:`vmigrate.lab.traffic.TenantTraffic` (``ip netns exec <ns> python -m
vmigrate.lab._tenant recv|send ...``). Standard library only: it starts fast.

Each end prints JSON lines on stdout: ``{"event": "ready", "pid": ...}`` once it
can carry traffic (the receiver adds the ``port`` it listens on), then ``{"event":
"done", "bytes": ..., "seconds": ...}`` when it ends: the receiver at the sender's
end of stream, the sender on SIGTERM or after ``--seconds``. Both end on SIGTERM
and, whatever happens, after ``--limit`` seconds (a run whose parent died does not
outlive it by more). Exit status 0 on a clean end, 1 on an error (on stderr).

SIGTERM only sets a flag, checked between socket calls (each waits at most
:data:`TICK`): a signal never lands between a send and its count, so the bytes
reported are exactly the bytes the socket took.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from types import FrameType

CHUNK = 256 * 1024
TICK = 0.1  # seconds: the longest a socket call waits before the stop flag is checked


class _Run:
    """When to stop: SIGTERM, or the limit."""

    def __init__(self, limit: float) -> None:
        self.deadline = time.monotonic() + limit
        self.stopped = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True

    def going(self) -> bool:
        return not self.stopped and time.monotonic() < self.deadline


def _say(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def receive(run: _Run, bind: str) -> None:
    total = 0
    first = last = 0.0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((bind, 0))
        listener.listen(1)
        listener.settimeout(TICK)
        _say(event="ready", pid=os.getpid(), port=listener.getsockname()[1])
        conn = None
        while conn is None and run.going():
            with contextlib.suppress(TimeoutError):
                conn, _peer = listener.accept()
        if conn is not None:
            with conn:
                conn.settimeout(TICK)
                buf = bytearray(CHUNK)
                while run.going():
                    try:
                        n = conn.recv_into(buf)
                    except TimeoutError:
                        continue
                    if not n:
                        break
                    last = time.monotonic()
                    if not total:
                        first = last
                    total += n
    _say(event="done", bytes=total, seconds=max(0.0, last - first))


def send(run: _Run, source: str, target: str, port: int, rate: float | None,
         seconds: float | None) -> None:
    data = memoryview(bytes(CHUNK))
    # paced: chunks of at most 10 ms of traffic, so the pace is smooth
    chunk = CHUNK if rate is None else max(1024, min(CHUNK, int(rate / 100)))
    total = 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect((target, port))
        sock.settimeout(TICK)
        _say(event="ready", pid=os.getpid())
        start = time.monotonic()
        end = start + seconds if seconds is not None else None
        while run.going() and (end is None or time.monotonic() < end):
            if rate is not None:
                ahead = total / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(min(ahead, TICK))
                    continue
            with contextlib.suppress(TimeoutError):
                total += sock.send(data[:chunk])
        elapsed = time.monotonic() - start
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)  # the receiver ends at this end of stream
    _say(event="done", bytes=total, seconds=elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmigrate.lab._tenant")
    parser.add_argument("--limit", type=float, default=600.0,
                        help="end after this many seconds whatever happens")
    sub = parser.add_subparsers(dest="role", required=True)
    recv = sub.add_parser("recv")
    recv.add_argument("--bind", required=True)
    snd = sub.add_parser("send")
    snd.add_argument("--source", required=True)
    snd.add_argument("--to", required=True)
    snd.add_argument("--port", type=int, required=True)
    snd.add_argument("--rate", type=float, help="bytes per second (default: as fast as it goes)")
    snd.add_argument("--seconds", type=float)
    args = parser.parse_args(argv)
    run = _Run(args.limit)
    try:
        if args.role == "recv":
            receive(run, args.bind)
        else:
            send(run, args.source, args.to, args.port, args.rate, args.seconds)
    except OSError as exc:
        sys.stderr.write(f"tenant {args.role}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
