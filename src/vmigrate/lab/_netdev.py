"""Interface byte counters of a named network namespace, read cheaply.

``/sys/class/net`` shows the namespace sysfs was mounted in, so reading another
namespace's counters there takes ``ip netns exec`` (a process, a mount namespace and
a fresh sysfs mount per read, milliseconds each). Here a short-lived thread enters
the namespace (``setns(2)`` on ``/run/netns/<name>``; a network namespace is per
thread), opens ``/proc/thread-self/net/dev`` and ends; the open file stays bound to
that namespace, and each later read of it is one ``pread`` (about 15 µs), so a
sampler keeps up at many hertz for many hosts. Needs root (``CAP_SYS_ADMIN``).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from types import TracebackType

from vmigrate.errors import LabError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_PROC_NET_DEV = "/proc/thread-self/net/dev"


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """``/proc/net/dev`` as interface -> (received bytes, sent bytes).

    Raises :class:`LabError` when the text does not have that file's layout."""
    lines = text.splitlines()
    if len(lines) < 2 or "Receive" not in lines[0] or "Transmit" not in lines[0]:
        raise LabError("unexpected /proc/net/dev layout (no Receive/Transmit header)")
    counters: dict[str, tuple[int, int]] = {}
    for line in lines[2:]:
        dev, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 9 or not all(f.isdigit() for f in fields):
            raise LabError(f"unexpected /proc/net/dev line {line!r}")
        counters[dev.strip()] = (int(fields[0]), int(fields[8]))
    return counters


class NetDevFile:
    """``/proc/net/dev`` of network namespace ``netns`` (None: this thread's), open
    until :meth:`close` (or the end of a ``with`` block).

    Opening raises :class:`LabError` when the namespace does not exist or cannot be
    entered (not root); :meth:`read` raises :class:`LabError` once closed."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._fd: int | None = _open_in_netns(netns) if netns else _open(_PROC_NET_DEV)

    def read(self) -> dict[str, tuple[int, int]]:
        """Every interface's (received, sent) bytes so far, as the kernel counts them."""
        if self._fd is None:
            raise LabError(f"/proc/net/dev of {self.netns or 'this namespace'} is closed")
        chunks = []
        offset = 0
        while chunk := os.pread(self._fd, 65536, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return parse_net_dev(b"".join(chunks).decode(errors="replace"))

    def counters(self, dev: str) -> tuple[int, int]:
        """(received, sent) bytes of ``dev``; :class:`LabError` if it is not there."""
        try:
            return self.read()[dev]
        except KeyError:
            raise LabError(f"no interface {dev} in netns {self.netns}") from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> NetDevFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise LabError(f"cannot open {path}: {exc}") from exc


def _open_in_netns(netns: str) -> int:
    """An fd of ``/proc/net/dev`` as namespace ``netns`` sees it. The namespace is
    entered by a thread of its own, which ends at once: no other thread moves."""
    if "/" in netns or netns in ("", ".", ".."):
        raise LabError(f"invalid namespace name {netns!r}")
    result: list[int] = []
    errors: list[BaseException] = []

    def enter_and_open() -> None:
        try:
            ns_fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(LabError(f"no network namespace {netns}: {exc}"))
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                errors.append(LabError(
                    f"cannot enter network namespace {netns}: {os.strerror(err)} "
                    "(reading another namespace's counters needs root)"))
                return
        finally:
            os.close(ns_fd)
        try:
            result.append(_open(_PROC_NET_DEV))
        except LabError as exc:
            errors.append(exc)

    def run() -> None:
        try:
            enter_and_open()
        except Exception as exc:  # reported to the caller below
            errors.append(LabError(f"cannot open /proc/net/dev of {netns}: {exc!r}"))

    thread = threading.Thread(target=run, name=f"netdev-{netns}", daemon=True)
    thread.start()
    thread.join()
    if errors or not result:
        raise errors[0] if errors else LabError(f"cannot open /proc/net/dev of {netns}")
    return result[0]
