"""One sshd per lab host, each in its host's network namespace.

Files, all in the lab directory: the controller key ``id_ed25519`` (+ ``.pub``,
the only authorized key), ``known_hosts`` (each host's key under its
management address), and per host ``hosts/hN/ssh_host_ed25519_key``,
``sshd_config``, ``sshd.pid`` and ``sshd.log``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from vmigrate.errors import LabError
from vmigrate.lab import _sys

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SshdFiles:
    """Where one host's sshd keeps its files."""

    config: Path
    host_key: Path
    pidfile: Path
    log: Path

    @classmethod
    def under(cls, host_dir: Path) -> SshdFiles:
        return cls(
            config=host_dir / "sshd_config",
            host_key=host_dir / "ssh_host_ed25519_key",
            pidfile=host_dir / "sshd.pid",
            log=host_dir / "sshd.log",
        )


def keygen(path: Path, comment: str) -> None:
    """Create an ed25519 key pair at ``path`` (+ ``.pub``) without passphrase."""
    _sys.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _quote(path: Path, *, tokens: bool = False) -> str:
    text = str(path)
    if tokens:  # sshd expands %-tokens in AuthorizedKeysFile
        text = text.replace("%", "%%")
    if any(c in text for c in "\"\n"):
        raise LabError(f"path {text!r} cannot be written into an sshd_config")
    return f'"{text}"'


def config_text(address: str, files: SshdFiles, authorized_keys: Path, comment: str) -> str:
    """The sshd_config for one lab host."""
    return "\n".join([
        f"# {comment}",
        f"ListenAddress {address}:22",
        f"HostKey {_quote(files.host_key)}",
        f"PidFile {_quote(files.pidfile)}",
        f"AuthorizedKeysFile {_quote(authorized_keys, tokens=True)}",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding yes",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "Subsystem sftp internal-sftp",
        "",
    ])


def ensure_privsep_dir() -> None:
    """sshd refuses to start without its privilege separation directory. It is
    shared with the system's sshd, so it is created if missing and never removed."""
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise LabError(f"cannot create {PRIVSEP_DIR}: {exc}") from exc


def start(netns: str, files: SshdFiles) -> None:
    """Start sshd in ``netns``; it detaches and writes ``files.pidfile``.
    Raises :class:`LabError` with its log if it refuses to start."""
    try:
        _sys.run(["ip", "netns", "exec", netns, SSHD, "-f", str(files.config),
                  "-E", str(files.log)])
    except LabError as exc:
        raise LabError(f"sshd in {netns} did not start: {exc}; log: {_tail(files.log)}") from exc


def wait_ready(address: str, files: SshdFiles, timeout: float = 10.0) -> int:
    """Wait until sshd on ``address``:22 sends its banner and its pidfile exists;
    return its PID. Raises :class:`LabError` on timeout."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, 22), timeout=1.0) as sock:
                banner = sock.recv(64)
            if banner.startswith(b"SSH-"):
                pid = _sys.read_pidfile(files.pidfile)
                if pid is not None:
                    return pid
                last = "no pidfile yet"
            else:
                last = f"unexpected banner {banner[:20]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.02)
    raise LabError(
        f"sshd on {address}:22 not ready after {timeout:g} s ({last}); log: {_tail(files.log)}"
    )


def known_hosts_line(address: str, host_pub: Path) -> str:
    """``<address> <keytype> <key>`` for a known_hosts file."""
    parts = host_pub.read_text().split()
    if len(parts) < 2:
        raise LabError(f"{host_pub}: not an OpenSSH public key")
    return f"{address} {parts[0]} {parts[1]}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return " | ".join(text.splitlines()[-lines:]) or "(empty log)"
