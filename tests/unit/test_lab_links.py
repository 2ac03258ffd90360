"""Per-direction link rates, link sampling and tenant traffic of the lab, on plain data
(no root, no namespaces): validation, the state file, rate windows, the tenant program
over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vmigrate.cli import lab as lab_cli
from vmigrate.errors import LabError, NotFoundError, SpecError
from vmigrate.lab import links, net
from vmigrate.lab._netdev import NetDevFile, parse_net_dev
from vmigrate.lab._plan import parse_host_rates, validate_link_rates
from vmigrate.lab._state import LabState, read_state, write_state
from vmigrate.lab.traffic import (
    LinkKey,
    LinkSample,
    LinkSampler,
    RunState,
    TenantTraffic,
    Window,
    window_averages,
)

MBIT = 1e6 / 8  # bytes/s


# -- spec and parsing ----------------------------------------------------------------------------


def test_spec_overrides() -> None:
    spec = net.LabSpec(hosts=3, link_rate="1gbit", uplinks={"h1": "1gbit"},
                       downlinks={"h2": "100mbit", "h3": "100mbit"})
    spec.validate()
    assert spec.link_rates() == {"h1": ("1gbit", "1gbit"), "h2": ("1gbit", "100mbit"),
                                 "h3": ("1gbit", "100mbit")}


@pytest.mark.parametrize("spec", [
    net.LabSpec(hosts=2, uplinks={"h3": "1gbit"}),  # no such host
    net.LabSpec(hosts=2, downlinks={"h0": "1gbit"}),
    net.LabSpec(hosts=2, downlinks={"vml-h1": "1gbit"}),
    net.LabSpec(hosts=2, uplinks={"h1": "fast"}),  # not a rate
    net.LabSpec(hosts=2, uplinks={"h1": "1000"}),  # unit missing
    net.LabSpec(hosts=2, downlinks={"h1": "1kbit"}),  # below the minimum
    net.LabSpec(hosts=2, downlinks={"h1": 5}),  # type: ignore[dict-item]
    net.LabSpec(hosts=2, uplinks=["h1"]),  # type: ignore[arg-type]
])
def test_spec_rejects_bad_overrides(spec: net.LabSpec, tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        spec.validate()
    with pytest.raises(SpecError):  # before anything is made
        net.lab_up(spec, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_validate_link_rates() -> None:
    assert validate_link_rates({}, 1, "uplink") == {}
    assert validate_link_rates({"h8": "10MBps"}, 8, "uplink") == {"h8": "10MBps"}
    with pytest.raises(SpecError):
        validate_link_rates({"h2": "1gbit"}, 1, "downlink")


def test_parse_host_rates() -> None:
    assert parse_host_rates([], "--uplink") == {}
    assert parse_host_rates(["h1=1gbit", " h2 = 200mbit "], "--uplink") == {
        "h1": "1gbit", "h2": "200mbit"}


@pytest.mark.parametrize("items", [
    ["h1"], ["h1="], ["=1gbit"], ["h1:1gbit"], ["host1=1gbit"], ["h0=1gbit"], ["H1=1gbit"],
    ["h1=fast"], ["h1=1gbit", "h1=2gbit"],
])
def test_parse_host_rates_rejects(items: list[str]) -> None:
    with pytest.raises(SpecError):
        parse_host_rates(items, "--downlink")


# -- the state file ------------------------------------------------------------------------------


def lab_state(**kw: object) -> LabState:
    fields: dict[str, object] = dict(
        name="tst", index=4, hosts=3, link_rate="1gbit", created=1.0, phase="up",
        uplinks={"h1": "1gbit", "h2": "1gbit", "h3": "1gbit"},
        downlinks={"h1": "1gbit", "h2": "100mbit", "h3": "100mbit"})
    fields.update(kw)
    return LabState(**fields)  # type: ignore[arg-type]


def write_lab(home: Path, state: LabState) -> Path:
    path = home / "labs" / state.name / "state.json"
    path.parent.mkdir(parents=True)
    write_state(path, state)
    return path


def test_state_directions_round_trip(tmp_path: Path) -> None:
    state = lab_state()
    path = write_lab(tmp_path, state)
    raw = json.loads(path.read_text())
    assert raw["version"] == 2 and "rates" not in raw
    assert raw["downlinks"]["h2"] == "100mbit"
    again = read_state(path)
    assert again == state
    assert again.link_rates("h2") == ("1gbit", "100mbit")
    assert lab_state(uplinks={}, downlinks={}).link_rates("h3") == ("1gbit", "1gbit")


def test_state_version_1_rates_are_both_directions() -> None:
    raw = json.loads(lab_state().to_json())
    for key in ("uplinks", "downlinks"):
        del raw[key]
    raw.update(version=1, rates={"h1": "50mbit"})
    state = LabState.from_json(json.dumps(raw))
    assert state.link_rates("h1") == ("50mbit", "50mbit")
    assert state.link_rates("h2") == ("1gbit", "1gbit")  # not recorded: the lab's rate
    assert json.loads(state.to_json())["version"] == 2  # written back in the new form


def test_lab_link_rates_from_state(tmp_path: Path) -> None:
    write_lab(tmp_path, lab_state())
    rates = links.lab_link_rates(tmp_path, "tst")
    assert rates == {"h1": (125e6, 125e6), "h2": (125e6, 12.5e6), "h3": (125e6, 12.5e6)}
    assert links.lab_link_rates(tmp_path) == rates  # the only lab of this home
    with pytest.raises(NotFoundError):
        links.lab_link_rates(tmp_path, "other")


def test_set_link_rate_checks_before_root(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for rate, direction in (("fast", "up"), ("1gbit", "sideways")):
        with pytest.raises(SpecError):
            links.set_link_rate(tmp_path, "h1", rate, direction=direction)  # type: ignore[arg-type]


def test_cli_link_shows_and_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lab(tmp_path, lab_state())
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(lab_cli.app, ["link", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"lab": "tst", "links": {
        "h1": {"up": "1gbit", "down": "1gbit"}, "h2": {"up": "1gbit", "down": "100mbit"},
        "h3": {"up": "1gbit", "down": "100mbit"}}}
    res = runner.invoke(lab_cli.app, ["link", "h2", "--json"])
    assert json.loads(res.output)["links"] == {"h2": {"up": "1gbit", "down": "100mbit"}}
    res = runner.invoke(lab_cli.app, ["link", "h2"])
    assert res.exit_code == 0 and "100mbit" in res.output
    # usage errors: exit 2, nothing changed
    assert runner.invoke(lab_cli.app, ["link", "h2", "--rate", "1gbit", "--up", "1gbit"]
                         ).exit_code == 2
    assert runner.invoke(lab_cli.app, ["link", "--down", "1gbit"]).exit_code == 2
    res = runner.invoke(lab_cli.app, ["link", "h9", "--down", "1gbit"])
    assert isinstance(res.exception, NotFoundError)
    res = runner.invoke(lab_cli.app, ["link", "h2", "--up", "1gbit", "--down", "slow"])
    assert isinstance(res.exception, SpecError)
    assert read_state(tmp_path / "labs" / "tst" / "state.json") == lab_state()


def test_cli_up_parses_overrides_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path))
    res = CliRunner().invoke(lab_cli.app, ["up", "--hosts", "2", "--downlink", "h3=1gbit"])
    assert isinstance(res.exception, SpecError)
    res = CliRunner().invoke(lab_cli.app, ["up", "--uplink", "h1"])
    assert isinstance(res.exception, SpecError)
    assert list(tmp_path.iterdir()) == []


# -- windows and the sampler's helpers -------------------------------------------------------------


def steady(rate: float, seconds: float, interval: float = 0.25,
           start: float = 100.0) -> list[tuple[float, int]]:
    n = int(seconds / interval)
    return [(start + i * interval, int(rate * i * interval)) for i in range(n + 1)]


def test_window_averages_steady() -> None:
    windows = window_averages(steady(1000.0, 3.0), 1.0)
    assert len(windows) == 9  # samples at 1.0 .. 3.0 s each reach back 1 s
    assert all(w.seconds == pytest.approx(1.0) for w in windows)
    assert all(w.rate == pytest.approx(1000.0) for w in windows)


def test_window_averages_uneven_and_short() -> None:
    series = [(0.0, 0), (0.4, 400), (1.3, 1300), (1.5, 1500), (2.9, 2900)]
    windows = window_averages(series, 1.0)
    # 1.3 reaches back to 0.0 (0.4 is too close); 1.5 to 0.4; 2.9 to 1.5
    assert [(w.start, w.end) for w in windows] == [(0.0, 1.3), (0.4, 1.5), (1.5, 2.9)]
    assert all(w.rate == pytest.approx(1000.0) for w in windows)
    assert window_averages(series[:2], 1.0) == []  # shorter than a window
    assert window_averages([], 1.0) == []


def test_window_averages_sees_a_burst() -> None:
    series = steady(1000.0, 2.0)
    t, b = series[-1]
    series += [(t + 0.25, b + 2000), (t + 0.5, b + 2250)]  # 2000 bytes in a quarter second
    assert max(w.rate for w in window_averages(series, 1.0)) == pytest.approx(2750.0)


@pytest.mark.parametrize("series", [
    [(0.0, 0), (0.0, 10)], [(1.0, 0), (0.5, 10)], [(0.0, 10), (1.0, 5)]])
def test_window_averages_rejects(series: list[tuple[float, int]]) -> None:
    with pytest.raises(ValueError):
        window_averages(series, 1.0)
    with pytest.raises(ValueError):
        window_averages([], 0.0)


def sampled(rates: dict[str, tuple[float, float]], seconds: float = 3.0) -> LinkSampler:
    """A sampler holding steady series: host -> (up, down) bytes/s."""
    samples = {}
    for host, (up, down) in rates.items():
        ups, downs = steady(up, seconds), steady(down, seconds)
        samples[host] = [LinkSample(t, u, d) for (t, u), (_t, d) in zip(ups, downs, strict=True)]
    return LinkSampler.from_samples(samples)


def test_sampler_helpers() -> None:
    sampler = sampled({"h1": (100 * MBIT, 0.0), "h2": (0.0, 98 * MBIT), "h3": (0.0, 0.0)})
    assert sampler.state is RunState.STOPPED and sampler.hosts == ["h1", "h2", "h3"]
    assert sampler.peak("h2", "down") == pytest.approx(98 * MBIT, rel=1e-6)
    assert sampler.peak("h3", "down") == 0.0
    assert sampler.total("h1", "up").rate == pytest.approx(100 * MBIT, rel=1e-6)
    assert sampler.max_gap == pytest.approx(0.25)
    averages = sampler.averages()
    assert set(averages) == {(h, d) for h in ("h1", "h2", "h3") for d in ("up", "down")}
    assert len(sampler.rates("h1", "up")) == 12
    budgets: dict[LinkKey, float] = {
        ("h1", "up"): 1000 * MBIT, ("h2", "down"): 100 * MBIT, ("h3", "down"): 1.0}
    assert sampler.max_over(budgets) == {}
    # 98 mbit is over a 90 mbit budget by more than 5 %, not by more than 10 %
    over = sampler.max_over({("h2", "down"): 90 * MBIT})
    assert list(over) == [("h2", "down")] and isinstance(over[("h2", "down")], Window)
    assert sampler.max_over({("h2", "down"): 90 * MBIT}, allowance=0.10) == {}
    with pytest.raises(LabError):
        sampler.series("h9", "up")
    with pytest.raises(SpecError):
        sampler.series("h1", "sideways")  # type: ignore[arg-type]


def test_sampler_guards(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        LinkSampler(tmp_path, interval=0)
    sampler = sampled({"h1": (1.0, 1.0)})
    with pytest.raises(LabError):
        sampler.start()  # stopped: a sampler runs once
    sampler.stop()  # idempotent


# -- counters --------------------------------------------------------------------------------------

NET_DEV = (
    "Inter-|   Receive                                      |  Transmit\n"
    " face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop "
    "fifo colls carrier compressed\n"
    "    lo:    1200      12 0 0 0 0 0 0     1200      12 0 0 0 0 0 0\n"
    "tst-h1g: 98765432101 70000 0 0 0 0 0 0 123456789 5000 0 0 0 0 0 0\n"
)


def test_parse_net_dev() -> None:
    assert parse_net_dev(NET_DEV) == {"lo": (1200, 1200), "tst-h1g": (98765432101, 123456789)}
    for bad in ("", "garbage\n", NET_DEV + "eth0: 1 2 3\n", NET_DEV + "eth0 1 2 3 4 5 6 7 8 9\n"):
        with pytest.raises(LabError):
            parse_net_dev(bad)


def test_netdev_file_reads_again(tmp_path: Path) -> None:
    with NetDevFile(None) as f:
        first = f.read()
        assert "lo" in first
        assert f.counters("lo")[0] >= first["lo"][0]
        with pytest.raises(LabError):
            f.counters("no-such-if0")
    with pytest.raises(LabError):
        f.read()
    with pytest.raises(LabError):
        NetDevFile("../etc")


# -- tenant traffic -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"src_host": "h1", "dst_host": "h1"}, {"rate": 0.0}, {"rate": float("nan")},
    {"rate": -5.0}, {"seconds": 0.0}, {"seconds": 700.0}])
def test_tenant_traffic_checks_first(tmp_path: Path, kw: dict[str, object]) -> None:
    args: dict[str, object] = {"src_host": "h1", "dst_host": "h2"}
    args.update(kw)
    with pytest.raises(SpecError):
        TenantTraffic(tmp_path, **args)  # type: ignore[arg-type]


def test_tenant_traffic_guards(tmp_path: Path) -> None:
    traffic = TenantTraffic(tmp_path, "h1", "h2")
    with pytest.raises(LabError):
        traffic.stop()  # never started
    with pytest.raises(NotFoundError):
        traffic.start()  # no lab in this home
    assert traffic._receiver is None and traffic._sender is None


def tenant(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vmigrate.lab._tenant", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_tenant_program_over_loopback() -> None:
    """The two ends, run without a namespace: a paced stream of 0.6 s at 2 MB/s."""
    recv = tenant("--limit", "20", "recv", "--bind", "127.0.0.1")
    send = None
    try:
        assert recv.stdout is not None
        ready = json.loads(recv.stdout.readline())
        assert ready["event"] == "ready" and ready["pid"] == recv.pid
        send = tenant("--limit", "20", "send", "--source", "127.0.0.1", "--to", "127.0.0.1",
                      "--port", str(ready["port"]), "--rate", "2e6", "--seconds", "0.6")
        out, errors = send.communicate(timeout=15)
        assert send.returncode == 0, errors
        sent = [json.loads(line) for line in out.splitlines()]
        assert [s["event"] for s in sent] == ["ready", "done"]
        got = json.loads(recv.communicate(timeout=10)[0])
        assert recv.returncode == 0
        assert got["event"] == "done" and got["bytes"] == sent[1]["bytes"]
        assert got["bytes"] / got["seconds"] == pytest.approx(2e6, rel=0.25)
    finally:
        for proc in (send, recv):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_tenant_program_stops_on_sigterm() -> None:
    recv = tenant("--limit", "20", "recv", "--bind", "127.0.0.1")
    try:
        assert recv.stdout is not None
        json.loads(recv.stdout.readline())
        time.sleep(0.1)
        recv.terminate()
        got = json.loads(recv.communicate(timeout=10)[0])
        assert recv.returncode == 0 and got == {"event": "done", "bytes": 0, "seconds": 0.0}
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
