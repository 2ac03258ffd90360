"""End to end: build the lab on this machine, probe it, tear it down.

Needs root, iproute2 and openssh-server; skipped otherwise. Every fixture tears
its lab down in ``finally`` and the tests assert that nothing is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmigrate.config import load_inventory
from vmigrate.errors import ConflictError, LabError
from vmigrate.lab import _sshd, _sys, links, net
from vmigrate.lab.net import LabSpec

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(not os.access("/usr/sbin/sshd", os.X_OK), reason="sshd not installed"),
]


def unique_name() -> str:
    return "t" + secrets.token_hex(2)  # t + 4 hex: matches [a-z][a-z0-9]{0,5}


def run(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False)


def ping(netns: str, address: str) -> bool:
    return run("ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "1", address).returncode == 0


def leftovers(name: str) -> list[str]:
    """Namespaces and root-namespace interfaces named like lab ``name``'s."""
    return [f"netns {n}" for n in _sys.netns_names() if n.startswith(f"{name}-")] + [
        f"link {n}" for n in _sys.root_links() if n.startswith(f"{name}-")
    ]


def wait_no_leftovers(name: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def force_down(home: Path, name: str) -> None:
    """Fixture cleanup: lab_down, and if the state is gone, remove by name."""
    try:
        net.lab_down(home, name)
    except Exception as exc:  # report, then sweep below
        print(f"cleanup: lab_down failed: {exc}")
    for ns in _sys.netns_names():
        if ns.startswith(f"{name}-"):
            for pid in _sys.pids_in_netns([ns]).get(ns, []):
                _sys.terminate([pid])
            run("ip", "netns", "delete", ns)
    for link in _sys.root_links():
        if link.startswith(f"{name}-"):
            run("ip", "link", "delete", "dev", link)


@pytest.fixture
def net_lab(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A 2-host lab, up for the test, removed afterwards whatever happens."""
    name = unique_name()
    try:
        net.lab_up(LabSpec(name=name, hosts=2, link_rate="200mbit"), tmp_path)
        yield tmp_path, name
    finally:
        force_down(tmp_path, name)


def test_lab_up_and_down(tmp_path: Path) -> None:
    name = unique_name()
    messages: list[str] = []
    sshd_pids: list[int] = []
    try:
        t0 = time.monotonic()
        inv = net.lab_up(LabSpec(name=name, hosts=2, link_rate="1gbit"), tmp_path,
                         progress=messages.append)
        up_s = time.monotonic() - t0
        assert messages
        status = net.lab_status(tmp_path)
        n = status.index
        assert status.healthy and status.name == name
        sshd_pids = [h.sshd_pid for h in status.hosts if h.sshd_pid]
        assert len(sshd_pids) == 2

        # inventory as written and read back
        assert inv == load_inventory(tmp_path / "vmigrate.toml").model_copy(
            update={"path": inv.path})
        assert inv.lab is not None and inv.lab.name == name
        assert inv.lab.vm_network == f"10.242.{n}.0/24"
        assert inv.lab.probe_netns == f"{name}-probe"
        h1, h2 = inv.host("h1"), inv.host("h2")
        assert (h1.address, h2.migration_address) == (f"10.240.{n}.11", f"10.241.{n}.12")
        assert h1.vm_bridge == "brvm" and h1.accel == "tcg" and h1.data_dir.is_dir()
        assert h1.pools["shared"] == h2.pools["shared"] and h1.pools["local"].is_dir()

        # namespaces
        for ns in (f"{name}-h1", f"{name}-h2", f"{name}-sw", f"{name}-probe"):
            assert _sys.netns_exists(ns), ns
        assert links.host_netns(tmp_path, "h2") == f"{name}-h2"

        # ssh from the controller, host key verified
        assert h1.key is not None and h1.known_hosts is not None
        for host in (h1, h2):
            res = run("ssh", "-F", "/dev/null", "-i", str(host.key),
                      "-o", f"UserKnownHostsFile={host.known_hosts}",
                      "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                      "-o", "ConnectTimeout=5", f"root@{host.address}",
                      "cat /proc/self/net/dev")
            assert res.returncode == 0, res.stderr
            # the session runs inside the host's namespace
            assert f"{name}-{host.name}m" in res.stdout

        # migration network: h1 reaches h2
        assert h2.migration_address is not None
        assert ping(f"{name}-h1", h2.migration_address)

        # probe namespace and the VM layer-2 network across hosts
        addrs = json.loads(run("ip", "-n", f"{name}-probe", "-j", "addr").stdout)
        assert any(a.get("local") == f"10.242.{n}.254" for link in addrs
                   for a in link.get("addr_info", []))
        for i, hname in ((1, "h1"), (2, "h2")):
            run("ip", "-n", f"{name}-{hname}", "addr", "add", f"10.242.{n}.{249 + i}/24",
                "dev", "brvm")
        assert ping(f"{name}-probe", f"10.242.{n}.250")
        assert ping(f"{name}-probe", f"10.242.{n}.251")
        assert ping(f"{name}-h1", f"10.242.{n}.251")

        # shaping on both ends
        for dev, ns in ((f"{name}-h1g", f"{name}-h1"), (f"{name}-s1g", f"{name}-sw")):
            line = _sys.qdisc_line(dev, ns)
            assert line is not None and " tbf " in line and "rate 1Gbit" in line

        # a second lab of the same name in the same home is refused
        with pytest.raises(ConflictError):
            net.lab_up(LabSpec(name=name), tmp_path)

        # a QEMU process whose pidfile is in a host's data dir is stopped by lab_down
        pidfile = h1.data_dir / "vms" / "v1" / "qemu.pid"
        pidfile.parent.mkdir(parents=True)
        qemu = shutil.which("qemu-system-x86_64")
        if qemu:
            res = run("ip", "netns", "exec", f"{name}-h1", qemu, "-M", "none", "-display",
                      "none", "-daemonize", "-pidfile", str(pidfile))
            assert res.returncode == 0, res.stderr
            assert net.lab_status(tmp_path).hosts[0].qemu_pids

        # a tap device a caller made in the root namespace under the lab's prefix
        res = run("ip", "tuntap", "add", "dev", f"{name}-tap0", "mode", "tap")
        assert res.returncode == 0, res.stderr
        # a stray process in a host namespace (e.g. an ssh session's child)
        stray = subprocess.Popen(["ip", "netns", "exec", f"{name}-h2", "sleep", "300"])

        t0 = time.monotonic()
        removed = net.lab_down(tmp_path)
        down_s = time.monotonic() - t0
        print(f"\nlab_up {up_s:.2f} s, lab_down {down_s:.2f} s")
        assert any(r.startswith("sshd pid") for r in removed)
        if qemu:
            assert any(r.startswith("qemu pid") for r in removed)
        assert stray.wait(timeout=5) is not None
        assert f"link {name}-tap0" in removed
        assert leftovers(name) == []
        assert not any(_sys.pid_alive(p) for p in sshd_pids)
        assert not (tmp_path / "labs" / name).exists()
        assert not (tmp_path / "vmigrate.toml").exists()
        assert name not in run("ip", "netns", "list").stdout
        assert net.lab_down(tmp_path) == []
        assert net.lab_down(tmp_path, name) == []
    finally:
        force_down(tmp_path, name)
        for pid in sshd_pids:
            if _sys.pid_alive(pid) and "sshd" in " ".join(_sys.cmdline(pid)):
                _sys.terminate([pid])
    assert wait_no_leftovers(name) == []


def test_link_rate_and_cut(net_lab: tuple[Path, str]) -> None:
    home, name = net_lab
    status = net.lab_status(home)
    h1, h2 = status.hosts
    assert (h1.uplink_rate, h1.downlink_rate) == ("200Mbit", "200Mbit")

    links.set_link_rate(home, "h1", "50mbit")
    for dev, ns in ((f"{name}-h1g", f"{name}-h1"), (f"{name}-s1g", f"{name}-sw")):
        line = _sys.qdisc_line(dev, ns)
        assert line is not None and "rate 50Mbit" in line
    s1, s2 = net.lab_status(home).hosts
    assert (s1.uplink_rate, s1.downlink_rate) == ("50Mbit", "50Mbit")
    assert (s2.uplink_rate, s2.downlink_rate) == ("200Mbit", "200Mbit")

    assert ping(f"{name}-h1", h2.migration_address)
    links.link_down(home, "h1")
    assert not net.lab_status(home).hosts[0].link_up
    assert not ping(f"{name}-h1", h2.migration_address)
    assert not ping(f"{name}-h2", h1.migration_address)
    # management network is unaffected
    assert ping(f"{name}-h1", h2.mgmt_address)
    links.link_up(home, "h1")
    deadline = time.monotonic() + 5
    while not ping(f"{name}-h1", h2.migration_address):
        assert time.monotonic() < deadline, "migration link did not come back"
    assert net.lab_status(home).hosts[0].link_up
    # shaping survives the cut
    assert net.lab_status(home).hosts[0].uplink_rate == "50Mbit"


def test_two_labs_get_separate_subnets(net_lab: tuple[Path, str], tmp_path_factory:
                                       pytest.TempPathFactory) -> None:
    home1, _name1 = net_lab
    home2 = tmp_path_factory.mktemp("home2")
    name2 = unique_name()
    try:
        net.lab_up(LabSpec(name=name2, hosts=1), home2)
        s1, s2 = net.lab_status(home1), net.lab_status(home2)
        assert s1.index != s2.index
        assert s2.healthy
    finally:
        force_down(home2, name2)
    assert wait_no_leftovers(name2) == []


class Boom(RuntimeError):
    pass


def test_failure_after_sshd_started_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h1's sshd really starts, then starting h2's fails: everything must go."""
    name = unique_name()
    real_start = _sshd.start
    started: list[int] = []

    def start(netns: str, files: _sshd.SshdFiles) -> None:
        if netns.endswith("-h2"):
            raise Boom("injected: sshd of h2 does not start")
        real_start(netns, files)
        started.append(_sshd.wait_ready(f"10.240.{net.lab_status(tmp_path).index}.11", files))

    monkeypatch.setattr(_sshd, "start", start)
    try:
        with pytest.raises(Boom):
            net.lab_up(LabSpec(name=name, hosts=2), tmp_path)
        assert len(started) == 1
        assert not _sys.pid_alive(started[0])
        assert wait_no_leftovers(name) == []
        assert not (tmp_path / "labs" / name).exists()
        assert not (tmp_path / "vmigrate.toml").exists()
    finally:
        force_down(tmp_path, name)
        for pid in started:
            if _sys.pid_alive(pid) and "sshd" in " ".join(_sys.cmdline(pid)):
                _sys.terminate([pid])


def test_failure_in_middle_of_links_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second host's address batch fails after namespaces and veths exist."""
    name = unique_name()
    real_batch = _sys.ip_batch
    seen: list[str | None] = []

    def ip_batch(lines: list[str], netns: str | None = None) -> None:
        seen.append(netns)
        if netns == f"{name}-h2":
            raise LabError("injected: ip batch failed")
        real_batch(lines, netns)

    monkeypatch.setattr(_sys, "ip_batch", ip_batch)
    try:
        with pytest.raises(LabError, match="injected"):
            net.lab_up(LabSpec(name=name, hosts=2), tmp_path)
        assert None in seen and f"{name}-h1" in seen  # resources did exist
        assert wait_no_leftovers(name) == []
        assert not (tmp_path / "labs" / name).exists()
    finally:
        force_down(tmp_path, name)


def test_refuses_user_inventory_and_creates_nothing(tmp_path: Path) -> None:
    name = unique_name()
    user_inv = '[hosts.a]\naddress = "192.0.2.1"\ndata_dir = "/srv/vm"\n'
    (tmp_path / "vmigrate.toml").write_text(user_inv)
    try:
        with pytest.raises(ConflictError):
            net.lab_up(LabSpec(name=name), tmp_path)
        assert leftovers(name) == []
        assert (tmp_path / "vmigrate.toml").read_text() == user_inv
        assert not (tmp_path / "labs").exists()
    finally:
        force_down(tmp_path, name)
    # lab_down leaves a user's inventory alone
    assert (tmp_path / "vmigrate.toml").read_text() == user_inv


def test_lab_down_after_crash_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab_up killed midway (no cleanup ran) is removed by a later lab_down."""
    name = unique_name()

    class Crash(BaseException):
        pass

    def crash(*_args: object, **_kwargs: object) -> tuple[list[str], list[str]]:
        raise Crash  # the process "dies": lab_up's own cleanup does not run

    real_start = _sshd.start

    def start(netns: str, files: _sshd.SshdFiles) -> None:
        real_start(netns, files)
        if netns.endswith("-h2"):
            raise RuntimeError("die here")

    monkeypatch.setattr(_sshd, "start", start)
    monkeypatch.setattr(net, "_teardown", crash)
    try:
        with pytest.raises(Crash):
            net.lab_up(LabSpec(name=name, hosts=2), tmp_path)
        assert leftovers(name)  # the crash left things behind
        monkeypatch.undo()
        removed = net.lab_down(tmp_path, name)
        assert sum(r.startswith("sshd pid") for r in removed) == 2
        assert wait_no_leftovers(name) == []
        assert not (tmp_path / "labs" / name).exists()
    finally:
        monkeypatch.undo()
        force_down(tmp_path, name)
