"""Pure logic of the lab network: names, plan, index allocation, state file."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from vmigrate.errors import ConflictError, EnvironmentError_, LabError, SpecError, UserError
from vmigrate.lab import net
from vmigrate.lab._plan import (
    IFNAMSIZ,
    MAX_INDEX,
    lab_networks,
    make_plan,
    parse_rate,
    pick_index,
    tbf_params,
    validate_hosts,
    validate_name,
)
from vmigrate.lab._state import MAGIC, VERSION, LabState, Resource, read_state, write_state


def net4(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text, strict=False)


# -- names and spec ------------------------------------------------------------


@pytest.mark.parametrize("name", ["vml", "a", "t1a2b", "abcdef", "x9"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "abcdefg", "1ab", "Vml", "vm-l", "vm_l", "vm l", "-vml", "ä", "vml\n"]
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(SpecError):
        validate_name(name)


@pytest.mark.parametrize("hosts", [0, 9, -1, True])
def test_invalid_host_counts(hosts: int) -> None:
    with pytest.raises(SpecError):
        validate_hosts(hosts)


def test_spec_validate() -> None:
    net.LabSpec().validate()
    net.LabSpec(name="ab", hosts=8, link_rate="200mbit").validate()
    for bad in (net.LabSpec(name="BAD"), net.LabSpec(hosts=0), net.LabSpec(link_rate="fast")):
        with pytest.raises(SpecError):
            bad.validate()


@pytest.mark.parametrize(
    ("rate", "bits"),
    [("1gbit", 10**9), ("200mbit", 200 * 10**6), ("100Mbit", 10**8), ("10mbps", 80 * 10**6),
     ("1.5gbit", 1_500_000_000), ("1mibit", 2**20), ("64kbit", 64_000)],
)
def test_parse_rate(rate: str, bits: int) -> None:
    assert parse_rate(rate) == bits


@pytest.mark.parametrize("rate", ["", "1000", "fast", "1 gbit", "-1gbit", "1gb", "1bit"])
def test_parse_rate_rejects(rate: str) -> None:
    with pytest.raises(SpecError):
        parse_rate(rate)


def test_tbf_params() -> None:
    burst, latency = tbf_params("1gbit")
    assert burst == 500_000 and latency == "50ms"  # 4 ms at 125 MB/s
    assert tbf_params("1mbit")[0] == 64 * 1024  # floor: one GSO packet


# -- plan ----------------------------------------------------------------------


def test_plan_names_fit_and_are_unique() -> None:
    plan = make_plan("abcdef", MAX_INDEX, 8)
    names = plan.interface_names()
    assert all(len(n) <= IFNAMSIZ for n in names)
    hosts_brvm = [n for n in names if n == "brvm"]
    assert len(hosts_brvm) == 1  # one per host namespace, listed once as the plan's bridge
    # within each namespace, names are unique
    per_ns: dict[str, list[str]] = {"root": [plan.mgmt_bridge], plan.switch_netns: [
        plan.switch_mig_bridge, plan.switch_vm_bridge, plan.probe_switch_if]}
    for hp in plan.hosts:
        per_ns["root"].append(hp.mgmt_root)
        per_ns[plan.switch_netns] += [hp.mig_switch_if, hp.vm_switch_if]
        per_ns[hp.netns] = [hp.mgmt_if, hp.mig_if, hp.vm_if, "brvm"]
    for ns, ifs in per_ns.items():
        assert len(ifs) == len(set(ifs)), ns
    # every lab-specific name carries the lab name
    assert all(n.startswith("abcdef-") for n in names if n != "brvm")


def test_plan_addresses() -> None:
    plan = make_plan("vml", 7, 3)
    assert [h.host for h in plan.hosts] == ["h1", "h2", "h3"]
    assert [h.netns for h in plan.hosts] == ["vml-h1", "vml-h2", "vml-h3"]
    assert plan.mgmt_gateway == "10.240.7.1"
    assert [h.mgmt_address for h in plan.hosts] == ["10.240.7.11", "10.240.7.12", "10.240.7.13"]
    assert plan.hosts[1].migration_address == "10.241.7.12"
    assert plan.vm_network == "10.242.7.0/24" and plan.probe_address == "10.242.7.254"
    assert plan.switch_netns == "vml-sw" and plan.probe_netns == "vml-probe"
    assert plan.host("h2").netns == "vml-h2"
    with pytest.raises(KeyError):
        plan.host("h4")


def test_lab_networks_bounds() -> None:
    assert [str(n) for n in lab_networks(1)] == ["10.240.1.0/24", "10.241.1.0/24", "10.242.1.0/24"]
    for bad in (0, MAX_INDEX + 1):
        with pytest.raises(ValueError):
            lab_networks(bad)


# -- index allocation ------------------------------------------------------------


def test_pick_index_lowest_free() -> None:
    assert pick_index([]) == 1
    assert pick_index([net4("192.168.1.0/24"), net4("127.0.0.0/8")]) == 1


def test_pick_index_skips_used_subnets() -> None:
    assert pick_index([net4("10.240.1.1/24")]) == 2
    # any of the three subnets counts, a /32 inside one too
    assert pick_index([net4("10.240.1.0/24"), net4("10.242.2.77/32")]) == 3
    assert pick_index([net4("10.241.1.0/25")]) == 2


def test_pick_index_skips_indexes_of_other_labs() -> None:
    assert pick_index([], taken=[1, 2]) == 3
    assert pick_index([net4("10.240.3.0/24")], taken=[1, 2]) == 4


def test_pick_index_wide_networks_and_ipv6() -> None:
    # a /16 covering all management subnets leaves nothing
    with pytest.raises(LabError):
        pick_index([net4("10.240.0.0/16")])
    # 10.240.0.0/23 covers index 1 only (index 0 does not exist)
    assert pick_index([net4("10.240.0.0/23")]) == 2
    assert pick_index([ipaddress.IPv6Network("fd00::/8")]) == 1


def test_pick_index_exhausted() -> None:
    with pytest.raises(LabError):
        pick_index([], taken=range(1, MAX_INDEX + 1))


# -- state file ------------------------------------------------------------------


def sample_state() -> LabState:
    return LabState(
        name="vml", index=3, hosts=2, link_rate="1gbit", created=1700000000.5,
        uplinks={"h1": "1gbit", "h2": "1gbit"}, downlinks={"h1": "1gbit", "h2": "200mbit"},
        resources=[
            Resource("dir", path="/x/labs/vml"),
            Resource("netns", name="vml-h1"),
            Resource("link", name="vml-mgmt"),
            Resource("link", name="vml-h1m", netns="vml-h1"),
            Resource("sshd", name="h1", netns="vml-h1", path="/x/sshd.pid"),
            Resource("inventory", path="/x/vmigrate.toml"),
        ],
    )


def test_state_round_trip(tmp_path: Path) -> None:
    state = sample_state()
    path = tmp_path / "state.json"
    write_state(path, state)
    raw = json.loads(path.read_text())
    assert raw["magic"] == MAGIC and raw["version"] == VERSION
    assert read_state(path) == state
    state.phase = "up"
    write_state(path, state)
    assert read_state(path).phase == "up"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


@pytest.mark.parametrize("version", [0, 3, "1", "2", None, True])
def test_state_rejects_unknown_version(version: object) -> None:
    raw = json.loads(sample_state().to_json())
    raw["version"] = version
    with pytest.raises(LabError, match="version"):
        LabState.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(magic="something-else"),
        lambda r: r.pop("magic"),
        lambda r: r.update(index="3"),
        lambda r: r.update(hosts=True),
        lambda r: r.update(phase="exploded"),
        lambda r: r.pop("resources"),
        lambda r: r["resources"].append({"kind": "volcano"}),
        lambda r: r["resources"].append({"kind": "link", "name": "x", "colour": "red"}),
        lambda r: r["resources"].append({"kind": "link", "name": 5}),
        lambda r: r.update(uplinks={"h1": 5}),
        lambda r: r.update(downlinks=["h1"]),
    ],
)
def test_state_rejects_invalid(mutate: object) -> None:
    raw = json.loads(sample_state().to_json())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(LabError):
        LabState.from_json(json.dumps(raw))


def test_state_rejects_garbage(tmp_path: Path) -> None:
    for text in ("", "not json", "[]", '"x"'):
        with pytest.raises(LabError):
            LabState.from_json(text)
    with pytest.raises(FileNotFoundError):
        read_state(tmp_path / "absent.json")


# -- guards that need no root ------------------------------------------------------


def test_require_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentError_, match="root"):
        net.require_root()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    net.require_root()


def test_lab_up_without_root_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(EnvironmentError_):
        net.lab_up(net.LabSpec(name="tnr"), tmp_path)
    with pytest.raises(EnvironmentError_):
        net.lab_down(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_lab_up_bad_spec_first(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        net.lab_up(net.LabSpec(name="toolongname"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_refuses_user_inventory(tmp_path: Path) -> None:
    (tmp_path / "vmigrate.toml").write_text('[hosts.a]\ndata_dir = "/d"\n')
    with pytest.raises(ConflictError):
        net._refuse_if_taken(tmp_path, "tzz")
    (tmp_path / "vmigrate.toml").write_text("not = [toml")
    with pytest.raises(ConflictError):
        net._refuse_if_taken(tmp_path, "tzz")


def test_refuses_lab_already_up(tmp_path: Path) -> None:
    (tmp_path / "labs" / "tzz").mkdir(parents=True)
    with pytest.raises(ConflictError):
        net._refuse_if_taken(tmp_path, "tzz")


def test_resolve_name(tmp_path: Path) -> None:
    assert net._resolve_name(tmp_path, None) is None
    assert net._resolve_name(tmp_path, "abc") == "abc"
    with pytest.raises(SpecError):
        net._resolve_name(tmp_path, "../x")
    (tmp_path / "labs" / "one").mkdir(parents=True)
    assert net._resolve_name(tmp_path, None) == "one"
    (tmp_path / "labs" / "two").mkdir()
    with pytest.raises(UserError):
        net._resolve_name(tmp_path, None)
    (tmp_path / "vmigrate.toml").write_text(
        '[lab]\nname = "two"\ndir = "/x"\nvm_network = "10.242.1.0/24"\nprobe_netns = "two-probe"\n'
    )
    assert net._resolve_name(tmp_path, None) == "two"


def test_lab_down_nothing_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert net.lab_down(tmp_path) == []
    assert net.lab_down(tmp_path, "nolab") == []


def test_lab_down_rejects_unknown_state_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    labdir = tmp_path / "labs" / "tzz"
    labdir.mkdir(parents=True)
    raw = json.loads(sample_state().to_json())
    raw["version"] = 99
    (labdir / "state.json").write_text(json.dumps(raw))
    with pytest.raises(LabError, match="version"):
        net.lab_down(tmp_path, "tzz")
    assert (labdir / "state.json").exists()  # nothing touched


def test_qemu_pidfile_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pidfile = tmp_path / "vm1" / "qemu.pid"
    me = os.getpid()
    assert net._mentions(me, ["qemu-system-x86_64", "-pidfile", str(pidfile)], pidfile)
    assert net._mentions(me, ["qemu", "-pidfile", "vm1/qemu.pid"], pidfile)
    assert net._mentions(me, ["qemu", "-pidfile=vm1/qemu.pid"], pidfile)
    assert not net._mentions(me, ["qemu", "-pidfile", "vm2/qemu.pid"], pidfile)
    assert not net._mentions(me, ["qemu", "-name", "vm1"], pidfile)


def test_tbf_rate_parse() -> None:
    line = "qdisc tbf 8001: root refcnt 3 rate 200Mbit burst 100000b lat 50ms"
    assert net._tbf_rate(line) == "200Mbit"
    assert net._tbf_rate("qdisc noqueue 0: root refcnt 2") is None
    assert net._tbf_rate(None) is None
