"""Hosts reached over SSH (asyncssh).

Host keys are always checked, and only against what vmigrate was told: the host's
pinned ``host_key`` fingerprint, else the keys its ``known_hosts`` file lists for
its address. Nothing is read from ``~/.ssh/config`` (so ``UserKnownHostsFile none``
or ``StrictHostKeyChecking no`` there change nothing) nor from ``~/.ssh/known_hosts``;
host certificates and x509 host keys are not trusted. A key that does not match,
or a host with no key recorded, raises :class:`~vmigrate.errors.HostKeyError`
naming the host and both fingerprints, before any command ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import asyncssh

from vmigrate.errors import ConfigError, HostError, HostKeyError, HostUnreachableError
from vmigrate.hosts._base import Host, HostProcess, quote_argv


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


def fingerprint(key: asyncssh.SSHKey) -> str:
    """The key's fingerprint as ``ssh-keygen -lf`` prints it (``SHA256:...``)."""
    return key.get_fingerprint("sha256")


def known_keys(known_hosts: Path | None, address: str, port: int) -> list[asyncssh.SSHKey]:
    """The keys ``known_hosts`` lists for ``address`` (``[address]:port`` when the port
    is not 22); a missing file lists none. Raises :class:`ConfigError` for a file
    that cannot be read or parsed."""
    if known_hosts is None:
        return []
    try:
        text = known_hosts.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read known_hosts {known_hosts}: {exc}") from exc
    try:
        return known_keys_in(text, address, port)
    except ConfigError as exc:
        raise ConfigError(f"known_hosts {known_hosts}: {exc}") from exc


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _known_host_token(address: str, port: int) -> str:
    host = f"[{address}]:{port}" if port != 22 else address
    if any(c.isspace() or c in ",#" for c in host) or not host:
        raise ConfigError(f"cannot record a host key for address {address!r}")
    return host


async def fetch_host_key(address: str, port: int = 22, *, timeout: float = 15.0
                         ) -> asyncssh.SSHKey:
    """The host key ``address:port`` offers now (no authentication; ~/.ssh/config is
    not read). Raises :class:`HostUnreachableError`."""
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(
            address, port, config=None), timeout)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise HostUnreachableError(f"cannot fetch the host key of {address}:{port}: {exc}"
                                   ) from exc
    if key is None:
        raise HostUnreachableError(f"{address}:{port} did not show a host key")
    return key


def record_host_key(known_hosts: Path, address: str, port: int, key: asyncssh.SSHKey
                    ) -> list[str]:
    """Make ``key`` the one known key of ``address:port`` in ``known_hosts`` (created
    0600 with its directory if missing; replaced atomically: a failure leaves the old
    file). Every other line is kept. Returns the fingerprints of the keys it replaced.
    Raises :class:`ConfigError` for a file that cannot be read or written."""
    token = _known_host_token(address, port)
    try:
        old = known_hosts.read_text()
    except FileNotFoundError:
        old = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read known_hosts {known_hosts}: {exc}") from exc
    kept: list[str] = []
    dropped: list[str] = []
    for line in old.splitlines():
        (dropped if _names_only(line, address, port) else kept).append(line)
    replaced = [fingerprint(k) for k in known_keys_in("\n".join(dropped), address, port)]
    kind, data = key.export_public_key("openssh").decode().split()[:2]
    text = "\n".join([*kept, f"{token} {kind} {data}"]) + "\n"
    tmp = known_hosts.with_name(f".{known_hosts.name}.{os.getpid()}.tmp")
    try:
        known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, known_hosts)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write known_hosts {known_hosts}: {exc}") from exc
    return [r for r in replaced if r != fingerprint(key)]


def _names_only(line: str, address: str, port: int) -> bool:
    """Is ``line`` a known_hosts entry for ``address:port`` (plain or hashed) without
    wildcards (a pattern line may name other hosts too: it is kept)?"""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return False
    patterns = fields[1] if fields[0].startswith("@") and len(fields) > 1 else fields[0]
    if any(c in patterns for c in "*?!"):
        return False
    try:
        return bool(known_keys_in(line, address, port))
    except ConfigError:
        return False


def known_keys_in(text: str, address: str, port: int) -> list[asyncssh.SSHKey]:
    """The keys known_hosts ``text`` lists for ``address:port``."""
    try:
        keys = asyncssh.import_known_hosts(text).match(
            address, address if _is_ip(address) else "", None if port == 22 else port)[0]
    except (ValueError, asyncssh.Error) as exc:
        raise ConfigError(f"not in OpenSSH known_hosts format: {exc}") from exc
    # a line can match by name and by address: each key once
    return list({k.public_data: k for k in keys}.values())


class _KeyCheck(asyncssh.SSHClient):
    """asyncssh asks this client about a host key it does not find among the trusted
    ones: it records the key and accepts it only if it has the pinned fingerprint."""

    def __init__(self, pinned: str | None) -> None:
        self.pinned = pinned
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.offered = key
        return self.pinned is not None and fingerprint(key) == self.pinned


def _host_key_algs(trusted: Sequence[asyncssh.SSHKey]) -> list[str] | str:
    """Ask first for the kinds of key we know, then for any other (so a host whose key
    changed kind still shows its new key, and is refused with both fingerprints)."""
    if not trusted:
        return "default"
    from asyncssh.public_key import get_default_public_key_algs

    algs = [a.decode() for k in trusted for a in k.sig_algorithms]
    algs += [a.decode() for a in get_default_public_key_algs()]
    return list(dict.fromkeys(algs))


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
        host_key: str | None = None,
        connect_timeout: float = 15.0,
    ) -> None:
        super().__init__(name)
        self.address = address
        self.port = port
        self.user = user
        self.key = key
        #: where the host's key is looked up (None: nowhere, only ``host_key`` counts)
        self.known_hosts = known_hosts
        #: the pinned fingerprint (``SHA256:...``): when set, the only key accepted
        self.host_key = host_key
        self.connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None:
                return self._conn
            trusted = ([] if self.host_key is not None
                       else known_keys(self.known_hosts, self.address, self.port))
            check = _KeyCheck(self.host_key)
            kwargs: dict[str, object] = {
                "port": self.port,
                "username": self.user,
                "connect_timeout": self.connect_timeout,
                "keepalive_interval": 10,
                # never ~/.ssh/config: its UserKnownHostsFile/StrictHostKeyChecking must
                # not turn checking off, nor its HostName/Port send us elsewhere
                "config": None,
                # (trusted keys, trusted CA keys, revoked keys): checking always on
                "known_hosts": (trusted, [], []),
                "x509_trusted_certs": None,
                "server_host_key_algs": _host_key_algs(trusted),
                "client_factory": lambda: check,
            }
            if self.key is not None:
                kwargs["client_keys"] = [str(self.key)]
            try:
                self._conn = await asyncssh.connect(self.address, **kwargs)
            except asyncssh.HostKeyNotVerifiable as exc:
                raise self._key_error(check.offered, trusted) from exc
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                raise HostUnreachableError(
                    f"cannot reach host {self.name} at {self.user}@{self.address}:{self.port}: "
                    f"{exc}"
                ) from exc
            return self._conn

    def _key_error(self, offered: asyncssh.SSHKey | None,
                   trusted: Sequence[asyncssh.SSHKey]) -> HostKeyError:
        got = fingerprint(offered) if offered is not None else None
        known = [self.host_key] if self.host_key is not None else [
            fingerprint(k) for k in trusted]
        where = (f"pinned host_key {self.host_key}" if self.host_key is not None
                 else f"known_hosts {self.known_hosts}")
        target = f"{self.address}:{self.port}"
        if not known:
            msg = (f"host {self.name} ({target}) offered host key {got or '(none)'}, and no "
                   f"key is recorded for it ({where}): check the fingerprint on the host "
                   f"('ssh-keygen -lf' on its host key), then 'vmigrate host trust "
                   f"{self.name}'; nothing was run on it")
        else:
            msg = (f"host key of {self.name} ({target}) changed: it offered "
                   f"{got or '(none)'}, the recorded key is {', '.join(known)} ({where}); "
                   "nothing was run on it. If the host was reinstalled, check the new "
                   f"fingerprint and run 'vmigrate host trust {self.name}'")
        return HostKeyError(msg, host=self.name, offered=got, known=known)

    async def _exec(
        self, argv: Sequence[str], stdin: bytes | None, timeout: float | None
    ) -> tuple[int, bytes, bytes]:
        conn = await self._connection()
        try:
            res = await conn.run(
                quote_argv(argv), input=stdin, check=False, timeout=timeout, encoding=None
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
            proc = await conn.create_process(quote_argv(argv), encoding=None)
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
