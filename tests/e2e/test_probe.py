"""The downtime probe against a real lab guest: a 0.5 s pause shows as a ~0.5 s gap."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.conftest import Lab
from vmigrate.errors import LabError
from vmigrate.hosts import open_host
from vmigrate.lab.probe import DowntimeProbe, ProbeResult
from vmigrate.qemu import process
from vmigrate.qemu.qmp import qmp_session

pytestmark = pytest.mark.lab


def describe(res: ProbeResult) -> str:
    return (f"longest gap {res.longest_gap_ms:.1f} ms, {res.received}/{res.sent} replies "
            f"({res.loss:.1%} lost) in {res.duration_s:.2f} s")


async def test_probe_sees_a_pause_and_nothing_else(lab: Lab) -> None:
    assert lab.inventory.lab is not None
    netns = lab.inventory.lab.probe_netns
    name = "probe-g"
    info = lab.cli_json("vm", "create", name, "--host", "h1", "--memory", "128M",
                        "--workload", "memtouch:wss=16M,rate=1000")
    assert isinstance(info, dict)
    ip = str(info["ip"])
    cfg = lab.inventory.host("h1")
    host = open_host(cfg)
    try:
        # the guest is up once it answers
        deadline = time.monotonic() + 180
        while True:
            with DowntimeProbe(netns, ip, max_seconds=5) as warm:
                try:
                    warm.wait_reply(timeout=2, count=10)
                    break
                except LabError:
                    assert time.monotonic() < deadline, "guest never answered ping"
        # no pause: the longest gap is a few intervals at most
        with DowntimeProbe(netns, ip, max_seconds=30) as probe:
            probe.wait_reply(timeout=5)
            await asyncio.sleep(2.0)
            calm = probe.stop()
        print(f"\nno pause: {describe(calm)}")
        assert calm.received > 1000
        assert calm.longest_gap_ms < 100

        # a 0.5 s pause of the guest
        async with qmp_session(host, process.vm_paths(cfg, name).qmp, vm=name) as qmp:
            with DowntimeProbe(netns, ip, max_seconds=30) as probe:
                probe.wait_reply(timeout=5, count=100)
                await asyncio.sleep(0.3)
                await qmp.execute("stop")
                t0 = time.monotonic()
                await asyncio.sleep(0.5)
                await qmp.execute("cont")
                paused = time.monotonic() - t0
                await asyncio.sleep(0.5)
                res = await probe.astop()
            assert await qmp.query_status() == "running"
        print(f"paused {paused * 1000:.0f} ms (QMP stop..cont): {describe(res)}; the gap "
              f"began {res.gap_start}")
        assert 400 <= res.longest_gap_ms <= 1500
        assert res.gap_start is not None and not res.deadline_hit
        assert probe.pid is not None
    finally:
        await host.close()
        destroyed = lab.cli("vm", "destroy", name)
    assert destroyed.returncode == 0, destroyed.stderr
