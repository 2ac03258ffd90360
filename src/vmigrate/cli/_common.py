"""Shared CLI plumbing: consoles, state, running coroutines, JSON output, surviving the
loss of the terminal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar, cast

import typer
from rich.console import Console

from vmigrate.config import Inventory, load_inventory, state_home
from vmigrate.store import Store

T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    """Options given before the subcommand."""

    config: Path | None = None

    def inventory(self, *, required: bool = True) -> Inventory:
        return load_inventory(self.config, required=required)

    def store(self) -> Store:
        return Store(state_home() / "vmigrate.db")


CTX = Context()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh event loop."""
    return asyncio.run(coro)


# -- option checks (bad input: exit status 2, nothing done) -------------------------------------


def positive(value: float | None) -> float | None:
    """An option callback: a finite number above 0 (seconds, a timeout), or unset.

    Raises :class:`typer.BadParameter` (exit status 2, one line) for ``-1``, ``0``, ``nan``
    or ``inf``."""
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise typer.BadParameter(f"{value:g} is not a positive number")
    return value


def non_negative(value: float | None) -> float | None:
    """An option callback: a finite number from 0 up, or unset."""
    if value is not None and (not math.isfinite(value) or value < 0):
        raise typer.BadParameter(f"{value:g} is not 0 or a positive number")
    return value


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


# -- surviving the terminal ---------------------------------------------------------------------

#: errno values that mean the reader of a stream is gone: a closed pipe, a hung-up pty
_GONE_ERRNOS = frozenset({errno.EPIPE, errno.EIO})


def _is_gone(exc: OSError) -> bool:
    return isinstance(exc, BrokenPipeError) or exc.errno in _GONE_ERRNOS


class _SurvivingStream:
    """A text stream that forwards to ``real`` until its reader is gone, then drops output.

    Gone means a write or flush raised ``BrokenPipeError`` or ``OSError`` with EPIPE or
    EIO (the pipe's reader closed it; the pty's terminal went away), or SIGHUP arrived
    (see :func:`survive_terminal`). From then on every write is dropped and reported as
    written, and the stream's file descriptor is pointed at ``/dev/null``, so what the
    real stream still buffers, the interpreter's flush at exit and child processes that
    share the descriptor write nowhere instead of failing. Other errors are raised as
    before.
    """

    def __init__(self, real: TextIO) -> None:
        self._real = real
        self._gone = False
        #: a terminal when wrapped: a hang-up takes its reader away (a file or a pipe
        #: keeps its reader, and what goes there is kept)
        try:
            self.terminal = real.isatty()
        except (OSError, ValueError):
            self.terminal = False

    @property
    def gone(self) -> bool:
        """Whether output is being dropped."""
        return self._gone

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._real.write(text)
            except OSError as exc:
                if not _is_gone(exc):
                    raise
                self._give_up()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._real.flush()
                return
            except OSError as exc:
                if not _is_gone(exc):
                    raise
                self._give_up()
        self._drain()

    def fileno(self) -> int:
        return self._real.fileno()

    def isatty(self) -> bool:
        if self._gone:
            return False
        try:
            return self._real.isatty()
        except (OSError, ValueError):
            return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        try:
            self._real.close()
        except OSError as exc:
            if not _is_gone(exc):
                raise

    @property
    def closed(self) -> bool:
        return self._real.closed

    @property
    def encoding(self) -> str:
        return self._real.encoding

    @property
    def errors(self) -> str | None:
        return self._real.errors

    @property
    def line_buffering(self) -> bool:
        return bool(getattr(self._real, "line_buffering", False))

    @property
    def newlines(self) -> Any:
        return getattr(self._real, "newlines", None)

    @property
    def name(self) -> str:
        return str(getattr(self._real, "name", "<stream>"))

    @property
    def mode(self) -> str:
        return str(getattr(self._real, "mode", "w"))

    def __repr__(self) -> str:
        return f"<surviving {self._real!r}{' (gone)' if self._gone else ''}>"

    def _silence(self) -> None:
        """Drop output from now on; point the descriptor at /dev/null.

        Safe in a signal handler: no Python-level I/O on the real stream (which may be
        in the middle of a write), only system calls.
        """
        self._gone = True
        try:
            fd = self._real.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError):  # no descriptor (io.UnsupportedOperation) or closed
            return
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
        os.close(devnull)

    def _drain(self) -> None:
        """Let the real stream empty its buffer (into /dev/null once silenced)."""
        with contextlib.suppress(OSError, ValueError):
            self._real.flush()

    def _give_up(self) -> None:
        self._silence()
        self._drain()


#: every stream survive_terminal() wrapped, silenced together on SIGHUP
_surviving: list[_SurvivingStream] = []


def _on_hangup(signum: int, frame: FrameType | None) -> None:
    for stream in _surviving:
        if stream.terminal:
            stream._silence()


def _surviving_stream(stream: TextIO | None,
                      swaps: dict[int, tuple[TextIO, TextIO]]) -> TextIO | None:
    """``stream`` wrapped (once, even if it is both stdout and stderr), or as it was."""
    if stream is None or isinstance(stream, _SurvivingStream):
        return stream
    if id(stream) not in swaps:
        wrapper = _SurvivingStream(stream)
        _surviving.append(wrapper)
        swaps[id(stream)] = (stream, cast(TextIO, wrapper))
    return swaps[id(stream)][1]


def survive_terminal() -> None:
    """Keep a long-running command alive when its terminal or output pipe goes away.

    Call it at the start of the command, from the main thread. Afterwards:

    * SIGHUP (the operator's SSH session dropped) no longer ends the process; once it
      arrived, what goes to a terminal is dropped (nobody is there to read it); output
      redirected to a file or a pipe goes on. If SIGHUP was already ignored
      (``nohup``), it stays so and output goes where it went.
    * ``sys.stdout`` and ``sys.stderr`` are wrappers that forward to the real streams
      until a write or flush finds the reader gone (EPIPE: the pipe was closed; EIO: the
      pty was closed), and from then on silently drop output for that stream.
      ``out``, ``err``, ``print`` and the root logger's stream handlers write through
      them; the interpreter's flush at exit no longer prints "Exception ignored ...
      BrokenPipeError" or changes the exit status.

    Idempotent. Child processes started later do not inherit the SIGHUP handler (an
    exec resets it): start them in their own session if they must outlive a hang-up.
    """
    swaps: dict[int, tuple[TextIO, TextIO]] = {}
    new_stdout = _surviving_stream(sys.stdout, swaps)
    new_stderr = _surviving_stream(sys.stderr, swaps)
    if new_stdout is not None:
        sys.stdout = new_stdout
    if new_stderr is not None:
        sys.stderr = new_stderr
    for old, new in swaps.values():
        # Console(file=None) looks sys.stdout/stderr up on every write; one given a file
        # at construction keeps it, so re-point it
        for console in (out, err):
            if console.file is old:
                console.file = new
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                try:
                    handler.setStream(new)  # flushes the old stream first
                except OSError:
                    handler.stream = new
    current = signal.getsignal(signal.SIGHUP)
    if current is not signal.SIG_IGN and current is not _on_hangup:
        signal.signal(signal.SIGHUP, _on_hangup)
