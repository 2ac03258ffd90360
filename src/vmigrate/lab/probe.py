"""Probes run from the lab's probe namespace, which sits on the VM network.

:func:`ping` checks that a guest answers. :class:`DowntimeProbe` measures the
*observed downtime* of a migration: it pings the guest every millisecond from
outside and reports the longest interval between two consecutive replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import math
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from vmigrate.errors import LabError


@dataclass(frozen=True)
class PingResult:
    """Summary of one ``ping`` run."""

    sent: int
    received: int
    rtt_min_ms: float | None
    rtt_avg_ms: float | None
    rtt_max_ms: float | None

    @property
    def ok(self) -> bool:
        return self.received > 0


_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)")


def parse_ping(text: str) -> PingResult:
    """Parse the summary of iputils or busybox ``ping``."""
    counts = _COUNTS.search(text)
    if counts is None:
        raise LabError(f"cannot read ping output: {text.strip()[-200:]!r}")
    rtt = _RTT.search(text)
    mn, avg, mx = (float(x) for x in rtt.groups()) if rtt else (None, None, None)
    return PingResult(int(counts.group(1)), int(counts.group(2)), mn, avg, mx)


def ping(netns: str, address: str, *, count: int = 5, interval: float = 0.2,
         deadline: float = 10.0) -> PingResult:
    """Ping ``address`` from namespace ``netns`` (bounded in count and time)."""
    argv = ["ip", "netns", "exec", netns, "ping", "-n", "-c", str(count), "-i", str(interval),
            "-w", str(int(deadline)), address]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=deadline + 5,
                             check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"ping from {netns} failed: {exc}") from exc
    if "packets transmitted" not in res.stdout:
        raise LabError(f"ping from {netns} failed: {(res.stderr or res.stdout).strip()}")
    return parse_ping(res.stdout)


# -- observed downtime -----------------------------------------------------------

#: a reply line of iputils ``ping -D``:
#: ``[1700000000.123456] 64 bytes from 10.242.1.100: icmp_seq=7 ttl=64 time=0.21 ms``
_REPLY = re.compile(r"^\[(\d+(?:\.\d+)?)\]\s+\d+ bytes from .*?icmp_seq=(\d+)")


def parse_reply(line: str) -> tuple[float, int] | None:
    """(receive time as Unix seconds, icmp_seq) of a ``ping -D`` reply line; None for
    any other line (header, errors, summary, ``(DUP!)`` duplicates)."""
    match = _REPLY.match(line.strip())
    if match is None or "(DUP!)" in line:
        return None
    return float(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ReplyGap:
    """The longest silence between consecutive replies of one ping run."""

    replies: int
    #: None with fewer than two replies
    longest_ms: float | None
    #: receive time (Unix seconds) of the reply after which the longest gap began
    start: float | None
    first: float | None
    last: float | None
    #: highest icmp_seq answered (a lower bound of the requests sent)
    max_seq: int | None


def _gap(replies: list[tuple[float, int]]) -> ReplyGap:
    if not replies:
        return ReplyGap(0, None, None, None, None, None)
    stamps = sorted(t for t, _ in replies)
    longest: float | None = None
    start: float | None = None
    for before, after in itertools.pairwise(stamps):
        if longest is None or after - before > longest:
            longest, start = after - before, before
    return ReplyGap(
        replies=len({seq for _, seq in replies}),
        longest_ms=None if longest is None else longest * 1000.0,
        start=start, first=stamps[0], last=stamps[-1],
        max_seq=max(seq for _, seq in replies),
    )


def longest_gap(lines: Iterable[str]) -> ReplyGap:
    """The longest interval between consecutive replies (ordered by their ``-D``
    receive timestamps) in ``ping -D`` output. Pure."""
    return _gap([r for r in map(parse_reply, lines) if r is not None])


@dataclass(frozen=True)
class ProbeResult:
    """What a :class:`DowntimeProbe` saw.

    ``longest_gap_ms`` is the observed downtime: the longest interval between two
    consecutive replies. With fewer than two replies it is the whole probe
    duration (the guest was never seen up on both sides of anything).
    """

    sent: int
    received: int
    longest_gap_ms: float
    #: Unix time of the reply after which the longest gap began (None: < 2 replies)
    gap_start: float | None
    duration_s: float
    #: ping stopped on its own (its packet count) before :meth:`DowntimeProbe.stop`:
    #: the probe may not have covered the whole event
    deadline_hit: bool = False
    #: Unix time of the last reply (None: no reply at all)
    last_reply: float | None = None

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the controller dies, even by SIGKILL,
    so a probe never outlives the migration that started it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class DowntimeProbe:
    """Pings ``address`` from namespace ``netns`` every ``interval`` seconds (1 ms
    by default; intervals below 2 ms need root) with iputils ``ping -D``, for at
    most about ``max_seconds`` (a packet count, so it always ends by itself).

    Use around the event to measure::

        with DowntimeProbe(lab.probe_netns, guest_ip) as probe:
            probe.wait_reply()           # the guest answers before we start
            ... migrate ...
            result = probe.stop()

    The ping process is this object's own child and is stopped by its PID
    (SIGINT, so ping prints its counts; SIGKILL if it does not exit). Leaving
    the ``with`` block stops it too. A reader thread drains ping's output, so
    the probe may run as long as needed; only reply timestamps are kept.
    ``stop`` blocks briefly; from async code use :meth:`astop`.
    """

    def __init__(self, netns: str, address: str, *, interval: float = 0.001,
                 max_seconds: float = 600.0, reply_timeout: float = 1.0) -> None:
        if interval <= 0 or max_seconds <= 0 or reply_timeout <= 0:
            raise ValueError("interval, max_seconds and reply_timeout must be positive")
        self.netns = netns
        self.address = address
        self.interval = interval
        self.max_seconds = max_seconds
        self.reply_timeout = reply_timeout
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._replies: list[tuple[float, int]] = []
        self._other: list[str] = []  # last non-reply lines: errors and the summary
        self._started = 0.0
        self._stopped: float | None = None
        self.result: ProbeResult | None = None

    @property
    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "ping", "-n", "-D",
                "-i", f"{self.interval:g}", "-W", f"{self.reply_timeout:g}",
                # a count, not a deadline (-w): with a deadline iputils ping stops at
                # the first error, and a guest that is down for a while (a cold move)
                # makes "host unreachable" errors; the count ends it by itself just the
                # same, after about max_seconds
                "-c", str(max(1, math.ceil(self.max_seconds / self.interval))), self.address]

    @property
    def pid(self) -> int | None:
        """The ping process's PID (``ip netns exec`` execs ping in place)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> DowntimeProbe:
        """Start ping. Raises :class:`LabError` if it cannot be run."""
        if self._proc is not None:
            raise LabError("this probe was already started")
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1, preexec_fn=_die_with_parent,
                # its own session: the operator's Ctrl-C or hang-up reaches the controller
                # (which cancels or carries on), never the probe directly
                start_new_session=True,
            )
        except OSError as exc:
            raise LabError(f"cannot start ping in {self.netns}: {exc}") from exc
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read, args=(self._proc,),
                                        name=f"probe-{self.address}", daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            reply = parse_reply(line)
            with self._lock:
                if reply is not None:
                    self._replies.append(reply)
                else:
                    self._other.append(line.rstrip("\n"))
                    del self._other[:-50]

    def replies(self) -> int:
        """Replies received so far."""
        with self._lock:
            return len(self._replies)

    def first_reply_after(self, when: float) -> float | None:
        """Receive time (Unix seconds) of the first reply at or after ``when``."""
        with self._lock:
            later = [t for t, _ in self._replies if t >= when]
        return min(later) if later else None

    def wait_reply(self, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``count`` replies have arrived; :class:`LabError` if ping exits
        or ``timeout`` passes first (the guest does not answer)."""
        if self._proc is None:
            raise LabError("the probe is not started")
        deadline = time.monotonic() + timeout
        while self.replies() < count:
            if self._proc.poll() is not None:
                raise LabError(f"ping {self.address} in {self.netns} exited "
                               f"{self._proc.returncode}: {self._tail()}")
            if time.monotonic() >= deadline:
                raise LabError(f"{self.address} did not answer ping from {self.netns} "
                               f"within {timeout:g}s")
            time.sleep(0.01)

    def stop(self) -> ProbeResult:
        """Stop ping (if still running) and return what it saw. Idempotent."""
        if self.result is not None:
            return self.result
        proc = self._proc
        if proc is None:
            raise LabError("the probe was never started")
        stopped_at = time.monotonic()
        deadline_hit = proc.poll() is not None
        if not deadline_hit:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        with self._lock:
            gap = _gap(self._replies)
            other = list(self._other)
        duration = stopped_at - self._started
        counts = _COUNTS.search("\n".join(other))
        if counts is not None:
            sent, received = int(counts.group(1)), int(counts.group(2))
        else:  # killed before its summary
            sent, received = gap.max_seq or 0, gap.replies
        if gap.longest_ms is None:
            longest, start = duration * 1000.0, None
        else:
            longest, start = gap.longest_ms, gap.start
        self.result = ProbeResult(sent, received, longest, start, duration, deadline_hit,
                                  gap.last)
        return self.result

    async def astop(self) -> ProbeResult:
        """:meth:`stop` without blocking the event loop."""
        return await asyncio.to_thread(self.stop)

    def _tail(self) -> str:
        with self._lock:
            return " | ".join(line for line in self._other[-3:] if line.strip()) or "no output"

    def __enter__(self) -> DowntimeProbe:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self.result is None:
            self.stop()

    async def __aenter__(self) -> DowntimeProbe:
        return self.start()

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._proc is not None and self.result is None:
            await self.astop()
