"""The controller's own machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from vmigrate.errors import HostError
from vmigrate.hosts._base import Host, HostProcess


class _LocalProcess(HostProcess):
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        assert proc.stdin and proc.stdout and proc.stderr
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()


def _copy(src: Path, dst: Path, host: str) -> None:
    tmp = dst.with_name(dst.name + ".part")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"{host}: cannot copy {src} to {dst}: {exc}") from exc


class LocalHost(Host):
    """Runs commands as subprocesses of the controller."""

    async def _exec(
        self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            return 127, b"", f"{argv[0]}: command not found".encode()
        except OSError as exc:
            raise HostError(f"{self.name}: cannot run {argv[0]}: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return 124, b"", f"{argv[0]}: timed out after {timeout}s".encode()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        assert proc.returncode is not None
        return proc.returncode, out, err

    async def spawn(self, argv: Sequence[str]) -> HostProcess:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, limit=1 << 20,
            )
        except OSError as exc:
            raise HostError(f"{self.name}: cannot run {argv[0]}: {exc}") from exc
        return _LocalProcess(proc)

    async def put_file(self, local: Path, remote: str) -> None:
        await asyncio.to_thread(_copy, local, Path(remote), self.name)

    async def get_file(self, remote: str, local: Path) -> None:
        await asyncio.to_thread(_copy, Path(remote), local, self.name)

    @asynccontextmanager
    async def unix_socket(self, remote_path: str) -> AsyncIterator[str]:
        yield remote_path
