"""Traffic on a lab that is up: measuring its links over time, and making tenant load.

* :class:`LinkSampler` reads every host's migration-link byte counters several
  times a second (4 Hz by default) while it runs, and turns them into rates: per
  host and direction (``up``: host -> switch, what the host sends; ``down``: switch
  -> host, what it receives), sliding 1 s averages (:meth:`LinkSampler.averages`)
  and the windows that broke a budget (:meth:`LinkSampler.max_over`), so a test
  can say "every 1 s average within its link's budget + 5 %".
* :class:`TenantTraffic` runs a TCP stream between two lab hosts over the
  migration network (a receiver in the destination's namespace, a sender in the
  source's), at a set rate or as fast as the links let it, and reports what
  arrived: the load a tenant puts on the links a migration shares.

The counters are the kernel's, on the host's end of its migration veth (Ethernet,
IP and TCP headers included, as ``tc tbf`` counts them too). Both need root.

Stateful objects have a :class:`RunState`; after a failure they are ``FAILED`` and
hold nothing running: the sampler's thread has ended, the tenant processes the
traffic started (stopped by their PIDs) have exited.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from vmigrate.errors import LabError, SpecError
from vmigrate.lab._netdev import NetDevFile
from vmigrate.lab._plan import DIRECTIONS, Direction, HostPlan
from vmigrate.lab.net import find_host, find_lab, require_root

__all__ = [
    "LinkKey",
    "LinkSample",
    "LinkSampler",
    "RunState",
    "TenantTraffic",
    "TrafficResult",
    "Window",
    "window_averages",
]

#: (host, direction), e.g. ``("h2", "down")``: one direction of a host's migration link.
LinkKey = tuple[str, Direction]


class RunState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class LinkSample:
    """A host's migration-link counters at time ``t`` (``time.monotonic()``)."""

    t: float
    up: int  # bytes sent by the host so far (host -> switch)
    down: int  # bytes received by the host so far (switch -> host)

    def bytes(self, direction: Direction) -> int:
        return self.up if direction == "up" else self.down


@dataclass(frozen=True)
class Window:
    """The average rate from ``start`` to ``end`` (monotonic seconds)."""

    start: float
    end: float
    bytes: int

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def window_averages(series: Sequence[tuple[float, int]], window_s: float = 1.0) -> list[Window]:
    """Sliding averages over ``series`` (time, cumulative bytes; times increasing):
    for each sample, the window back to the latest earlier sample at least
    ``window_s`` before it, so each window spans ``window_s`` plus at most one
    sampling interval. A series shorter than ``window_s`` has none.

    Raises :class:`ValueError` for a window that is not positive, times that do not
    increase or counters that go back (the interface was recreated)."""
    if not window_s > 0:
        raise ValueError(f"window {window_s!r} is not a positive number of seconds")
    for (t0, b0), (t1, b1) in pairwise(series):
        if t1 <= t0:
            raise ValueError(f"sample times do not increase ({t0} then {t1})")
        if b1 < b0:
            raise ValueError(f"counter went back from {b0} to {b1} at {t1}")
    windows = []
    j = -1  # latest sample at least window_s before sample i
    for i, (t, b) in enumerate(series):
        while j + 1 < i and t - series[j + 1][0] >= window_s:
            j += 1
        if j >= 0 and t - series[j][0] >= window_s:
            windows.append(Window(series[j][0], t, b - series[j][1]))
    return windows


# -- the sampler -----------------------------------------------------------------------------


class _StopsOnExit:
    """``with``: stopped on the way out; a failure to stop while an error is on its way
    out becomes a note on that error rather than hiding it."""

    def stop(self) -> object:
        raise NotImplementedError

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.stop()
            return
        try:
            self.stop()
        except LabError as failure:
            exc.add_note(f"and: {failure}")


class LinkSampler(_StopsOnExit):
    """Samples the migration-link counters of ``hosts`` (default: every host of the
    lab) every ``interval`` seconds while it runs, in a thread of its own::

        with LinkSampler(home) as sampler:
            ...  # traffic
        assert sampler.max_over({("h2", "down"): 12.5e6}) == {}

    One sample is taken at start and one at stop. Reading a sample costs one
    ``pread`` per host (:mod:`vmigrate.lab._netdev`), so 4 Hz for 8 hosts is cheap;
    the times are the real ones, and :attr:`max_gap` tells how far the thread fell
    behind its interval on a busy machine.

    :meth:`start` raises :class:`NotFoundError` (no such lab or host),
    :class:`LabError` (a namespace cannot be read; nothing left open). If reading
    fails while running, sampling ends, the state is ``FAILED`` and :meth:`stop`
    raises :class:`LabError`; the samples so far stay readable.
    """

    def __init__(self, home: Path, hosts: Iterable[str] | None = None, name: str | None = None,
                 *, interval: float = 0.25) -> None:
        if not 0.01 <= interval <= 60:
            raise SpecError(f"sampling interval {interval!r}: use 0.01 to 60 seconds")
        self.home = home
        self.name = name
        self.interval = interval
        self._hosts = list(hosts) if hosts is not None else None
        self.state = RunState.NEW
        self._plans: list[HostPlan] = []
        self._files: list[NetDevFile] = []
        self._samples: dict[str, list[LinkSample]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @classmethod
    def from_samples(cls, samples: Mapping[str, Sequence[LinkSample]],
                     interval: float = 0.25) -> LinkSampler:
        """A stopped sampler holding ``samples`` (host -> samples in time order): for
        analysing saved or made-up series with the same helpers."""
        sampler = cls(Path("."), interval=interval)
        sampler._samples = {h: list(s) for h, s in samples.items()}
        sampler.state = RunState.STOPPED
        return sampler

    # -- running

    def start(self) -> LinkSampler:
        """Open every host's counters, take the first sample, start the thread."""
        if self.state is not RunState.NEW:
            raise LabError(f"this sampler is {self.state.value}: start a new one")
        require_root()
        if self._hosts is None:
            _state, plan = find_lab(self.home, self.name)
            self._plans = list(plan.hosts)
        else:
            self._plans = [find_host(self.home, h, self.name)[2] for h in self._hosts]
        try:
            for hp in self._plans:
                self._files.append(NetDevFile(hp.netns))
            self._samples = {hp.host: [] for hp in self._plans}
            self._take()
        except BaseException:
            self.state = RunState.FAILED
            self._close()
            raise
        self.state = RunState.RUNNING
        self._thread = threading.Thread(target=self._run, name="lab-link-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take the last sample and end the thread. Idempotent. Raises
        :class:`LabError` if sampling failed while running."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._close()
            self.state = RunState.FAILED if self._error else RunState.STOPPED
        if self._error is not None:
            raise LabError(f"link sampling failed: {self._error}") from self._error

    def __enter__(self) -> LinkSampler:
        return self.start()

    def _run(self) -> None:
        due = time.monotonic()
        try:
            while True:
                due += self.interval
                now = time.monotonic()
                if due < now:  # fell behind: sample now, do not burst to catch up
                    due = now
                if self._stop.wait(due - now):
                    break
                self._take()
            self._take()
        except Exception as exc:  # handed to stop()
            self._error = exc

    def _take(self) -> None:
        counts = [(hp, f.counters(hp.mig_if)) for hp, f in zip(self._plans, self._files,
                                                                 strict=True)]
        t = time.monotonic()
        with self._lock:
            for hp, (rx, tx) in counts:
                self._samples[hp.host].append(LinkSample(t, up=tx, down=rx))

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    # -- reading (while running, too)

    @property
    def hosts(self) -> list[str]:
        with self._lock:
            return list(self._samples)

    def samples(self) -> dict[str, list[LinkSample]]:
        """Every sample so far, per host (a copy)."""
        with self._lock:
            return {h: list(s) for h, s in self._samples.items()}

    def series(self, host: str, direction: Direction) -> list[tuple[float, int]]:
        """(time, bytes so far) of one direction of ``host``'s link."""
        if direction not in DIRECTIONS:
            raise SpecError(f"invalid direction {direction!r}: use up or down")
        with self._lock:
            try:
                samples = list(self._samples[host])
            except KeyError:
                raise LabError(f"host {host!r} is not sampled (hosts: "
                               f"{', '.join(self._samples)})") from None
        return [(s.t, s.bytes(direction)) for s in samples]

    def rates(self, host: str, direction: Direction) -> list[Window]:
        """The rate between each two consecutive samples (the finest series)."""
        series = self.series(host, direction)
        return [Window(t0, t1, b1 - b0)
                for (t0, b0), (t1, b1) in pairwise(series)]

    def averages(self, window_s: float = 1.0) -> dict[LinkKey, list[Window]]:
        """Sliding ``window_s`` averages of every sampled link and direction
        (:func:`window_averages`)."""
        return {(h, d): window_averages(self.series(h, d), window_s)
                for h in self.hosts for d in DIRECTIONS}

    def peak(self, host: str, direction: Direction, window_s: float = 1.0) -> float:
        """The highest ``window_s`` average of one direction, bytes/s (0 if none)."""
        return max((w.rate for w in window_averages(self.series(host, direction), window_s)),
                   default=0.0)

    def total(self, host: str, direction: Direction) -> Window:
        """Everything from the first sample to the last."""
        series = self.series(host, direction)
        if len(series) < 2:
            return Window(series[0][0], series[0][0], 0) if series else Window(0.0, 0.0, 0)
        return Window(series[0][0], series[-1][0], series[-1][1] - series[0][1])

    def max_over(self, budgets: Mapping[LinkKey, float], allowance: float = 0.05,
                 window_s: float = 1.0) -> dict[LinkKey, Window]:
        """The links whose ``window_s`` average ever exceeded its budget (bytes/s) by
        more than ``allowance`` (0.05: 5 %), each with its worst window. ``{}``: every
        window of every budgeted link stayed within ``budget * (1 + allowance)``."""
        if allowance < 0:
            raise ValueError(f"allowance {allowance!r} is negative")
        over = {}
        for (host, direction), budget in budgets.items():
            windows = window_averages(self.series(host, direction), window_s)
            worst = max(windows, key=lambda w: w.rate, default=None)
            if worst is not None and worst.rate > budget * (1 + allowance):
                over[(host, direction)] = worst
        return over

    @property
    def max_gap(self) -> float:
        """The longest time between two consecutive samples so far, seconds."""
        with self._lock:
            series = next(iter(self._samples.values()), [])
            return max((b.t - a.t for a, b in pairwise(series)),
                       default=0.0)


# -- tenant traffic --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficResult:
    """What a :class:`TenantTraffic` run carried. ``seconds``: from the first byte
    to the last the receiver got."""

    src: str
    dst: str
    sent_bytes: int
    received_bytes: int
    seconds: float
    requested_rate: float | None  # bytes/s, None: as fast as it went

    @property
    def rate(self) -> float:
        """Achieved throughput, payload bytes per second (0 if nothing arrived)."""
        return self.received_bytes / self.seconds if self.seconds > 0 else 0.0


class TenantTraffic(_StopsOnExit):
    """A TCP stream from lab host ``src`` to lab host ``dst`` over the migration
    network, at ``rate`` bytes/s (None: as fast as it goes), while the ``with`` block
    runs (or between :meth:`start` and :meth:`stop`; ``seconds`` ends it early)::

        with TenantTraffic(home, "h1", "h2") as traffic:
            time.sleep(3)
        print(traffic.result.rate * 8 / 1e6, "mbit/s")

    The receiver runs in ``dst``'s namespace and the sender in ``src``'s, each a
    small Python program (:mod:`vmigrate.lab._tenant`, this interpreter) started by
    ``ip netns exec``; each is stopped by the PID that started it, and both end on
    their own after ``limit`` seconds whatever happens to this process. Payload
    only is counted; on the wire headers add about 4.6 %.

    :meth:`start` raises :class:`SpecError` (bad rate, same host), :class:`NotFoundError`
    (no such lab or host), :class:`LabError` (a side did not come up: whatever had
    started is stopped). :meth:`stop` returns the :class:`TrafficResult` (also
    :attr:`result`) and raises :class:`LabError` if an end failed; both processes
    have exited either way.
    """

    READY_TIMEOUT = 15.0

    def __init__(self, home: Path, src_host: str, dst_host: str, rate: float | None = None,
                 name: str | None = None, *, seconds: float | None = None,
                 limit: float = 600.0) -> None:
        if rate is not None and not (rate >= 1 and rate < 2**63):
            raise SpecError(f"tenant traffic rate {rate!r}: use bytes per second, at least 1")
        if seconds is not None and not 0 < seconds <= limit:
            raise SpecError(f"tenant traffic duration {seconds!r}: use 0 to {limit:g} s")
        if src_host == dst_host:
            raise SpecError(f"tenant traffic from {src_host} to itself: pick two hosts")
        self.home = home
        self.src = src_host
        self.dst = dst_host
        self.rate = rate
        self.name = name
        self.seconds = seconds
        self.limit = limit
        self.state = RunState.NEW
        self.result: TrafficResult | None = None
        self._receiver: _End | None = None
        self._sender: _End | None = None

    def start(self) -> TenantTraffic:
        if self.state is not RunState.NEW:
            raise LabError(f"this tenant traffic is {self.state.value}: start a new one")
        require_root()
        _state, _plan, src = find_host(self.home, self.src, self.name)
        _state, _plan, dst = find_host(self.home, self.dst, self.name)
        try:
            self._receiver = _End.start(dst.netns, f"receiver on {dst.host}", [
                "--limit", f"{self.limit:g}", "recv", "--bind", dst.migration_address])
            port = self._receiver.ready(self.READY_TIMEOUT).get("port")
            if not isinstance(port, int):
                raise LabError(f"tenant receiver on {dst.host} gave no port")
            argv = ["--limit", f"{self.limit:g}", "send", "--source", src.migration_address,
                    "--to", dst.migration_address, "--port", str(port)]
            if self.rate is not None:
                argv += ["--rate", repr(float(self.rate))]
            if self.seconds is not None:
                argv += ["--seconds", repr(float(self.seconds))]
            self._sender = _End.start(src.netns, f"sender on {src.host}", argv)
            self._sender.ready(self.READY_TIMEOUT)
        except BaseException as exc:
            self.state = RunState.FAILED
            for end in (self._sender, self._receiver):
                if end is not None:
                    with contextlib.suppress(Exception):
                        end.stop(grace=2.0)
                    if end.failure:
                        exc.add_note(end.failure)
            raise
        self.state = RunState.RUNNING
        return self

    def stop(self) -> TrafficResult:
        """Stop the sender (SIGTERM to its PID), let the receiver take the rest of
        the stream and end; return what arrived. Idempotent once stopped."""
        if self.result is not None:
            return self.result
        if self.state is not RunState.RUNNING or self._sender is None or self._receiver is None:
            raise LabError(f"this tenant traffic is {self.state.value}, not running")
        failures = []
        sent = self._sender.stop(grace=5.0)
        got = self._receiver.finish(timeout=3.0)  # the queues drain in 50 ms
        for end in (self._sender, self._receiver):
            if end.failure:
                failures.append(end.failure)
        if failures or sent is None or got is None:
            self.state = RunState.FAILED
            raise LabError("tenant traffic failed: " + ("; ".join(failures) or "no result"))
        self.state = RunState.STOPPED
        self.result = TrafficResult(
            src=self.src, dst=self.dst, sent_bytes=_int(sent, "bytes"),
            received_bytes=_int(got, "bytes"), seconds=float(got.get("seconds", 0.0)),
            requested_rate=self.rate)
        return self.result

    def wait(self) -> TrafficResult:
        """With ``seconds`` set: wait until the sender ends on its own, then :meth:`stop`."""
        if self.seconds is None:
            raise LabError("tenant traffic without a duration runs until stop()")
        if self._sender is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._sender.proc.wait(timeout=self.seconds + self.READY_TIMEOUT)
        return self.stop()

    def __enter__(self) -> TenantTraffic:
        return self.start()


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LabError(f"tenant traffic reported {key}={value!r}")
    return value


class _End:
    """One side of tenant traffic: a :mod:`vmigrate.lab._tenant` process in a netns."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str, errors: IO[bytes]) -> None:
        self.proc = proc
        self.what = what
        self._errors = errors
        self._buffer = b""
        self.failure: str | None = None

    @classmethod
    def start(cls, netns: str, what: str, args: list[str]) -> _End:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (lives with the process)
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "vmigrate.lab._tenant",
                 *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors,
            )
        except OSError as exc:
            errors.close()
            raise LabError(f"cannot start the tenant {what}: {exc}") from exc
        return cls(proc, what, errors)

    def ready(self, timeout: float) -> dict[str, Any]:
        """The ``ready`` line; raises :class:`LabError` (the process is then stopped
        by the caller) if it exits or stays silent."""
        line = self._line(time.monotonic() + timeout)
        if line is None or line.get("event") != "ready":
            raise LabError(f"tenant {self.what} did not start: {self._stderr() or line}")
        # ip netns exec execs the program: the PID started is the program's own
        if line.get("pid") != self.proc.pid:
            raise LabError(f"tenant {self.what} reports pid {line.get('pid')}, "
                           f"started {self.proc.pid}")
        return line

    def stop(self, grace: float) -> dict[str, Any] | None:
        """SIGTERM this process (its own PID), wait, SIGKILL if need be; its ``done``
        line, or None (the reason in :attr:`failure`)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.finish(grace)

    def finish(self, timeout: float) -> dict[str, Any] | None:
        """Wait up to ``timeout`` for this process to end on its own, then SIGTERM it
        (a receiver whose stream stalled, on a cut link say, still reports what it got),
        then SIGKILL; its ``done`` line, or None (the reason in :attr:`failure`)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.failure = f"tenant {self.what} ignored SIGTERM: killed"
        rest = self.proc.stdout.read() if self.proc.stdout else b""
        self._buffer += rest
        done = None
        for raw in self._buffer.splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(raw)
                if isinstance(data, dict) and data.get("event") == "done":
                    done = data
        self._buffer = b""
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.returncode not in (0, None) and self.failure is None:
            self.failure = (f"tenant {self.what} exited {self.proc.returncode}: "
                            f"{self._stderr() or 'no error output'}")
        elif done is None and self.failure is None:
            self.failure = f"tenant {self.what} ended without a result"
        self._errors.close()
        return done

    def _line(self, deadline: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return None
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\n")
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _stderr(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self._errors.seek(0)
            return self._errors.read().decode(errors="replace").strip()[-500:]
        return ""
