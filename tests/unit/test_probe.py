"""Ping output parsing and the downtime probe's gap logic, on synthetic ``ping -D`` output."""

from __future__ import annotations

import sys

import pytest

from vmigrate.errors import LabError
from vmigrate.lab import probe
from vmigrate.lab.probe import DowntimeProbe, longest_gap, parse_ping, parse_reply

ADDR = "10.242.1.100"


def reply(ts: float, seq: int, extra: str = "") -> str:
    return f"[{ts:.6f}] 64 bytes from {ADDR}: icmp_seq={seq} ttl=64 time=0.210 ms{extra}"


def run_of(start: float, seqs: range, step: float = 0.001) -> list[str]:
    return [reply(start + (s - seqs.start) * step, s) for s in seqs]


def test_parse_reply() -> None:
    assert parse_reply(reply(1700000000.123456, 7)) == (1700000000.123456, 7)
    assert parse_reply("  " + reply(1.5, 1) + "\n") == (1.5, 1)
    for other in (
        f"PING {ADDR} ({ADDR}) 56(84) bytes of data.",
        f"64 bytes from {ADDR}: icmp_seq=1 ttl=64 time=0.2 ms",  # no -D timestamp
        "[1700000000.1] From 10.242.1.254 icmp_seq=3 Destination Host Unreachable",
        reply(1700000000.2, 3, " (DUP!)"),
        "3 packets transmitted, 3 received, 0% packet loss, time 2ms",
        "",
    ):
        assert parse_reply(other) is None


def test_steady_replies_small_gap() -> None:
    lines = ["PING x", *run_of(1000.0, range(1, 1001)), "", "--- stats ---"]
    gap = longest_gap(lines)
    assert gap.replies == 1000 and gap.max_seq == 1000
    assert gap.longest_ms == pytest.approx(1.0, abs=1e-6)
    assert gap.first == pytest.approx(1000.0) and gap.last == pytest.approx(1000.999)


def test_pause_is_the_longest_gap() -> None:
    # replies every ms, then nothing for 512 ms (requests 101..611 lost), then again
    before = run_of(1000.0, range(1, 101))
    after = run_of(1000.099 + 0.512, range(612, 700))
    gap = longest_gap([*before, *after])
    assert gap.longest_ms == pytest.approx(512.0, abs=1e-3)
    assert gap.start == pytest.approx(1000.099)
    assert gap.replies == 100 + 88


def test_gap_uses_timestamps_not_line_order() -> None:
    lines = [reply(10.000, 1), reply(10.300, 4), reply(10.001, 2), reply(10.002, 3)]
    gap = longest_gap(lines)
    assert gap.longest_ms == pytest.approx(298.0, abs=1e-3)
    assert gap.start == pytest.approx(10.002)


def test_late_replies_after_a_stall() -> None:
    # a queue flushed after the guest resumes: replies to old requests arrive in a burst
    lines = [*run_of(5.0, range(1, 11)), *(reply(5.6 + i * 1e-5, 11 + i) for i in range(5))]
    gap = longest_gap(lines)
    assert gap.longest_ms == pytest.approx(591.0, abs=1e-3)


def test_duplicates_are_not_counted() -> None:
    lines = [reply(1.0, 1), reply(1.001, 1, " (DUP!)"), reply(1.002, 2)]
    gap = longest_gap(lines)
    assert gap.replies == 2 and gap.longest_ms == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("lines", [[], ["PING x"], [reply(3.0, 1)]])
def test_fewer_than_two_replies_no_gap(lines: list[str]) -> None:
    gap = longest_gap(lines)
    assert gap.longest_ms is None and gap.start is None
    assert gap.replies == len(lines) - (1 if lines == ["PING x"] else 0)


def test_parse_ping_summary_still_works() -> None:
    res = parse_ping("5 packets transmitted, 4 received, 20% packet loss, time 4ms\n"
                     "rtt min/avg/max/mdev = 0.1/0.2/0.3/0.05 ms\n")
    assert (res.sent, res.received, res.rtt_max_ms) == (5, 4, 0.3)
    with pytest.raises(LabError):
        parse_ping("garbage")


# -- the probe's process handling, with a stand-in for ping -------------------------

FAKE_PING = """
import signal, sys, time
def stop(*_):
    print("")
    print("--- x ping statistics ---")
    print("12 packets transmitted, 5 received, 58% packet loss, time 11ms")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
t = 1000.0
for seq in (1, 2, 3, 9, 10):
    t += 0.001 if seq != 9 else 0.250
    print(f"[{t:.6f}] 64 bytes from 10.0.0.1: icmp_seq={seq} ttl=64 time=0.2 ms", flush=True)
while True:
    time.sleep(0.01)
"""


class FakeProbe(DowntimeProbe):
    """Runs a Python stand-in for ping: same output, same SIGINT behaviour."""

    def __init__(self, script: str, **kw: float) -> None:
        super().__init__("nons", "10.0.0.1", **kw)
        self.script = script

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script]


def test_probe_stops_its_process_and_reports() -> None:
    p = FakeProbe(FAKE_PING)
    with p:
        p.wait_reply(timeout=10, count=5)
        pid = p.pid
        assert pid is not None
        res = p.stop()
    assert p._proc is not None and p._proc.returncode == 0  # exited on SIGINT
    assert (res.sent, res.received) == (12, 5)
    assert res.longest_gap_ms == pytest.approx(250.0, abs=1e-3)
    assert res.gap_start == pytest.approx(1000.003)
    assert not res.deadline_hit and res.duration_s > 0
    assert p.stop() is res  # idempotent


def test_probe_without_replies_reports_whole_duration() -> None:
    p = FakeProbe("import time\nprint('PING x', flush=True)\ntime.sleep(30)\n")
    p.start()
    with pytest.raises(LabError):
        p.wait_reply(timeout=0.3)
    res = p.stop()  # SIGINT ends the sleeping stand-in too
    assert res.received == 0 and res.gap_start is None
    assert res.longest_gap_ms == pytest.approx(res.duration_s * 1000)


def test_probe_that_ended_by_itself() -> None:
    p = FakeProbe("print('ping: unknown host', flush=True)\nraise SystemExit(2)\n")
    p.start()
    with pytest.raises(LabError, match="exited 2"):
        p.wait_reply(timeout=10)
    assert p.stop().deadline_hit


def test_real_argv_is_bounded() -> None:
    argv = DowntimeProbe("lab-probe", ADDR, max_seconds=30.5).argv
    assert argv[:5] == ["ip", "netns", "exec", "lab-probe", "ping"]
    assert argv[argv.index("-i") + 1] == "0.001"
    assert argv[argv.index("-c") + 1] == "30500"  # 30.5 s of 1 ms pings
    assert "-w" not in argv  # a deadline would stop ping at its first error
    assert "-D" in argv and argv[-1] == ADDR
    with pytest.raises(ValueError):
        DowntimeProbe("ns", ADDR, interval=0)
    assert probe.ProbeResult(0, 0, 1.0, None, 1.0).loss == 1.0
