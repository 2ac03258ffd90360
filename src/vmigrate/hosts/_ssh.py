"""Hosts reached over SSH (asyncssh)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh

from vmigrate.errors import HostError, HostUnreachableError
from vmigrate.hosts._base import Host, HostProcess


class _SSHProcess(HostProcess):
    def __init__(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        self._proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    async def wait(self) -> int:
        try:
            res = await self._proc.wait(check=False)
        except (OSError, asyncssh.Error):
            return 255
        return res.exit_status if res.exit_status is not None else 255

    def kill(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self._proc.send_signal("KILL")
        self._proc.close()

_FWD_PREFIX = "vmigrate-fwd-"


def _sweep_stale_forward_dirs() -> None:
    """Remove forwarding directories left by controllers that died (SIGKILL leaves
    no chance to clean up); each is named after the PID that made it."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(_FWD_PREFIX):
            continue
        pid = name[len(_FWD_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class SSHHost(Host):
    """A host reached through one multiplexed SSH connection, opened lazily."""

    def __init__(
        self,
        name: str,
        address: str,
        *,
        port: int = 22,
        user: str = "root",
        key: Path | None = None,
        known_hosts: Path | None = None,
        connect_timeout: float = 15.0,
    ) -> None:
        super().__init__(name)
        self.address = address
        self.port = port
        self.user = user
        self.key = key
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None:
                return self._conn
            kwargs: dict[str, object] = {
                "port": self.port,
                "username": self.user,
                "connect_timeout": self.connect_timeout,
                "keepalive_interval": 10,
            }
            if self.key is not None:
                kwargs["client_keys"] = [str(self.key)]
            if self.known_hosts is not None:
                kwargs["known_hosts"] = str(self.known_hosts)
            try:
                self._conn = await asyncssh.connect(self.address, **kwargs)
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise HostUnreachableError(
                    f"cannot reach host {self.name} at {self.user}@{self.address}:{self.port}: "
                    f"{exc}"
                ) from exc
            return self._conn

    async def _exec(
        self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        conn = await self._connection()
        try:
            res = await conn.run(
                shlex.join(argv), input=stdin, check=False, timeout=timeout, encoding=None
            )
        except asyncssh.TimeoutError:
            return 124, b"", f"{argv[0]}: timed out after {timeout}s".encode()
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise HostUnreachableError(f"lost connection to host {self.name}: {exc}") from exc
        status = res.exit_status if res.exit_status is not None else 255
        out = res.stdout if isinstance(res.stdout, bytes) else b""
        err = res.stderr if isinstance(res.stderr, bytes) else b""
        return status, out, err

    async def spawn(self, argv: Sequence[str]) -> HostProcess:
        conn = await self._connection()
        try:
            proc = await conn.create_process(shlex.join(argv), encoding=None)
        except (OSError, asyncssh.Error) as exc:
            self._conn = None
            raise HostUnreachableError(f"lost connection to host {self.name}: {exc}") from exc
        return _SSHProcess(proc)

    async def put_file(self, local: Path, remote: str) -> None:
        conn = await self._connection()
        part = remote + ".part"
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(local), part)
                await sftp.posix_rename(part, remote)
        except (OSError, asyncssh.Error) as exc:
            await self.run(["rm", "-f", "--", part], check=False)
            raise HostError(f"cannot copy {local} to {self.name}:{remote}: {exc}") from exc

    async def get_file(self, remote: str, local: Path) -> None:
        conn = await self._connection()
        part = local.with_name(local.name + ".part")
        try:
            async with conn.start_sftp_client() as sftp:
                await sftp.get(remote, str(part))
            os.replace(part, local)
        except (OSError, asyncssh.Error) as exc:
            part.unlink(missing_ok=True)
            raise HostError(f"cannot copy {self.name}:{remote} to {local}: {exc}") from exc

    @asynccontextmanager
    async def unix_socket(self, remote_path: str) -> AsyncIterator[str]:
        conn = await self._connection()
        _sweep_stale_forward_dirs()
        tmpdir = tempfile.mkdtemp(prefix=f"{_FWD_PREFIX}{os.getpid()}-")
        local = os.path.join(tmpdir, "sock")
        try:
            listener = await conn.forward_local_path(local, remote_path)
        except (OSError, asyncssh.Error) as exc:
            os.rmdir(tmpdir)
            raise HostUnreachableError(
                f"cannot forward {remote_path} from host {self.name}: {exc}"
            ) from exc
        try:
            yield local
        finally:
            listener.close()
            shutil.rmtree(tmpdir, ignore_errors=True)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            try:
                await self._conn.wait_closed()
            finally:
                self._conn = None
