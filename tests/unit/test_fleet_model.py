"""The fleet's data (``vmigrate.plan.fleet.model``): checked when built, lookups, units."""

from __future__ import annotations

import pytest

from vmigrate.errors import UserError
from vmigrate.plan.fleet import Fleet, FleetError, Host, Link, Move, Vm
from vmigrate.plan.fleet.model import fmt_rate, fmt_size, units

GiB = 1 << 30


def links(*hosts: str, capacity: float = 125e6, budget: float = 0.8) -> list[Link]:
    return [Link(f"{h}-{d}", capacity, budget) for h in hosts for d in ("up", "down")]


def test_link_allowance_is_capacity_times_budget() -> None:
    assert Link("l", 125e6, 0.8).allowance == pytest.approx(100e6)
    assert Link("l", 125e6).allowance == 125e6


@pytest.mark.parametrize("capacity, budget", [(0, 0.5), (-1, 0.5), (1e6, 0), (1e6, 1.5),
                                              (float("inf"), 0.5)])
def test_bad_link_is_refused(capacity: float, budget: float) -> None:
    with pytest.raises(FleetError):
        Link("l", capacity, budget)


def test_host_names_its_links_by_default() -> None:
    h = Host("h1", 64 * GiB, 16, reserve_memory=4 * GiB)
    assert (h.uplink, h.downlink) == ("h1-up", "h1-down")
    assert h.capacity == 60 * GiB
    assert h.state == "active" and (h.max_in, h.max_out) == (2, 2)


@pytest.mark.parametrize("kwargs", [
    {"memory": 0}, {"reserve_memory": 64 * GiB}, {"state": "gone"}, {"max_in": 0},
    {"cpus": 0},
])
def test_bad_host_is_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"name": "h1", "memory": 64 * GiB, "cpus": 16}
    args.update(kwargs)
    with pytest.raises(FleetError):
        Host(**args)  # type: ignore[arg-type]


def test_bad_vm_is_refused() -> None:
    with pytest.raises(FleetError):
        Vm("a", "h1", 0)
    with pytest.raises(FleetError):
        Vm("a", "h1", GiB, dirty_rate=-1)
    with pytest.raises(FleetError):
        Vm("a", "h1", GiB, mode="teleport")  # type: ignore[arg-type]


def test_fleet_errors_are_the_callers_fault() -> None:
    assert issubclass(FleetError, UserError)


def test_unknown_link_is_a_clear_error() -> None:
    with pytest.raises(FleetError, match="h1-down"):
        Fleet([Host("h1", 64 * GiB, 16)], [Link("h1-up", 1e8)], [])


def test_vm_on_unknown_host_is_a_clear_error() -> None:
    with pytest.raises(FleetError, match="h9"):
        Fleet([Host("h1", 64 * GiB, 16)], links("h1"), [Vm("a", "h9", GiB)])


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(FleetError):
        Fleet([Host("h1", 64 * GiB, 16), Host("h1", 64 * GiB, 16)], links("h1"), [])
    with pytest.raises(FleetError):
        Fleet([Host("h1", 64 * GiB, 16)], links("h1"), [Vm("a", "h1", GiB)] * 2)


def test_lookups_lane_and_links() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16, downlink="narrow")],
                  [*links("h1", "h2"), Link("narrow", 50e6, 0.5)],
                  [Vm("a", "h1", 2 * GiB, 2), Vm("b", "h1", 3 * GiB, 1)])
    assert fleet.vm("a").memory == 2 * GiB
    assert [v.name for v in fleet.vms_on("h1")] == ["a", "b"]
    assert fleet.used_memory("h1") == 5 * GiB and fleet.used_cpus("h1") == 3
    assert fleet.lane("h1", "h2") == pytest.approx(25e6)
    assert fleet.links_of("h1", "h2") == ("h1-up", "narrow")
    with pytest.raises(FleetError):
        fleet.host("h3")
    moved = fleet.after([Move("a", "h1", "h2")])
    assert moved.vm("a").host == "h2" and fleet.vm("a").host == "h1"


def test_shared_link_counts_once() -> None:
    fleet = Fleet([Host("h1", 8 * GiB, 4, uplink="spine", downlink="spine"),
                   Host("h2", 8 * GiB, 4, uplink="spine", downlink="spine")],
                  [Link("spine", 1e8)], [])
    assert fleet.links_of("h1", "h2") == ("spine",)


def test_violations_as_the_fleet_stands() -> None:
    fleet = Fleet([Host("h1", 4 * GiB, 4), Host("h2", 64 * GiB, 4)], links("h1", "h2"), [
        Vm("a", "h1", 3 * GiB, anti_affinity="db"), Vm("b", "h1", 2 * GiB, anti_affinity="db"),
        Vm("c", "h1", GiB, affinity="web"), Vm("d", "h2", GiB, affinity="web"),
    ])
    found = fleet.violations()
    assert len(found) == 3
    assert any("h1" in v and "6.0 GiB" in v for v in found)


def test_units_join_groups_and_affinity_transitively() -> None:
    vms = [Vm("a", "h1", GiB, group="g"), Vm("b", "h1", GiB, group="g", affinity="x"),
           Vm("c", "h2", GiB, affinity="x"), Vm("d", "h1", GiB)]
    assert [[v.name for v in u] for u in units(vms)] == [["a", "b", "c"], ["d"]]


def test_formats() -> None:
    assert fmt_rate(125e6) == "1000 Mbit/s"
    assert fmt_rate(1e5) == "0.8 Mbit/s"
    assert fmt_size(2 * GiB) == "2.0 GiB"
    assert fmt_size(512 << 20) == "512 MiB"
