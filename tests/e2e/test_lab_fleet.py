"""End to end: what fleet tests need of the lab, on a real 3-host lab.

h1's uplink is 1gbit, h2's and h3's downlinks 100mbit. Tenant traffic from h1 to h2
runs at h2's downlink; the link sampler's 1 s averages stay within it (+5 %) and h3's
downlink stays idle; a rate changed on the running lab takes effect at once.
Needs root, iproute2 and openssh-server; the lab is torn down whatever happens.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmigrate.lab import _sys, links, net
from vmigrate.lab.net import LabSpec
from vmigrate.lab.traffic import LinkSampler, TenantTraffic

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(not os.access("/usr/sbin/sshd", os.X_OK), reason="sshd not installed"),
]

MBIT = 1e6 / 8  # bytes/s
#: TCP payload of a full 1514-byte frame (1448 of it with timestamps): what a tbf rate,
#: which counts whole frames, leaves for data
PAYLOAD = 1448 / 1514


@pytest.fixture(scope="module")
def fleet_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    home = tmp_path_factory.mktemp("fleethome")
    name = "f" + secrets.token_hex(2)
    try:
        net.lab_up(LabSpec(name=name, hosts=3, link_rate="1gbit", uplinks={"h1": "1gbit"},
                           downlinks={"h2": "100mbit", "h3": "100mbit"}), home)
        yield home, name
    finally:
        net.lab_down(home, name)
        left = [ns for ns in _sys.netns_names() if ns.startswith(f"{name}-")]
        assert left == [], f"namespaces left: {left}"


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMIGRATE_HOME=str(home))
    env.pop("VMIGRATE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_directions_shaped_and_recorded(fleet_lab: tuple[Path, str]) -> None:
    home, name = fleet_lab
    status = {h.host: (h.uplink_rate, h.downlink_rate) for h in net.lab_status(home, name).hosts}
    assert status == {"h1": ("1Gbit", "1Gbit"), "h2": ("1Gbit", "100Mbit"),
                      "h3": ("1Gbit", "100Mbit")}
    assert links.lab_link_rates(home, name) == {
        "h1": (125e6, 125e6), "h2": (125e6, 12.5e6), "h3": (125e6, 12.5e6)}


def test_tenant_traffic_runs_at_the_downlink(fleet_lab: tuple[Path, str]) -> None:
    home, name = fleet_lab
    with LinkSampler(home, name=name) as sampler, \
            TenantTraffic(home, "h1", "h2", name=name) as traffic:
        time.sleep(3.0)
    result = traffic.result
    assert result is not None
    peaks = {(h, d): sampler.peak(h, d) for h in sampler.hosts for d in ("up", "down")}
    print(f"\ntenant h1->h2: {result.received_bytes} B in {result.seconds:.2f} s = "
          f"{result.rate / MBIT:.1f} mbit/s payload; sampler {len(sampler.series('h2', 'down'))}"
          f" samples, max gap {sampler.max_gap * 1000:.0f} ms; peak 1 s averages (mbit/s): "
          + ", ".join(f"{h} {d} {r / MBIT:.1f}" for (h, d), r in peaks.items()))
    assert result.received_bytes == result.sent_bytes
    assert result.rate == pytest.approx(100 * MBIT, rel=0.15)
    assert sampler.max_gap < 0.5  # at least 2 Hz
    assert sampler.max_over({("h2", "down"): 100 * MBIT, ("h1", "up"): 1000 * MBIT}) == {}
    assert peaks[("h2", "down")] > 0.85 * 100 * MBIT  # the sampler sees the stream
    # the same stream (h2 counts a few more header bytes: tbf splits what h1 sent whole)
    assert peaks[("h1", "up")] == pytest.approx(peaks[("h2", "down")], rel=0.1)
    assert peaks[("h3", "down")] < 0.01 * 100 * MBIT  # idle: a stray ARP at most


def test_rate_change_takes_effect(fleet_lab: tuple[Path, str]) -> None:
    home, name = fleet_lab
    res = cli(home, "lab", "link", "h2", "--down", "50mbit", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["links"] == {"h2": {"up": "1gbit", "down": "50mbit"}}
    h2 = net.lab_status(home, name).hosts[1]
    assert (h2.uplink_rate, h2.downlink_rate) == ("1Gbit", "50Mbit")
    assert links.lab_link_rates(home, name)["h2"] == (125e6, 50 * MBIT)

    res = cli(home, "lab", "traffic", "h1", "h2", "--seconds", "2", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    print(f"\nafter 'lab link h2 --down 50mbit': {data['rate'] / MBIT:.1f} mbit/s payload, "
          f"wire h2 down busiest 1 s {data['wire']['h2_down']['peak_1s'] / MBIT:.1f} mbit/s")
    assert data["rate"] == pytest.approx(50 * MBIT * PAYLOAD, rel=0.15)
    assert data["wire"]["h2_down"]["peak_1s"] <= 50 * MBIT * 1.05

    # a paced tenant below every link gets its rate (h3 -> h1: 100mbit and 1gbit links)
    with LinkSampler(home, ["h1", "h3"], name) as sampler, \
            TenantTraffic(home, "h3", "h1", 20 * MBIT, name, seconds=2.0) as paced:
        result = paced.wait()
    print(f"paced h3->h1 at 20 mbit/s: {result.rate / MBIT:.1f} mbit/s payload, "
          f"wire h1 down {sampler.total('h1', 'down').rate / MBIT:.1f} mbit/s")
    assert result.rate == pytest.approx(20 * MBIT, rel=0.15)
    assert sampler.max_over({("h1", "down"): 20 * MBIT}, allowance=0.15) == {}
