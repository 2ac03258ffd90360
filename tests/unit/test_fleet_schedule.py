"""The fleet scheduler (``vmigrate.plan.fleet.schedule``) and its checker on concrete
waves, with the fake estimator: the product against the baselines."""

from __future__ import annotations

import json

import pytest

from vmigrate.plan.fleet import (
    STRATEGIES,
    Estimate,
    Fleet,
    FleetError,
    Host,
    Link,
    Move,
    Schedule,
    Vm,
    check_schedule,
    plan_evacuation,
    schedule,
)
from vmigrate.testing.fakefleet import LinearEstimator, hosts, links

GiB = 1 << 30
EST = LinearEstimator()




def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def in_flight(s: Schedule, t: float) -> list[str]:
    return [e.vm for e in s.entries if e.start_s <= t < e.end_s]


def evacuation_fleet() -> Fleet:
    hs = [Host("h1", 64 * GiB, 16, state="draining"), Host("h2", 64 * GiB, 16),
          Host("h3", 64 * GiB, 16)]
    vms = [Vm(f"vm{i}", "h1", (i + 1) * GiB, 2, dirty_rate=i * 2e6) for i in range(6)]
    return Fleet(hs, links("h1", "h2", "h3"), vms)


# -- the product ---------------------------------------------------------------------------


def test_three_host_evacuation_keeps_every_rule_and_beats_sequential() -> None:
    fleet = evacuation_fleet()
    moves = plan_evacuation(fleet, "h1", EST).moves
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    assert {e.vm for e in s.entries} == {m.vm for m in moves} and not s.refused
    assert all(e.converges and e.why for e in s.entries)
    seq = schedule(fleet, moves, EST, "sequential")
    assert check_schedule(seq, fleet) == []
    assert s.makespan_s <= seq.makespan_s
    assert s.makespan_s == max(e.end_s for e in s.entries)
    assert s.downtime_sum_ms == pytest.approx(sum(e.downtime_ms for e in s.entries))
    assert s.downtime_max_ms == max(e.downtime_ms for e in s.entries)
    # the critical path ends with the last migration and goes back to the wave's start
    last = s.entry(s.critical_path[0])
    assert last.end_s == s.makespan_s
    assert s.entry(s.critical_path[-1]).after is None
    assert f"{s.makespan_s:.0f} s" in s.critical_why
    # h1's uplink is the bottleneck: the wave keeps it full until its last migration
    assert max(r for _, r in s.links["h1-up"]) == pytest.approx(100e6)
    data = json.loads(json.dumps(s.to_json()))
    assert data["strategy"] == "vmigrate" and len(data["entries"]) == len(moves)


def test_a_destination_link_narrower_than_the_source_bounds_its_move() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16, downlink="thin"),
                   Host("h3", 64 * GiB, 16)],
                  [*links("h1", "h2", "h3"), Link("thin", 25e6)],
                  [Vm("a", "h1", 2 * GiB), Vm("b", "h1", 8 * GiB)])
    s = schedule(fleet, [Move("a", "h1", "h2"), Move("b", "h1", "h3")], EST)
    assert check_schedule(s, fleet) == []
    a, b = s.entry("a"), s.entry("b")
    assert a.allocations[0][1] == pytest.approx(25e6)  # all the thin link allows
    # b takes what the thin link leaves of h1's uplink (100e6 allowance)
    assert b.allocations[0] == (0.0, pytest.approx(75e6))
    # and all of it once a is done
    assert b.allocations[-1] == (pytest.approx(a.end_s), pytest.approx(100e6))
    assert a.end_s == pytest.approx(EST.setup_s + 2 * GiB / 25e6)
    assert "thin" in a.why


def test_a_hot_vm_waits_for_a_lane_of_its_own_instead_of_starving() -> None:
    fleet = Fleet(hosts(2, max_in=3, max_out=3), links("h1", "h2"),
                  [Vm("hot", "h1", 4 * GiB, dirty_rate=60e6, postcopy=False),
                   Vm("a", "h1", 2 * GiB), Vm("b", "h1", 2 * GiB)])
    moves = [Move(v, "h1", "h2") for v in ("a", "b", "hot")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    hot = s.entry("hot")
    need = EST.min_bandwidth(fleet.vm("hot"))  # 75e6 of the 100e6 allowance
    assert hot.start_s == 0 and hot.converges and hot.stalled_s == 0
    assert min(r for _, r in hot.allocations) >= need
    assert hot.floor == pytest.approx(need)
    assert "never in a fair share" in hot.why
    # one idle VM fits beside it (25e6), the other waits for room on the links
    assert sorted(e.vm for e in s.entries if e.start_s == 0) == ["a", "hot"]
    assert s.entry("b").start_s > 0 and "waits" in s.entry("b").why
    # everything at once: a fair share below what the hot guest needs
    crowd = schedule(fleet, moves, EST, "all-at-once")
    starved = crowd.entry("hot")
    assert not starved.estimate.converges and starved.stalled_s > 0
    assert "does not converge" in starved.estimate.note or "dirties" in starved.estimate.note
    assert any("h1-up" in v for v in check_schedule(crowd, fleet))


def test_a_guest_hotter_than_its_lane_goes_post_copy_alone_or_is_refused() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("pc", "h1", 4 * GiB, dirty_rate=200e6, postcopy=True),
                   Vm("nopc", "h1", 4 * GiB, dirty_rate=200e6, postcopy=False),
                   Vm("idle", "h1", 2 * GiB)])
    s = schedule(fleet, [Move("pc", "h1", "h2"), Move("nopc", "h1", "h3"),
                         Move("idle", "h1", "h3")], EST)
    assert check_schedule(s, fleet) == []
    refused = dict(s.refused)
    assert list(refused) == ["nopc"] and "does not converge" in refused["nopc"]
    pc = s.entry("pc")
    assert pc.floor == pytest.approx(100e6) and pc.estimate.postcopy
    assert "whole of its" in pc.why
    # nothing shares h1's uplink with it
    idle = s.entry("idle")
    assert not overlap((pc.start_s, pc.end_s), (idle.start_s, idle.end_s))


def test_a_group_starts_together_to_one_destination() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("app", "h1", 4 * GiB, group="g"), Vm("cache", "h3", 2 * GiB, group="g"),
                   Vm("x", "h1", 6 * GiB)])
    moves = [Move("x", "h1", "h2"), Move("app", "h1", "h2"), Move("cache", "h3", "h2")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    app, cache = s.entry("app"), s.entry("cache")
    assert app.start_s == cache.start_s
    assert "with its unit" in app.why
    # h2 takes 2 in at a time: x does not run beside the group
    x = s.entry("x")
    assert not overlap((x.start_s, x.end_s), (app.start_s, max(app.end_s, cache.end_s)))
    # the sequential baseline does not keep the group together
    seq = schedule(fleet, moves, EST, "sequential")
    assert seq.entry("app").start_s != seq.entry("cache").start_s


def test_a_group_split_over_two_destinations_is_refused_as_input() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("a", "h1", GiB, group="g"), Vm("b", "h1", GiB, group="g")])
    with pytest.raises(FleetError, match="together"):
        schedule(fleet, [Move("a", "h1", "h2"), Move("b", "h1", "h3")], EST)


def test_moving_part_of_a_group_or_affinity_is_refused() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"),
                  [Vm("a", "h1", GiB, group="g"), Vm("b", "h1", GiB, group="g"),
                   Vm("c", "h1", GiB, affinity="x"), Vm("d", "h1", GiB, affinity="x")])
    s = schedule(fleet, [Move("a", "h1", "h2"), Move("c", "h1", "h2")], EST)
    assert not s.entries
    refused = dict(s.refused)
    assert "split" in refused["a"] and "split" in refused["c"]


def test_a_unit_its_own_anti_affinity_keeps_apart_is_refused() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("a", "h1", GiB, group="g", anti_affinity="x"),
                   Vm("b", "h3", GiB, group="g", anti_affinity="x")])
    s = schedule(fleet, [Move("a", "h1", "h2"), Move("b", "h3", "h2")], EST)
    assert not s.entries and "anti-affinity 'x'" in dict(s.refused)["a"]
    assert check_schedule(s, fleet) == []


def test_anti_affinity_holds_while_in_flight() -> None:
    fleet = Fleet(hosts(3), links("h1", "h2", "h3"),
                  [Vm("db1", "h1", 4 * GiB, anti_affinity="db"),
                   Vm("db2", "h2", 4 * GiB, anti_affinity="db")])
    moves = [Move("db1", "h1", "h2"), Move("db2", "h2", "h3")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    assert s.entry("db1").start_s >= s.entry("db2").end_s
    assert "anti-affinity" in s.entry("db1").why
    crowd = schedule(fleet, moves, EST, "all-at-once")
    assert any("anti-affinity 'db'" in v for v in check_schedule(crowd, fleet))


def test_destination_memory_counts_reservations_in_flight() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 12 * GiB, 16), Host("h3", 64 * GiB, 16)],
                  links("h1", "h2", "h3"),
                  [Vm("x", "h2", 6 * GiB), Vm("y", "h1", 8 * GiB)])
    moves = [Move("y", "h1", "h2"), Move("x", "h2", "h3")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    # y fits on h2 only once x has left it, at the end of x's migration
    assert s.entry("y").start_s == pytest.approx(s.entry("x").end_s)
    assert s.entry("y").after == "x"
    assert "memory reserved" in s.entry("y").why
    crowd = schedule(fleet, moves, EST, "all-at-once")
    assert any("h2 holds" in v for v in check_schedule(crowd, fleet))


def test_what_never_fits_is_refused_with_the_reason() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 8 * GiB, 16),
                   Host("h3", 64 * GiB, 16, state="maintenance")],
                  links("h1", "h2", "h3"),
                  [Vm("big", "h1", 10 * GiB), Vm("ok", "h1", 2 * GiB), Vm("m", "h1", GiB)])
    s = schedule(fleet, [Move("big", "h1", "h2"), Move("ok", "h1", "h2"),
                         Move("m", "h1", "h3")], EST)
    assert check_schedule(s, fleet) == []
    assert [e.vm for e in s.entries] == ["ok"]
    refused = dict(s.refused)
    assert "h2 has 8.0 GiB" in refused["big"]
    assert "maintenance" in refused["m"]


def test_what_fits_only_alone_is_refused_once_the_others_took_the_room() -> None:
    fleet = Fleet(hosts(2, memory=8), links("h1", "h2"),
                  [Vm("a", "h1", 5 * GiB), Vm("b", "h1", 5 * GiB)])
    s = schedule(fleet, [Move("a", "h1", "h2"), Move("b", "h1", "h2")], EST)
    assert check_schedule(s, fleet) == []
    assert [e.vm for e in s.entries] == ["a"]
    assert "would never start" in dict(s.refused)["b"] and "h2 has" in dict(s.refused)["b"]


def test_per_host_caps_hold() -> None:
    fleet = Fleet(hosts(3, max_out=1), links("h1", "h2", "h3", capacity=1e9),
                  [Vm(f"v{i}", "h1", GiB) for i in range(4)])
    moves = [Move(f"v{i}", "h1", "h2" if i % 2 else "h3") for i in range(4)]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    assert all(len(in_flight(s, e.start_s)) == 1 for e in s.entries)
    assert "max_out 1" in s.entries[-1].why


def test_spare_bandwidth_goes_to_the_running_as_others_end() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"), [Vm("small", "h1", GiB), Vm("big", "h1", 8 * GiB)])
    s = schedule(fleet, [Move("small", "h1", "h2"), Move("big", "h1", "h2")], EST)
    big = s.entry("big")
    assert [r for _, r in big.allocations] == [pytest.approx(50e6), pytest.approx(100e6)]
    assert big.allocations[1][0] == pytest.approx(s.entry("small").end_s)
    # what was left of it went at the new rate: sooner than at its first
    assert big.end_s < big.estimate.time_s
    assert "up to" in big.why


def test_one_unit_at_a_time_when_the_model_says_sharing_costs_more() -> None:
    class Resending:
        """A guest that resends a lot at a share: time grows with the square of 1/b."""

        def min_bandwidth(self, vm: Vm) -> float:
            return 0.0

        def estimate(self, vm: Vm, bandwidth: float) -> Estimate:
            t = vm.memory / bandwidth * (100e6 / bandwidth)
            return Estimate(time_s=t, downtime_ms=50, bytes=vm.memory, converges=True)

    fleet = Fleet(hosts(2), links("h1", "h2"), [Vm("a", "h1", GiB), Vm("b", "h1", GiB)])
    moves = [Move("a", "h1", "h2"), Move("b", "h1", "h2")]
    s = schedule(fleet, moves, Resending())
    assert "one unit at a time" in s.notes[0]
    assert not overlap(*((e.start_s, e.end_s) for e in s.entries))
    assert s.makespan_s <= schedule(fleet, moves, Resending(), "sequential").makespan_s
    assert check_schedule(s, fleet) == []


def test_a_minimum_share_limits_how_many_share_a_link() -> None:
    fleet = Fleet(hosts(2, max_in=8, max_out=8), links("h1", "h2"),
                  [Vm(f"v{i}", "h1", GiB) for i in range(8)])
    moves = [Move(f"v{i}", "h1", "h2") for i in range(8)]
    s = schedule(fleet, moves, EST)
    assert max(len(in_flight(s, e.start_s)) for e in s.entries) == 4
    s = schedule(fleet, moves, EST, min_share=0.5)
    assert max(len(in_flight(s, e.start_s)) for e in s.entries) == 2
    with pytest.raises(FleetError):
        schedule(fleet, moves, EST, min_share=0)


# -- baselines -------------------------------------------------------------------------------


def test_sequential_runs_one_at_a_time_on_the_whole_lane() -> None:
    fleet = evacuation_fleet()
    moves = plan_evacuation(fleet, "h1", EST).moves
    s = schedule(fleet, moves, EST, "sequential")
    assert [e.vm for e in s.entries] == [m.vm for m in moves]
    for a, b in zip(s.entries, s.entries[1:], strict=False):
        assert b.start_s == pytest.approx(a.end_s)
    assert all(e.allocations == ((e.start_s, pytest.approx(100e6)),) for e in s.entries)


def test_kubevirt_caps_and_seeded_order() -> None:
    fleet = Fleet(hosts(4, max_in=9, max_out=9), links("h1", "h2", "h3", "h4"),
                  [Vm(f"v{i}", f"h{1 + i % 3}", GiB) for i in range(12)])
    moves = [Move(v.name, v.host, "h4") for v in fleet.vms]
    s = schedule(fleet, moves, EST, "kubevirt", seed=7)
    for e in s.entries:
        flying = [fleet.vm(v) for v in in_flight(s, e.start_s)]
        assert len(flying) <= 5
        assert max(sum(1 for v in flying if v.host == h) for h in ("h1", "h2", "h3")) <= 2
    again = schedule(fleet, moves, EST, "kubevirt", seed=7)
    assert [e.vm for e in again.entries] == [e.vm for e in s.entries]
    assert s.notes == ("random order, seed 7",)
    # no bandwidth limit: it takes the links' whole capacity, past the budget
    assert any("h4-down" in v for v in check_schedule(s, fleet))


def test_proxmox_two_workers_by_name() -> None:
    fleet = Fleet(hosts(2, max_in=9, max_out=9), links("h1", "h2"),
                  [Vm(n, "h1", GiB) for n in ("c", "a", "d", "b")])
    s = schedule(fleet, [Move(v.name, "h1", "h2") for v in fleet.vms], EST, "proxmox")
    assert [e.vm for e in sorted(s.entries, key=lambda e: (e.start_s, e.vm))] == \
        ["a", "b", "c", "d"]
    assert max(len(in_flight(s, e.start_s)) for e in s.entries) == 2


def test_a_starved_baseline_migration_fails_and_stays_on_its_source() -> None:
    fleet = Fleet(hosts(2, max_in=9, max_out=9), links("h1", "h2"),
                  [Vm(f"hot{i}", "h1", 4 * GiB, dirty_rate=50e6, postcopy=False)
                   for i in range(3)])
    moves = [Move(v.name, "h1", "h2") for v in fleet.vms]
    s = schedule(fleet, moves, EST, "all-at-once")
    assert s.failed and all(not e.converges for e in s.failed)
    assert all("cancelled" in e.why and e.downtime_ms == 0 for e in s.failed)
    assert s.to_json()["failed"] == [e.vm for e in s.failed]
    product = schedule(fleet, moves, EST)
    assert not product.failed and check_schedule(product, fleet) == []


def test_every_strategy_explains_every_entry() -> None:
    fleet = evacuation_fleet()
    moves = plan_evacuation(fleet, "h1", EST).moves
    for strategy in STRATEGIES:
        s = schedule(fleet, moves, EST, strategy)
        assert len(s.entries) == len(moves)
        assert all(e.why and e.why[0].islower() for e in s.entries)
        json.dumps(s.to_json())


# -- the checker and the input ---------------------------------------------------------------


def test_check_reports_a_group_split_longer_than_its_migration() -> None:
    fleet = Fleet(hosts(2, max_in=9, max_out=9), links("h1", "h2"),
                  [Vm(f"g{i}", "h1", GiB, group="g") for i in range(3)])
    moves = [Move(v.name, "h1", "h2") for v in fleet.vms]
    assert check_schedule(schedule(fleet, moves, EST), fleet) == []
    found = check_schedule(schedule(fleet, moves, EST, "sequential"), fleet)
    assert any("group 'g' is split" in v for v in found)


@pytest.mark.parametrize("move, match", [
    (Move("nope", "h1", "h2"), "nope"),
    (Move("a", "h2", "h1"), "runs on h1"),
    (Move("a", "h1", "h1"), "both"),
    (Move("a", "h1", "h9"), "h9"),
])
def test_bad_moves_are_refused_as_input(move: Move, match: str) -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"), [Vm("a", "h1", GiB)])
    with pytest.raises(FleetError, match=match):
        schedule(fleet, [move], EST)


def test_a_vm_moved_twice_or_an_unknown_strategy_is_refused() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"), [Vm("a", "h1", GiB)])
    with pytest.raises(FleetError, match="twice"):
        schedule(fleet, [Move("a", "h1", "h2")] * 2, EST)
    with pytest.raises(FleetError, match="strategy"):
        schedule(fleet, [], EST, "yolo")  # type: ignore[arg-type]


def test_an_empty_wave() -> None:
    fleet = Fleet(hosts(2), links("h1", "h2"), [])
    s = schedule(fleet, [], EST)
    assert s.makespan_s == 0 and not s.entries and s.critical_why == "nothing to move"


def test_a_free_lane_beside_a_full_one_gets_the_slot() -> None:
    fleet = Fleet([Host("h1", 64 * GiB, 16), Host("h2", 64 * GiB, 16, downlink="thin"),
                   Host("h3", 64 * GiB, 16)],
                  [*links("h1", "h2", "h3"), Link("thin", 31.25e6)],
                  [Vm("a", "h1", 8 * GiB), Vm("b", "h1", 3 * GiB), Vm("c", "h1", 4 * GiB)])
    moves = [Move("a", "h1", "h2"), Move("b", "h1", "h2"), Move("c", "h1", "h3")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    # a fills the thin link: b beside it would add nothing and take h1's last slot
    assert s.entry("a").start_s == 0 and s.entry("c").start_s == 0
    assert s.entry("b").start_s > 0


def test_a_unit_waiting_for_slots_is_backfilled_only_by_what_ends_in_time() -> None:
    wide = [Link("h1-up", 1.25e9), Link("h1-down", 1.25e9)]
    fleet = Fleet([Host("h1", 256 * GiB, 16, max_out=2),
                   *[Host(f"h{i}", 64 * GiB, 16) for i in range(2, 7)]],
                  [*wide, *links("h2", "h3", "h4", "h5", "h6")],
                  [Vm("L", "h1", 16 * GiB), Vm("M", "h1", 8 * GiB),
                   Vm("g1", "h1", 2 * GiB, group="g"), Vm("g2", "h1", 2 * GiB, group="g"),
                   Vm("S", "h1", GiB), Vm("X", "h1", 3 * GiB)])
    moves = [Move("L", "h1", "h2"), Move("M", "h1", "h5"), Move("g1", "h1", "h3"),
             Move("g2", "h1", "h3"), Move("S", "h1", "h4"), Move("X", "h1", "h6")]
    s = schedule(fleet, moves, EST)
    assert check_schedule(s, fleet) == []
    L, M, S, X = (s.entry(v) for v in ("L", "M", "S", "X"))
    assert L.start_s == M.start_s == 0
    # the group needs both of h1's slots: it has them when L ends; S is done by then
    assert S.start_s == pytest.approx(M.end_s) and S.end_s < L.end_s
    assert s.entry("g1").start_s == pytest.approx(L.end_s)
    # X would run past that: it waits behind the group
    assert X.start_s >= s.entry("g1").start_s
    assert "g1, g2 waits for a slot out of h1 first" in X.why
