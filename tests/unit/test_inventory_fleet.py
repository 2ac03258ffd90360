"""Issue 14 (fleets): capacity and topology in the inventory. Every new field is
validated when the file is read (a ConfigError naming the field), the typed accessors
give bytes and bytes/s, and groups resolve a VM's placement rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmigrate import validate
from vmigrate.config import (
    DEFAULT_BUDGET,
    HostConfig,
    Inventory,
    VmGroups,
    dump_inventory,
    group_members,
    groups_for,
    parse_inventory,
)
from vmigrate.errors import ConfigError, NotFoundError
from vmigrate.plan.decide import Tier

G = 1 << 30
BASE = '[hosts.h1]\ndata_dir = "/var/lib/vmigrate"\n'

FLEET = """
[hosts.h1]
data_dir = "/var/lib/vmigrate"
memory = "256G"
cpus = 64
reserve_memory = "16G"
uplink = "rack1-up"
downlink = "rack1-down"
max_migrations_in = 4
max_migrations_out = 3
[hosts.h1.labels]
rack = "r1"
zone = "eu-west-1"
"tier.storage" = 3

[hosts.h2]
data_dir = "/var/lib/vmigrate"
state = "maintenance"
uplink = "rack1-up"

[links.rack1-up]
capacity = "10gbit"
budget = 0.25

[links.h2-down]
capacity = "200mbit"

[groups.db]
vms = ["db-*", "pg[0-9]"]
placement = "apart"

[groups.shop]
vms = ["shop-web", "shop-db"]
placement = "together"

[groups.eu]
vms = ["*-eu"]
placement = "apart"
"""


def _toml(value: object) -> str:
    return json.dumps(value)  # a JSON string or number is a TOML one


# -- defaults ---------------------------------------------------------------------------------


def test_defaults_of_a_host_that_says_nothing() -> None:
    inv = parse_inventory(BASE)
    h1 = inv.host("h1")
    assert (h1.memory, h1.cpus, h1.reserve_memory, h1.state, h1.labels) == (
        None, None, "0", "active", {})
    assert (h1.uplink, h1.downlink) == ("h1-up", "h1-down")
    assert (h1.max_migrations_in, h1.max_migrations_out) == (2, 2)
    cap = inv.host_capacity("h1")
    assert (cap.memory, cap.reserve_memory, cap.cpus, cap.vm_memory) == (None, 0, None, None)
    link = inv.link("h1-up")
    assert (link.capacity, link.budget, link.declared, link.migration_rate) == (
        None, DEFAULT_BUDGET, False, None)
    assert inv.declared_state("h1") == "active"
    assert inv.links == {} and inv.groups == {}


def test_a_host_built_in_code_gets_its_default_links() -> None:
    nameless = HostConfig(data_dir=Path("/d"))
    assert nameless.uplink is None
    inv = Inventory(hosts={"h7": nameless})
    assert (inv.host("h7").uplink, inv.host("h7").downlink) == ("h7-up", "h7-down")
    assert inv.host_links("h7") == ("h7-up", "h7-down")
    named = HostConfig(name="h8", data_dir=Path("/d"))
    assert (named.uplink, named.downlink) == ("h8-up", "h8-down")


# -- the fields, typed --------------------------------------------------------------------------


def test_capacity_topology_and_accessors() -> None:
    inv = parse_inventory(FLEET)
    h1, h2 = inv.host("h1"), inv.host("h2")
    assert h1.labels == {"rack": "r1", "zone": "eu-west-1", "tier.storage": "3"}
    assert (h2.state, h2.uplink, h2.downlink) == ("maintenance", "rack1-up", "h2-down")
    cap = inv.host_capacity("h1")
    assert (cap.memory, cap.reserve_memory, cap.cpus) == (256 * G, 16 * G, 64)
    assert cap.vm_memory == 240 * G
    assert (cap.max_migrations_in, cap.max_migrations_out) == (4, 3)
    up = inv.link("rack1-up")
    assert (up.capacity, up.budget, up.declared) == (1_250_000_000, 0.25, True)
    assert up.migration_rate == pytest.approx(312_500_000)
    down = inv.link("h2-down")
    assert (down.capacity, down.budget) == (25_000_000, 0.5)
    assert inv.link("rack1-down").capacity is None  # used by h1, no entry: measured
    assert inv.link_names() == {"rack1-up", "rack1-down", "h2-down"}
    with pytest.raises(NotFoundError):
        inv.link("nowhere")
    with pytest.raises(NotFoundError):
        inv.host_capacity("h9")


@pytest.mark.parametrize(("text", "expected"), [
    ('"64G"', 64 * G), ('"1.5T"', int(1.5 * (1 << 40))), ('"512MiB"', 512 << 20),
    (str(8 * G), 8 * G),  # a TOML integer is bytes
])
def test_memory_sizes(text: str, expected: int) -> None:
    inv = parse_inventory(BASE + f"memory = {text}\n")
    assert inv.host_capacity("h1").memory == expected


@pytest.mark.parametrize(("text", "expected"), [
    ('"1gbit"', 125_000_000), ('"200mbit"', 25_000_000), ('"100M"', 100 << 20),
    ('"2.5Gbit/s"', 312_500_000), ('"800mbps"', 100_000_000),
])
def test_link_rates(text: str, expected: int) -> None:
    inv = parse_inventory(BASE + f"[links.h1-up]\ncapacity = {text}\n")
    assert inv.link("h1-up").capacity == expected


def test_a_link_shared_by_hosts_and_budget_one() -> None:
    text = (BASE + 'uplink = "spine"\n[hosts.h2]\ndata_dir = "/d"\nuplink = "spine"\n'
            '[links.spine]\ncapacity = "40gbit"\nbudget = 1\n')
    inv = parse_inventory(text)
    assert inv.host_links("h1")[0] == inv.host_links("h2")[0] == "spine"
    assert inv.link("spine").migration_rate == 5_000_000_000


# -- wrong values: ConfigError naming the field --------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ('memory = "64"\n', "memory"),  # 64 bytes: a unit forgotten
    ('memory = "lots"\n', "memory"),
    ('memory = true\n', "memory"),
    ('memory = "64G;rm"\n', "memory"),
    ('memory = "4G"\nreserve_memory = "4G"\n', "reserve_memory"),
    ('memory = "4G"\nreserve_memory = "8G"\n', "reserve_memory"),
    ('reserve_memory = "-1G"\n', "reserve_memory"),
    ('cpus = 0\n', "cpus"), ('cpus = "8"\n', "cpus"), ('cpus = true\n', "cpus"),
    ('cpus = 2.5\n', "cpus"),
    ('state = "gone"\n', "state"), ('state = "Active"\n', "state"),
    ('max_migrations_in = 0\n', "max_migrations_in"),
    ('max_migrations_in = 65\n', "max_migrations_in"),
    ('max_migrations_out = "2"\n', "max_migrations_out"),
    ('max_migrations_out = false\n', "max_migrations_out"),
    ('uplink = "a;b"\n', "uplink"), ('downlink = "a b"\n', "downlink"),
    ('uplink = ""\n', "uplink"), ('downlink = "-x"\n', "downlink"),
    ('labels = "rack=r1"\n', "labels"),
    ('[hosts.h1.labels]\nrack = "r 1"\n', "labels"),
    ('[hosts.h1.labels]\nrack = "$(id)"\n', "labels"),
    ('[hosts.h1.labels]\n"a;b" = "x"\n', "labels"),
    ('[hosts.h1.labels]\nrack = true\n', "labels"),
    ('[hosts.h1.labels]\nrack = ["r1"]\n', "labels"),
    ('[links.h1-up]\ncapacity = "1000"\n', "capacity"),  # no unit: bits or bytes?
    ('[links.h1-up]\ncapacity = 1000000000\n', "capacity"),
    ('[links.h1-up]\ncapacity = "fast"\n', "capacity"),
    ('[links.h1-up]\ncapacity = "10kbit"\n', "capacity"),  # below 1mbit
    ('[links.h1-up]\nbudget = 0\n', "budget"), ('[links.h1-up]\nbudget = 1.5\n', "budget"),
    ('[links.h1-up]\nbudget = -0.1\n', "budget"), ('[links.h1-up]\nbudget = "half"\n', "budget"),
    ('[links.h1-up]\nbudget = true\n', "budget"), ('[links.h1-up]\nbudget = nan\n', "budget"),
    ('[links.h1-up]\nshare = 0.5\n', "share"),
    ('[links.h1-upp]\ncapacity = "1gbit"\n', "h1-upp"),  # no host uses it: a typo
    ('[links."a;b"]\ncapacity = "1gbit"\n', "links"),
    ('[groups.g]\nvms = ["a;b"]\nplacement = "apart"\n', "vms"),
    ('[groups.g]\nvms = []\nplacement = "apart"\n', "vms"),
    ('[groups.g]\nvms = [""]\nplacement = "apart"\n', "vms"),
    ('[groups.g]\nvms = "db-*"\nplacement = "apart"\n', "vms"),
    ('[groups.g]\nvms = ["db-*"]\n', "placement"),
    ('[groups.g]\nvms = ["db-*"]\nplacement = "near"\n', "placement"),
    ('[groups."g h"]\nvms = ["db-*"]\nplacement = "apart"\n', "groups"),
    ('[groups.g]\nvms = ["db-*"]\nplacement = "apart"\nhosts = 2\n', "hosts"),
])
def test_wrong_values_name_their_field(body: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_inventory(BASE + body)
    assert field in str(info.value)


@pytest.mark.parametrize("value", ["x';touch PWNED;'", "$(touch PWNED)", "a b", "a\nb",
                                   "a\u0000b", "`id`", "a|b", "é\u202eb", "x" * 200])
@pytest.mark.parametrize("field", ["uplink", "downlink", "label-name", "label-value",
                                   "link-name", "group-name", "group-vms"])
def test_hostile_names_are_refused(field: str, value: str) -> None:
    text = {
        "uplink": BASE + f"uplink = {_toml(value)}\n",
        "downlink": BASE + f"downlink = {_toml(value)}\n",
        "label-name": BASE + f"[hosts.h1.labels]\n{_toml(value)} = \"x\"\n",
        "label-value": BASE + f"[hosts.h1.labels]\nrack = {_toml(value)}\n",
        "link-name": BASE + f"uplink = \"up\"\n[links.{_toml(value)}]\nbudget = 0.5\n",
        "group-name": f"[groups.{_toml(value)}]\nvms = [\"a\"]\nplacement = \"apart\"\n",
        "group-vms": f"[groups.g]\nvms = [{_toml(value)}]\nplacement = \"apart\"\n",
    }[field]
    with pytest.raises(ConfigError):
        parse_inventory(text)


def test_an_unused_link_error_suggests_the_one_meant() -> None:
    with pytest.raises(ConfigError, match="h1-up"):
        parse_inventory(BASE + '[links.h1-upp]\ncapacity = "1gbit"\n')


def test_an_undefined_link_is_fine() -> None:
    inv = parse_inventory(BASE + 'uplink = "core-7"\n')
    assert inv.link("core-7").declared is False


# -- groups ------------------------------------------------------------------------------------


def test_groups_for_resolves_together_and_apart() -> None:
    inv = parse_inventory(FLEET)
    assert groups_for(inv, "db-1") == VmGroups(together=None, apart=("db",))
    assert groups_for(inv, "pg7") == VmGroups(apart=("db",))
    assert groups_for(inv, "pg77") == VmGroups()
    assert groups_for(inv, "shop-web") == VmGroups(together="shop")
    assert groups_for(inv, "db-eu").apart == ("db", "eu")
    assert groups_for(inv, "db-eu").keys == ("db", "eu")
    assert groups_for(inv, "shop-db").keys == ("shop",)
    assert groups_for(inv, "DB-1") == VmGroups()  # case-sensitive, as tiers
    assert group_members(inv, "shop", ["shop-web", "web", "shop-db"]) == ["shop-web", "shop-db"]
    with pytest.raises(NotFoundError):
        group_members(inv, "nope", [])


def test_a_vm_in_two_together_groups_is_an_error_when_resolved() -> None:
    inv = parse_inventory(BASE + '[groups.a]\nvms = ["web-*"]\nplacement = "together"\n'
                          '[groups.b]\nvms = ["web-1*"]\nplacement = "together"\n')
    assert groups_for(inv, "web-2").together == "a"
    with pytest.raises(ConfigError) as info:
        groups_for(inv, "web-10")
    assert "a" in str(info.value) and "b" in str(info.value)


def test_groups_and_tiers_share_one_matcher() -> None:
    tier = Tier(name="t", vms=("db-*", "pg[0-9]"))
    inv = parse_inventory('[groups.g]\nvms = ["db-*", "pg[0-9]"]\nplacement = "apart"\n')
    for vm in ("db-1", "pg3", "pg33", "xdb-1", "DB-1"):
        assert tier.matches(vm) == inv.groups["g"].matches(vm) == validate.name_matches(
            vm, ("db-*", "pg[0-9]"))


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_with_capacity_links_and_groups() -> None:
    inv = parse_inventory(FLEET)
    text = dump_inventory(inv)
    assert parse_inventory(text) == inv
    assert '[links."rack1-up"]' in text and '[groups."shop"]' in text


def test_dump_leaves_defaults_out() -> None:
    text = dump_inventory(parse_inventory(BASE))
    for key in ("reserve_memory", "state", "labels", "uplink", "downlink",
                "max_migrations_in", "max_migrations_out", "[links", "[groups"):
        assert key not in text


def test_the_store_knows_the_same_host_states() -> None:
    from vmigrate import config, store

    assert config.HOST_STATES == store.HOST_STATES
