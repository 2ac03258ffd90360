"""Where VMs go (``vmigrate.plan.fleet.placement``): evacuation and rebalancing on
plain data, with the fake estimator."""

from __future__ import annotations

import json

import pytest

from vmigrate.plan.fleet import (
    Fleet,
    FleetError,
    Host,
    Link,
    Vm,
    imbalance,
    plan_evacuation,
    plan_rebalance,
)
from vmigrate.testing.fakefleet import LinearEstimator, hosts, links

GiB = 1 << 30
EST = LinearEstimator()




def test_three_host_evacuation_spreads_the_vms() -> None:
    vms = [Vm(f"vm{i}", "h1", (i + 2) * GiB, 2) for i in range(6)]
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"), vms)
    p = plan_evacuation(fleet, "h1", EST)
    assert not p.unplaceable
    assert {m.vm for m in p.moves} == {v.name for v in vms}
    assert all(m.src == "h1" and m.dst in ("h2", "h3") for m in p.moves)
    per_host = {d: sum(fleet.vm(m.vm).memory for m in p.moves if m.dst == d)
                for d in ("h2", "h3")}
    # spread, not all on one host: within one VM of each other
    assert abs(per_host["h2"] - per_host["h3"]) <= 7 * GiB
    # the biggest first, each choice with figures
    assert p.moves[0].vm == "vm5"
    assert "GiB" in p.why["vm5"] and "%" in p.why["vm5"]
    json.dumps(p.to_json())


def test_destination_with_the_most_free_fraction_wins() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("big", 128 * GiB, 16),
                   Host("small", 32 * GiB, 16)], links("h1", "big", "small"),
                  [Vm("a", "h1", 4 * GiB), Vm("x", "big", 100 * GiB)])
    p = plan_evacuation(fleet, "h1", EST)
    # big has 24 of 128 free after it (19 %), small 28 of 32 (88 %)
    assert p.moves[0].dst == "small"
    assert "88%" in p.why["a"]


def test_ties_go_by_name() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"), [Vm("a", "h1", GiB)])
    assert plan_evacuation(fleet, "h1", EST).moves[0].dst == "h2"


def test_a_vm_too_big_for_any_host_is_unplaceable_with_the_reason() -> None:
    fleet = Fleet(hosts(3, memory=16), links("h1", "h2", "h3"),
                  [Vm("huge", "h1", 15 * GiB), Vm("b", "h2", 4 * GiB),
                   Vm("c", "h3", 4 * GiB), Vm("small", "h1", GiB)])
    p = plan_evacuation(fleet, "h1", EST)
    assert [m.vm for m in p.moves] == ["small"]
    assert [vm for vm, _ in p.unplaceable] == ["huge"]
    reason = dict(p.unplaceable)["huge"]
    assert "h2" in reason and "h3" in reason and "GiB" in reason


def test_only_active_hosts_receive() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16, state="maintenance"),
                   Host("h3", 64 * GiB, 16, state="draining"), Host("h4", 64 * GiB, 16)],
                  links("h1", "h2", "h3", "h4"), [Vm("a", "h1", GiB), Vm("b", "h1", GiB)])
    p = plan_evacuation(fleet, "h1", EST)
    assert {m.dst for m in p.moves} == {"h4"}
    lonely = Fleet(hosts(1), links("h1"), [Vm("a", "h1", GiB)])
    assert dict(plan_evacuation(lonely, "h1", EST).unplaceable)["a"] == "no other host is active"


def test_anti_affinity_keeps_vms_apart() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("db1", "h1", 8 * GiB, anti_affinity="db"),
                   Vm("db2", "h2", 2 * GiB, anti_affinity="db")])
    p = plan_evacuation(fleet, "h1", EST)
    assert p.moves[0].dst == "h3"
    assert "anti-affinity 'db'" in p.why["db1"]


def test_anti_affinity_with_no_room_left_is_unplaceable() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"),
                  [Vm("db1", "h1", GiB, anti_affinity="db"),
                   Vm("db2", "h2", GiB, anti_affinity="db")])
    p = plan_evacuation(fleet, "h1", EST)
    assert not p.moves and "anti-affinity" in dict(p.unplaceable)["db1"]


def test_a_group_goes_to_one_destination() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("app", "h1", 4 * GiB, group="g"), Vm("cache", "h1", 2 * GiB, group="g"),
                   Vm("other", "h1", 5 * GiB)])
    p = plan_evacuation(fleet, "h1", EST)
    dst = {m.vm: m.dst for m in p.moves}
    assert dst["app"] == dst["cache"] != dst["other"]


def test_a_group_larger_than_max_in_cannot_go() -> None:
    fleet = Fleet(hosts(2, max_in=2), links("h1", "h2"),
                  [Vm(f"g{i}", "h1", GiB, group="g") for i in range(3)])
    p = plan_evacuation(fleet, "h1", EST)
    assert not p.moves
    assert "at most 2 migrations in" in dict(p.unplaceable)["g0"]


def test_affinity_ties_the_unit_to_the_host_of_its_partners() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("web", "h1", 2 * GiB, affinity="x"), Vm("db", "h3", 30 * GiB, affinity="x")])
    p = plan_evacuation(fleet, "h1", EST)
    assert p.moves[0].dst == "h3"


def test_a_hot_vm_is_not_sent_down_a_lane_it_cannot_converge_on() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16, downlink="slow"),
                   Host("h3", 8 * GiB, 16)],
                  [*links("h1", "h2", "h3"), Link("slow", 12.5e6)],
                  [Vm("hot", "h1", 4 * GiB, dirty_rate=40e6, postcopy=False)])
    p = plan_evacuation(fleet, "h1", EST)
    assert p.moves[0].dst == "h3"
    assert "does not converge" in p.why["hot"]


def test_imbalance_is_zero_when_balanced() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"), [Vm("a", "h1", 4 * GiB, 2),
                                                Vm("b", "h2", 4 * GiB, 2)])
    assert imbalance(fleet) == 0.0
    empty = Fleet(hosts(2), links("h1", "h2"), [])
    assert imbalance(empty) == 0.0


def test_rebalance_lowers_the_imbalance_with_figures() -> None:
    vms = [Vm(f"v{i}", "h1", 4 * GiB, 2) for i in range(6)]
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"), vms)
    p = plan_rebalance(fleet, EST, max_moves=4, min_gain=0.01)
    assert p.imbalance_before is not None and p.imbalance_after is not None
    assert p.imbalance_after < p.imbalance_before
    assert p.imbalance_before == pytest.approx(imbalance(fleet))
    assert p.imbalance_after == pytest.approx(imbalance(fleet.after(p.moves)))
    assert 1 <= len(p.moves) <= 4
    assert len({m.vm for m in p.moves}) == len(p.moves)  # each VM moved once
    assert {m.dst for m in p.moves} == {"h2", "h3"}
    assert "imbalance" in p.why[p.moves[0].vm] and "->" in p.why[p.moves[0].vm]


def test_rebalance_respects_max_moves_and_min_gain() -> None:
    vms = [Vm(f"v{i}", "h1", 4 * GiB, 2) for i in range(6)]
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"), vms)
    assert len(plan_rebalance(fleet, EST, max_moves=1, min_gain=0.0).moves) == 1
    none = plan_rebalance(fleet, EST, max_moves=5, min_gain=5.0)
    assert not none.moves and "no move" in none.summary
    assert not plan_rebalance(fleet, EST, max_moves=0).moves
    with pytest.raises(FleetError):
        plan_rebalance(fleet, EST, max_moves=-1)


def test_rebalance_prefers_cheap_moves_for_the_same_gain() -> None:
    # two VMs give the same gain (same memory, same CPUs), one has a big local disk
    fleet = Fleet(hosts(2), links("h1", "h2"),
                  [Vm("cheap", "h1", 4 * GiB, 2), Vm("dear", "h1", 4 * GiB, 2, mode="online",
                                                     disk_bytes=200 * GiB)])
    p = plan_rebalance(fleet, EST, max_moves=1, min_gain=0.0)
    assert [m.vm for m in p.moves] == ["cheap"]


def test_rebalance_moves_no_vm_off_an_inactive_host_and_keeps_units_whole() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16),
                   Host("h3", 64 * GiB, 16, state="draining")], links("h1", "h2", "h3"),
                  [Vm("a", "h1", 8 * GiB, 4, group="g"), Vm("b", "h1", 8 * GiB, 4, group="g"),
                   Vm("c", "h3", 8 * GiB, 4)])
    p = plan_rebalance(fleet, EST, max_moves=2, min_gain=0.0)
    assert "c" not in {m.vm for m in p.moves}
    moved = {m.vm for m in p.moves}
    assert moved in (set(), {"a", "b"})
