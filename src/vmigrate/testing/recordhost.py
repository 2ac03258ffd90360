"""A :class:`~vmigrate.hosts.Host` that records every command and answers from a
function, for unit tests of code that runs commands on hosts (what argv reaches the
host, in what order, and that no input ever becomes shell text).

Nothing runs: ``answer(argv)`` returns ``(status, stdout, stderr)`` for each command
(by default success with no output), and ``commands`` keeps every argv in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from vmigrate.hosts import Host, HostProcess

Answer = Callable[[list[str]], tuple[int, str, str]]


def _ok(argv: list[str]) -> tuple[int, str, str]:
    return 0, "", ""


class RecordingHost(Host):
    """Records argv lists; ``answer`` decides each command's outcome."""

    def __init__(self, name: str = "rec", answer: Answer = _ok) -> None:
        super().__init__(name)
        self.answer = answer
        self.commands: list[list[str]] = []
        self.stdin: list[bytes | None] = []

    async def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
                    ) -> tuple[int, bytes, bytes]:
        cmd = list(argv)
        self.commands.append(cmd)
        self.stdin.append(stdin)
        status, out, err = self.answer(cmd)
        return status, out.encode(), err.encode()

    @asynccontextmanager
    async def unix_socket(self, remote_path: str) -> AsyncIterator[str]:
        yield remote_path

    async def put_file(self, local: Path, remote: str) -> None:
        self.commands.append(["<put>", str(local), remote])

    async def get_file(self, remote: str, local: Path) -> None:
        self.commands.append(["<get>", remote, str(local)])

    async def spawn(self, argv: Sequence[str]) -> HostProcess:
        raise NotImplementedError("RecordingHost runs nothing long-lived")

    def shell_scripts(self) -> list[str]:
        """The script of every ``sh -c SCRIPT ...`` command recorded."""
        return [c[2] for c in self.commands if len(c) > 2 and c[:2] == ["sh", "-c"]]
