"""The transport-neutral host interface.

Commands are argv lists. A host that must turn one into text (SSH sends a command line
to the remote user's shell) does it with :func:`quote_argv` and nothing else. Shell
scripts run on hosts are constants that take their inputs as positional parameters
(``sh -c SCRIPT sh ARG...``), never text built from inputs.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vmigrate.errors import CommandError, HostError


def quote_argv(argv: Sequence[str]) -> str:
    """The one quoting function: ``argv`` as one POSIX shell command line whose words
    are exactly ``argv`` (each word single-quoted where needed).

    Raises :class:`HostError` for an empty argv or a word holding a NUL character,
    which no command line can carry."""
    if not argv:
        raise HostError("an empty command cannot be run")
    if any("\0" in word for word in argv):
        raise HostError(f"{argv[0]!r}: an argument holds a NUL character; not run")
    return shlex.join(argv)


#: write stdin to "$1.tmp", then rename it over "$1" (constant: the path is a parameter)
_WRITE_SCRIPT = 'cat > "$1.tmp" && mv -f -- "$1.tmp" "$1"'


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left behind."""

    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str


class StreamReaderLike(Protocol):
    async def readexactly(self, n: int) -> bytes: ...
    async def readline(self) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...


class StreamWriterLike(Protocol):
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...


class HostProcess(ABC):
    """A long-running command on a host with its three byte streams open.

    Closing stdin is the process's cue to end (vmigrate's own remote commands
    treat end of stdin as "the controller is gone")."""

    stdin: StreamWriterLike
    stdout: StreamReaderLike
    stderr: StreamReaderLike

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the end; the exit status (255 when the host connection died)."""

    @abstractmethod
    def kill(self) -> None:
        """Stop it now (SIGKILL locally; over SSH, close the channel and signal)."""


class Host(ABC):
    """A machine commands can be run on.

    Methods raise :class:`~vmigrate.errors.HostUnreachableError` when the host
    cannot be reached and :class:`~vmigrate.errors.CommandError` when a command
    run with ``check=True`` fails. After either, the host object stays usable.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    async def _exec(
        self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        """Run ``argv``; return (status, stdout, stderr)."""

    @abstractmethod
    def unix_socket(self, remote_path: str) -> AbstractAsyncContextManager[str]:
        """A local path that connects to the unix socket ``remote_path`` on the host."""

    @abstractmethod
    async def put_file(self, local: Path, remote: str) -> None:
        """Copy the controller's file ``local`` to ``remote`` on the host (atomically
        replaced: a failed copy leaves no partial file under ``remote``)."""

    @abstractmethod
    async def get_file(self, remote: str, local: Path) -> None:
        """Copy ``remote`` on the host to the controller's file ``local``."""

    @abstractmethod
    async def spawn(self, argv: Sequence[str]) -> HostProcess:
        """Start ``argv`` with pipes for stdin, stdout and stderr."""

    async def _run_argv(self, argv: Sequence[str], stdin: bytes | None,
                        timeout: float | None) -> tuple[int, bytes, bytes]:
        """:meth:`_exec` after the refusals of :func:`quote_argv`, the same on every
        transport (a NUL in a word raises :class:`HostError`; nothing runs)."""
        quote_argv(argv)
        return await self._exec(list(argv), stdin, timeout)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection, if any."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        stdin: bytes | None = None,
        timeout: float | None = 120.0,
    ) -> CommandResult:
        """Run ``argv`` (a list: never shell text) and wait for its end.

        Raises :class:`HostError` before anything runs when a word holds a NUL."""
        status, out, err = await self._run_argv(argv, stdin, timeout)
        result = CommandResult(
            tuple(argv),
            status,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
        )
        if check and status != 0:
            raise CommandError(self.name, argv, status, result.stderr or result.stdout)
        return result

    async def read_file(self, path: str) -> bytes:
        status, out, err = await self._run_argv(["cat", "--", path], None, 60.0)
        if status != 0:
            raise CommandError(self.name, ["cat", path], status, err.decode(errors="replace"))
        return out

    async def read_head(self, path: str, length: int) -> bytes:
        """The first ``length`` bytes of ``path`` (fewer if it is shorter)."""
        status, out, err = await self._run_argv(["head", "-c", str(length), "--", path], None,
                                                120.0)
        if status != 0:
            raise CommandError(self.name, ["head", path], status, err.decode(errors="replace"))
        return out

    async def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` through ``path.tmp`` renamed over it: after a
        failure ``path`` is as it was (a ``path.tmp`` may be left). The path reaches the
        host as an argv word, never as shell text."""
        argv = ["sh", "-c", _WRITE_SCRIPT, "sh", path]
        status, _out, err = await self._run_argv(argv, data, 60.0)
        if status != 0:
            raise CommandError(self.name, ["write", path], status, err.decode(errors="replace"))

    async def exists(self, path: str) -> bool:
        status, _out, _err = await self._run_argv(["test", "-e", path], None, 30.0)
        return status == 0

    async def missing(self, paths: Sequence[str]) -> list[str]:
        """Which of ``paths`` do not exist on the host (one round trip)."""
        if not paths:
            return []
        script = 'for p in "$@"; do [ -e "$p" ] || printf "%s\\n" "$p"; done'
        res = await self.run(["sh", "-c", script, "sh", *paths])
        return [line for line in res.stdout.splitlines() if line]

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


