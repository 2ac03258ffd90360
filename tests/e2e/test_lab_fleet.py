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
from typing import Any

import pytest

from vmigrate.lab import _sys, links, net
from vmigrate.lab.net import LabSpec
from vmigrate.lab.traffic import LinkKey, LinkSampler, TenantTraffic

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


def test_wave_plan_on_the_lab(fleet_lab: tuple[Path, str]) -> None:
    """``wave plan --evacuate h1`` on real hosts: capacities measured over SSH, the
    lab's links from its inventory, three guests spread over h2 and h3 within the
    links' budgets, nothing changed (the guests still run on h1)."""
    home, _name = fleet_lab
    names = ["w1", "w2", "w3"]
    try:
        for vm in names:
            res = cli(home, "vm", "create", vm, "--host", "h1", "--memory", "128M",
                      "--workload", "idle")
            assert res.returncode == 0, res.stderr
        res = cli(home, "host", "list", "--json")
        assert res.returncode == 0, res.stderr
        hosts = {h["host"]: h for h in json.loads(res.stdout)}
        assert hosts["h1"]["measured"] and len(hosts["h1"]["vms"]) == 3
        res = cli(home, "wave", "plan", "--evacuate", "h1", "--json")
        assert res.returncode == 0, res.stderr
        plan = json.loads(res.stdout)
        moves = {m["vm"]: m["dst"] for m in plan["placement"]["moves"]}
        assert set(moves) == set(names) and set(moves.values()) == {"h2", "h3"}, moves
        sched = plan["schedule"]
        assert sched["makespan_s"] > 0
        assert plan["sequential_makespan_s"] >= sched["makespan_s"] - 1e-6
        # within h2's and h3's downlink budgets (100 mbit x 0.8) at every step
        for link in ("h2-down", "h3-down"):
            for _t, rate in sched["links"][link]:
                assert rate <= 100 * MBIT * 0.8 * 1.0001, (link, rate)
        res = cli(home, "vm", "list", "--json")
        assert res.returncode == 0, res.stderr
        assert {v["name"]: v["host"] for v in json.loads(res.stdout)} == dict.fromkeys(
            names, "h1")
    finally:
        for vm in names:
            cli(home, "vm", "destroy", vm)


def _guest(home: Path, vm: str, memory: str, workload: str, host: str = "h1") -> None:
    res = cli(home, "vm", "create", vm, "--host", host, "--memory", memory, "--workload",
              workload)
    assert res.returncode == 0, res.stderr


def _hosts_of(home: Path) -> dict[str, str]:
    res = cli(home, "vm", "list", "--json")
    assert res.returncode == 0, res.stderr
    return {v["name"]: v["host"] for v in json.loads(res.stdout)}


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_host_maintenance_evacuates_within_budgets_and_resumes(
        fleet_lab: tuple[Path, str]) -> None:
    """Six guests on h1 (idle and dirtying memory), and one too big for h2 or h3:
    'host maintenance h1' moves the six to h2 and h3 (spread, verified), keeps every
    link within its budget (counters at 4 Hz, 1 s averages within budget + 5 %), names
    the big one, exits 10 and leaves h1 draining. Without it, h1 goes to maintenance.
    Then a wave of three back to h1 is SIGKILLed after its first migration started, and
    'wave resume' finishes it: each of them moved exactly once."""
    home, name = fleet_lab
    for h in ("h2", "h3"):  # another test may have reshaped them
        links.set_link_rate(home, h, "100mbit", name, "down")
    inv_path = home / "vmigrate.toml"
    text = inv_path.read_text()
    # h2 and h3 declare 1.5 GiB: the six fit, a 1600 MiB guest fits on neither
    for h in ("h2", "h3"):
        text = text.replace(f"[hosts.{h}]\n", f'[hosts.{h}]\nmemory = "1536M"\n', 1)
    inv_path.write_text(text)
    six = [f"e{i}" for i in range(1, 7)]
    made: list[str] = []
    try:
        for i, vm in enumerate(six):
            _guest(home, vm, "128M", "idle" if i % 2 else "memtouch:wss=16M,rate=500")
            made.append(vm)
        _guest(home, "big", "1600M", "idle")
        made.append("big")
        time.sleep(20)  # let them boot before they move
        budgets: dict[LinkKey, float] = {("h1", "up"): 1000 * MBIT * 0.8,
                                         ("h2", "down"): 100 * MBIT * 0.8,
                                         ("h3", "down"): 100 * MBIT * 0.8}
        with LinkSampler(home, ["h1", "h2", "h3"], name) as sampler:
            res = cli_long(home, "host", "maintenance", "h1", "--json")
        assert res.returncode == 10, (res.returncode, res.stderr[-2000:])
        events = _json_lines(res.stdout)
        report = next(e for e in events if e.get("event") == "report")
        assert [u["vm"] for u in report["unplaceable"]] == ["big"], report
        assert {m["vm"]: m["state"] for m in report["moves"]} == dict.fromkeys(
            six, "done"), report
        where = _hosts_of(home)
        assert {where[vm] for vm in six} == {"h2", "h3"} and where["big"] == "h1", where
        assert sampler.max_gap < 1.0
        over = sampler.max_over(budgets, allowance=0.05)
        print(f"\nevacuation of six: wave {report['wave']} in {report['elapsed_s']:.1f} s "
              f"(planned {report['planned_eta_s']:.1f} s); busiest 1 s: "
              + ", ".join(f"{h} {d} {sampler.peak(h, d) / MBIT:.1f} mbit/s"
                          for h, d in budgets))
        assert over == {}, over
        state = json.loads(cli(home, "host", "list", "h1", "--no-measure", "--json").stdout)
        assert state[0]["state"]["state"] == "draining"

        assert cli(home, "vm", "destroy", "big").returncode == 0
        made.remove("big")
        res = cli_long(home, "host", "maintenance", "h1", "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        state = json.loads(cli(home, "host", "list", "h1", "--no-measure", "--json").stdout)
        assert state[0]["state"]["state"] == "maintenance" and state[0]["vms"] == []

        # back to h1, killed mid-wave, resumed
        assert cli(home, "host", "activate", "h1").returncode == 0
        plan = home / "back.toml"
        back = six[:3]  # three are enough to kill a wave in the middle
        plan.write_text("".join(f'[[move]]\nvm = "{vm}"\nto = "h1"\n\n' for vm in back))
        env = dict(os.environ, VMIGRATE_HOME=str(home))
        env.pop("VMIGRATE_CONFIG", None)
        proc = subprocess.Popen([sys.executable, "-m", "vmigrate.cli.main", "wave", "run",
                                 str(plan), "--json"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        wave = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                ev = json.loads(line) if line.startswith("{") else {}
                wave = ev.get("wave", wave)
                if ev.get("event") == "move" and ev.get("state") == "started":
                    break
        finally:
            proc.kill()  # SIGKILL, by the PID we started
            proc.wait()
        assert wave is not None
        res = cli_long(home, "wave", "resume", str(wave), "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        where = _hosts_of(home)
        assert {vm: where[vm] for vm in back} == dict.fromkeys(back, "h1"), where
        jobs = json.loads(cli(home, "job", "list", "--json").stdout)
        done = [j["vm"] for j in jobs if j["dest"] == "h1" and j["status"] == "completed"]
        assert sorted(done) == sorted(back), jobs  # each moved exactly once
    finally:
        for vm in made:
            cli(home, "vm", "destroy", vm)
        cli(home, "host", "activate", "h1")


def cli_long(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VMIGRATE_HOME=str(home))
    env.pop("VMIGRATE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "vmigrate.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
