"""Local system helpers for the lab: commands, interfaces, namespaces, processes.

Every foreign failure is translated here: a command that exits non-zero
raises :class:`LabError` carrying its argv and stderr; a missing binary raises
:class:`EnvironmentError_`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vmigrate.errors import EnvironmentError_, LabError

NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def run(
    argv: Sequence[str], *, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; raise :class:`LabError` if it exits non-zero or times out."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise EnvironmentError_(
            f"{argv[0]} is not installed: the lab needs iproute2 (ip, tc) and "
            "openssh-server/openssh-client (sshd, ssh-keygen)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip() or proc.stdout.strip() or "no error output"
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")
    return proc


def ip(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ip [-n netns] args...``"""
    return run(["ip", *(["-n", netns] if netns else []), *args])


def ip_batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Run many ``ip`` commands in one process (``ip -batch -``); stops at the first
    failing line and raises :class:`LabError`."""
    text = "".join(line + "\n" for line in lines)
    if text:
        run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], input=text)


def tc(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """``tc [-n netns] args...``"""
    return run(["tc", *(["-n", netns] if netns else []), *args])


def netns_names() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def root_links() -> list[str]:
    """Interface names in the root (controller's) namespace."""
    try:
        return sorted(p.name for p in SYS_NET.iterdir())
    except FileNotFoundError:  # pragma: no cover - /sys not mounted
        return []


def link_exists(name: str, netns: str | None = None) -> bool:
    if netns is None:
        return (SYS_NET / name).exists()
    proc = subprocess.run(
        ["ip", "-n", netns, "link", "show", "dev", name], capture_output=True, check=False
    )
    return proc.returncode == 0


def link_info(name: str, netns: str | None = None) -> dict[str, Any] | None:
    """``ip -j link show dev name`` as a dict, or None if absent."""
    proc = subprocess.run(
        ["ip", *(["-n", netns] if netns else []), "-j", "link", "show", "dev", name],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None


def qdisc_line(dev: str, netns: str | None = None) -> str | None:
    """The root qdisc line of ``dev`` (``tc qdisc show``), None if absent."""
    proc = subprocess.run(
        ["tc", *(["-n", netns] if netns else []), "qdisc", "show", "dev", dev, "root"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        if " root " in f" {line} ":
            return line.strip()
    return None


def networks_in_use() -> list[IPNetwork]:
    """Every IPv4 network on an interface or in a (non-default) route of the root
    namespace, and on an interface of any named namespace."""
    found: list[IPNetwork] = []
    targets: list[str | None] = [None, *netns_names()]
    for ns in targets:
        pre = ["ip", *(["-n", ns] if ns else []), "-j"]
        proc = subprocess.run([*pre, "-4", "addr", "show"],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            for link in json.loads(proc.stdout):
                for addr in link.get("addr_info", []):
                    with contextlib.suppress(KeyError, ValueError):
                        found.append(ipaddress.ip_network(
                            f"{addr['local']}/{addr['prefixlen']}", strict=False))
        if ns is None:
            proc = subprocess.run([*pre, "-4", "route", "show", "table", "all"],
                                  capture_output=True, text=True, check=False)
            if proc.returncode == 0 and proc.stdout.strip():
                for route in json.loads(proc.stdout):
                    dst = route.get("dst", "default")
                    if dst in ("default", "0.0.0.0/0"):
                        continue
                    with contextlib.suppress(ValueError):
                        found.append(ipaddress.ip_network(dst, strict=False))
    return found


# -- processes ---------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True
    # state is the field after the parenthesised command name
    state = stat.rpartition(")")[2].split()[:1]
    return state != ["Z"]


def cmdline(pid: int) -> list[str]:
    """``/proc/<pid>/cmdline`` split on NULs; empty if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def read_pidfile(path: Path) -> int | None:
    """The PID in ``path``, or None if absent or not a positive number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def netns_key(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) identifying the named namespace, None if absent."""
    try:
        st = os.stat(NETNS_DIR / name)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pid_netns_key(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(names: Iterable[str]) -> dict[str, list[int]]:
    """Live processes in each named namespace (like ``ip netns pids``)."""
    keys = {k: n for n in names if (k := netns_key(n)) is not None}
    found: dict[str, list[int]] = {n: [] for n in keys.values()}
    if not keys:
        return found
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        key = pid_netns_key(pid)
        if key in keys and pid_alive(pid):
            found[keys[key]].append(pid)
    return found


def terminate(pids: Iterable[int], grace: float = 5.0) -> list[int]:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL the rest, wait again.
    Returns the PIDs still alive afterwards (normally none)."""
    pending = [p for p in pids if pid_alive(p)]
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    pending = _wait_gone(pending, grace)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return _wait_gone(pending, 2.0)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids if pid_alive(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        time.sleep(0.02)
