"""Inventory parsing, lookup order and round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmigrate.config import (
    HostConfig,
    Inventory,
    LabConfig,
    config_path,
    dump_inventory,
    load_inventory,
    parse_inventory,
    state_home,
)
from vmigrate.errors import ConfigError, NotFoundError

GOOD = """
[hosts.h1]
address = "10.240.1.11"
key = "/root/.ssh/id"
data_dir = "/var/lib/vmigrate"
migration_address = "10.241.1.11"
vm_bridge = "brvm"
[hosts.h1.pools]
local = "/var/lib/images"

[hosts.ctl]
transport = "local"
data_dir = "/tmp/ctl"
"""


def test_parse_good() -> None:
    inv = parse_inventory(GOOD)
    h1 = inv.host("h1")
    assert h1.name == "h1"
    assert h1.port == 22 and h1.user == "root"
    assert h1.pools == {"local": Path("/var/lib/images")}
    assert inv.host("ctl").transport == "local"


def test_unknown_host() -> None:
    with pytest.raises(NotFoundError):
        parse_inventory(GOOD).host("h9")


@pytest.mark.parametrize(
    "text",
    [
        "[hosts.h1\n",  # not TOML
        "[hosts.h1]\naddress = 'x'\n",  # data_dir missing
        "[hosts.h1]\ndata_dir='/d'\nport = 70000\n",
        "[hosts.h1]\ndata_dir='/d'\nmigration_address = 'nope'\n",
        "[hosts.h1]\ndata_dir='/d'\ncolour = 'blue'\n",  # unknown key
        "hosts = 3\n",
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_inventory(text)


def test_round_trip() -> None:
    inv = Inventory(
        lab=LabConfig(name="vml", dir=Path("/l"), vm_network="10.242.1.0/24",
                      probe_netns="vml-probe", gateway="10.242.1.254"),
        hosts={"h1": HostConfig(name="h1", address="10.240.1.11", key=Path("/l/id"),
                                data_dir=Path("/l/h1"), migration_address="10.241.1.11",
                                pools={"shared": Path("/l/shared")}, accel="tcg")},
        policies={"slow": {"downtime_ms": 100, "timeout_s": 1.5,
                           "steps": [{"after_stalls": 2, "action": "downtime", "value": 400}]}},
    )
    assert parse_inventory(dump_inventory(inv)) == inv


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMIGRATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VMIGRATE_CONFIG", raising=False)
    assert state_home() == tmp_path / "home"
    assert config_path() == tmp_path / "home" / "vmigrate.toml"
    monkeypatch.setenv("VMIGRATE_CONFIG", str(tmp_path / "env.toml"))
    assert config_path() == tmp_path / "env.toml"
    assert config_path(tmp_path / "explicit.toml") == tmp_path / "explicit.toml"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_inventory(tmp_path / "absent.toml")
    assert load_inventory(tmp_path / "absent.toml", required=False).hosts == {}
