"""Probes run from the lab's probe namespace, which sits on the VM network."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

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
